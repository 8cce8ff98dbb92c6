"""Every error clipship raises on purpose, in one place.

The CLI prints any ``ClipshipError`` as one line (``error: <message>``) and exits with
``exit_code``; anything else is a bug and keeps its traceback. Errors about something the
user named carry it as an attribute (``path``, ``task``, ``source``) besides the message, and
inherit the builtin a Python caller would catch for it (a missing source is a
``FileNotFoundError``, an existing output a ``FileExistsError``).

Grouped by where the problem lies:

- inputs: ``SourceNotFoundError``, ``CheckpointError``, ``NonFiniteWeightsError``,
  ``PoolMismatchError``, ``RecipeError``, ``DataError``, ``TaskError``, ``DownloadError``
- requests: ``MethodError``, ``ReleaseConfigError``, ``PromptTooLongError``,
  ``HeadsMismatchError``
- outputs: ``OutputExistsError``, ``OutputError``
- stage gates and services: ``ExportValidationError``, ``PushError``
- values: ``NonFiniteError`` (NaN or Inf about to be written, gated or published)
- ``Terminated`` (SIGTERM), which is not an error but unwinds like one
"""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error line quotes it: its repr (control characters escaped), cut to
    ``limit`` characters, so a hostile value can neither span lines nor flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ClipshipError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line.

    Keyword arguments become attributes (``ClipshipError("...", path=p).path``)."""

    exit_code = 1

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.details = details
        for key, value in details.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --- inputs: models, pools, recipes, datasets ----------------------------------------------


class SourceNotFoundError(ClipshipError, FileNotFoundError):
    """A model path, hub id or pool file that cannot be found or downloaded."""


class CheckpointError(ClipshipError):
    """A weight file that is corrupt, truncated, unsupported, or a refused pickle."""


class NonFiniteError(ClipshipError):
    """NaN or Inf where only finite numbers may be: a tensor or metric about to be written,
    gated or published, or a number in a file clipship reads."""


class NonFiniteWeightsError(NonFiniteError):
    """NaN or Inf in a model's weights."""


class PoolMismatchError(ClipshipError):
    """Models in a pool that cannot be merged together (names, shapes, dtypes, architecture)."""


class RecipeError(ClipshipError):
    """A recipe file that is malformed or whose sources changed since it was written."""


class DataError(ClipshipError):
    """A dataset that cannot be read, lacks the expected columns, or has a bad label or image."""


class TaskError(ClipshipError):
    """An unknown task, or a task definition that cannot be used."""


class DownloadError(ClipshipError):
    """A pinned download that cannot be fetched or does not match its sha256."""


# --- requests: methods, parameters, release files --------------------------------------------


class MethodError(ClipshipError):
    """An unknown merge method, an unknown or invalid parameter, or a pool it cannot merge."""


class SweepError(ClipshipError):
    """A grid, selection split or sweep folder that cannot be swept."""


class ReleaseConfigError(ClipshipError):
    """A release YAML that cannot be run."""


class PromptTooLongError(ClipshipError):
    """A rendered prompt has more tokens than the text tower's context."""


class HeadsMismatchError(ClipshipError):
    """A heads file that was built for another text tower or tokenizer."""


# --- outputs ---------------------------------------------------------------------------------


class OutputExistsError(ClipshipError, FileExistsError):
    """The output folder exists and ``--force`` was not given."""


class OutputError(ClipshipError):
    """An output that cannot be written there, or that would replace one of the inputs."""


# --- stage gates and services ----------------------------------------------------------------


class ExportValidationError(ClipshipError):
    """An exported graph that disagrees with PyTorch beyond its gate, or an int8 graph whose
    integer products could saturate on some CPU."""


class PushError(ClipshipError):
    """The Hub refused the push, or could not be reached."""


class Terminated(BaseException):
    """SIGTERM (a cancelled CI job, ``docker stop``): unwinds like Ctrl-C, so every temporary
    folder is removed on the way out; the CLI exits with 143 (128 + SIGTERM)."""

    exit_code = 143
