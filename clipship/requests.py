"""What the CLI and ``clipship release`` both ask of the stages, resolved in one place.

A command line (``--pool``, ``--pretrained``, ``--model NAME=SRC``, ``--tasks``, ...) and a
release file name the same things in two syntaxes; both become the values here, checked before
any work starts: the pool's sources, the tasks, the closed choices. Each stage's own request
(``MergeRequest``, ``EvalRequest``, ``ExportRequest``, ...) holds these and its defaults.

Errors name the parameter (``option=``), not a command-line flag: the CLI turns ``precision`` into
``--precision`` in the line it prints, a release file reports its own key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from clipship.errors import ClipshipError, MethodError, SourceNotFoundError, TaskError, shown

E = TypeVar("E", bound=Enum)

# Defaults the CLI's flags and a release file's keys share (the stages' own defaults).
EVAL_BATCH_SIZE = 128  # images per evaluation batch
VALIDATION_SIZE = 500  # images per task that validate an exported graph
EXPORT_MAX_BATCH = 64  # the TensorRT profile's largest batch


class Choice(str, Enum):
    """A closed set of names (a precision, a merge function): compares, hashes, formats and
    serialises as its plain value."""

    def __str__(self) -> str:
        return str(self.value)

    __format__ = str.__format__


def choice(kind: type[E], value: Any, option: str) -> E:
    """``value`` as a member of the ``str`` Enum ``kind``, or one error line listing them."""
    try:
        return kind(value)
    except ValueError:
        *first, last = [str(m.value) for m in kind]
        names = f"{', '.join(first)} or {last}" if first else last
        raise ClipshipError(f"`{option}` {value}: choose {names}", option=option) from None


MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed


def check_seed(seed: Any, option: str = "seed") -> int:
    """A seed: a whole number from 0 to 2⁶³ − 1 (what every generator it reaches takes)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ClipshipError(
            f"`{option}` {shown(seed)}: must be a whole number from 0 to 2^63 - 1", option=option
        )
    return seed


@dataclass(frozen=True)
class Sources:
    """A pool: the pretrained CLIP and the task encoders, each a folder or a hub id[@revision].
    ``taskfile`` is the task definitions that come with a pool (the mini-benchmark's)."""

    pretrained: str | None
    models: dict[str, str] = field(default_factory=dict)
    taskfile: Path | None = None

    def members(self) -> dict[str, str]:
        """``{"_pretrained_": ..., task: ...}``: every model, the pretrained first."""
        from clipship.pool import PRETRAINED

        return {PRETRAINED: self.pretrained or "", **self.models}


def resolve_sources(
    pool: Path | str | None = None,
    pretrained: str | None = None,
    models: list[str] | dict[str, str] | None = None,
    *,
    partial: bool = False,
    base: Path | None = None,
) -> Sources:
    """A pool from a FusionBench modelpool YAML, or from a pretrained source plus ``NAME=SRC``
    items (or a mapping). ``partial`` (a recipe replay) lets either be missing; ``base`` is
    where relative local paths are found (a release file's folder)."""
    from clipship.pool import parse_model_args, read_pool_yaml

    if pool is not None:
        if pretrained or models:
            raise SourceNotFoundError(
                "give either `pool` or `pretrained`/`model`, not both",
                option="pool",
            )
        pretrained_source, named = read_pool_yaml(local_path(pool, base))
        return Sources(pretrained_source, named)
    named = dict(models) if isinstance(models, dict) else parse_model_args(models or [])
    if not pretrained and not partial:
        raise SourceNotFoundError(
            "no pool: give `pool` POOL.yaml or `pretrained` SRC `model` NAME=SRC ...", option="pool"
        )
    if base is not None:
        pretrained = local_source(pretrained, base) if pretrained else pretrained
        named = {name: local_source(src, base) for name, src in named.items()}
    return Sources(pretrained, named)


def local_path(value: Path | str, base: Path | None) -> Path:
    """``value`` with ``~`` expanded, relative to ``base`` when given."""
    path = Path(os.path.expanduser(str(value)))
    return path if base is None or path.is_absolute() else base / path


def local_source(source: str, base: Path) -> str:
    """A source relative to ``base`` when that folder exists, else as given (a hub id)."""
    path = local_path(source, base)
    return str(path) if path.exists() else source


def parse_params(
    scaling_factor: str | None = None, threshold: str | None = None, items: list[str] | None = None
) -> dict[str, Any]:
    """Method parameters from ``NAME=VALUE`` items plus the two with their own flags."""
    params: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MethodError(f"`param` {item!r}: expected NAME=VALUE", option="param")
        params[name] = value
    if scaling_factor is not None:
        params["scaling_factor"] = scaling_factor
    if threshold is not None:
        params["threshold"] = threshold
    return params


@dataclass(frozen=True)
class TaskSpec:
    """Which tasks a command runs on: built-in names (``all``), a FusionBench task pool, a task
    file, custom ImageFolder tasks (``NAME=PATH``), and local data for them."""

    names: str | None = None
    taskpool: Path | None = None
    custom: tuple[str, ...] = ()
    classnames: Path | None = None
    templates: Path | None = None
    data_dir: Path | None = None
    taskfile: Path | None = None

    def select(self) -> list:
        """The tasks (``clipship.runtime.tasks.Task``), checked."""
        from clipship.runtime.tasks import select_tasks

        return select_tasks(
            self.names,
            self.taskpool,
            list(self.custom),
            self.classnames,
            self.templates,
            self.data_dir,
            self.taskfile,
        )

    def or_all(self) -> TaskSpec:
        """The eight tasks when nothing names any (heads and export default to them)."""
        if self.names or self.taskpool or self.custom or self.taskfile:
            return self
        return replace(self, names="all")

    def single(self) -> Any:
        """The one task of a command that works on one (fine-tuning)."""
        chosen = self.select()
        if len(chosen) != 1:
            names = ", ".join(t.name for t in chosen)
            raise TaskError(
                f"one task at a time: {len(chosen)} were given ({names}); give one `tasks` "
                "NAME or `task` NAME=PATH",
                option="tasks",
            )
        return chosen[0]

    def names_only(self) -> list[str] | None:
        """The named tasks (``all`` and nothing mean: every task there is)."""
        names = [n for n in (self.names or "").split(",") if n and n != "all"]
        return names or None
