"""Every error clipship raises on purpose.

The CLI prints any ``ClipshipError`` as one line (``error: <message>``) and exits with
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ClipshipError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""

    exit_code = 1


class SourceNotFoundError(ClipshipError):
    """A model path, hub id or pool file that cannot be found or downloaded."""


class CheckpointError(ClipshipError):
    """A weight file that is corrupt, truncated, unsupported, or a refused pickle."""


class PoolMismatchError(ClipshipError):
    """Models in a pool that cannot be merged together (names, shapes, dtypes, architecture)."""


class NonFiniteWeightsError(ClipshipError):
    """NaN or Inf in a model's weights."""


class MethodError(ClipshipError):
    """An unknown merge method, an unknown or invalid parameter, or too few models."""


class OutputExistsError(ClipshipError):
    """The output folder exists and ``--force`` was not given."""


class OutputError(ClipshipError):
    """An output that cannot be written there, or that would replace one of the inputs."""


class RecipeError(ClipshipError):
    """A recipe file that is malformed or whose sources changed since it was written."""


class DataError(ClipshipError):
    """A dataset that cannot be read, lacks the expected columns, or has a bad label or image."""


class Terminated(BaseException):
    """SIGTERM (a cancelled CI job, ``docker stop``): unwinds like Ctrl-C, so every temporary
    folder is removed on the way out; the CLI exits with 143 (128 + SIGTERM)."""

    exit_code = 143
