"""Zero-shot classification tasks as data: class names, prompt templates, and where the test set is.

The built-in tasks (``tasks.json``, package data) are FusionBench's eight-task benchmark plus its
other CLIP tasks, with its exact class names and templates (``{c}`` is the class-name
placeholder). Custom tasks come from an ImageFolder with your own class names and templates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from clipship.errors import TaskError

DEFAULT_TEMPLATES = ("a photo of a {c}.",)
PLACEHOLDER = "{c}"


@dataclass(frozen=True)
class Task:
    """One classification task: what to call each class and how to prompt for it."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    dataset: dict[str, Any] | None = None  # hub source: path, name, split, columns, size
    data: str | None = None  # a local copy (folder or file), when given
    # ``validation``: the split FusionBench's ``val/<task>.yaml`` carves from the training set
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def prompts(self, classname: str) -> list[str]:
        return [template.replace(PLACEHOLDER, classname) for template in self.templates]


@cache
def _builtin() -> dict[str, Any]:
    text = resources.files("clipship.runtime").joinpath("tasks.json").read_text(encoding="utf-8")
    return json.loads(text)


def builtin_tasks() -> dict[str, Task]:
    """Every built-in task by FusionBench's name (``sun397``, ``stanford-cars``, ...)."""
    return {
        name: Task(
            name,
            tuple(t["classnames"]),
            tuple(t["templates"]),
            t.get("dataset"),
            extra={"validation": t["validation"]} if "validation" in t else {},
        )
        for name, t in _builtin()["tasks"].items()
    }


def standard_tasks() -> list[str]:
    """The eight-task benchmark, in FusionBench's order."""
    return list(_builtin()["standard"])


def suites() -> dict[str, list[str]]:
    """Named task lists: ``all`` (the eight tasks) and FusionBench's ``tall14`` and ``tall20``."""
    return {"all": standard_tasks(), **_builtin()["suites"]}


def aliases() -> dict[str, str]:
    """FusionBench's other names for a task (``stanford_cars``, ``tanganke/gtsrb``, ...)."""
    return dict(_builtin()["aliases"])


def named_after_tasks(merged_from: list[str], evaluated: list[str]) -> bool:
    """Whether every task model is named after a task: a built-in one, an alias, or one of the
    tasks evaluated (a task file's)."""
    known = set(builtin_tasks()) | set(aliases()) | set(evaluated)
    return bool(merged_from) and all(m in known for m in merged_from)


def unseen(names: list[str], merged_from: list[str]) -> list[str]:
    """The tasks of ``names`` that no task model of ``merged_from`` was tuned on (FusionBench's
    generalization experiments), matching FusionBench's aliases to their task; none when the
    task models are not all named after tasks (then which task each was tuned on is unknown)."""
    if not named_after_tasks(merged_from, names):
        return []
    other = aliases()
    seen = {other.get(n, n) for n in merged_from}
    return [n for n in names if other.get(n, n) not in seen]


def get_tasks(names: str | list[str]) -> list[Task]:
    """A suite (``all``, ``tall14``, ``tall20``), a comma-separated string, or a list of names.
    Every name FusionBench's ``CLIPTemplateFactory`` accepts resolves: an alias without a ``/``
    keeps its name (so a pool's ``stanford_cars`` model meets its task); a hub id
    (``tanganke/gtsrb``) becomes the task's own name."""
    from clipship.schemas import check_name

    if isinstance(names, str):
        lists = suites()
        if names in lists:
            names = lists[names]
        else:
            names = [n for n in names.split(",") if n]
    table, other = builtin_tasks(), aliases()
    out = []
    for name in names:
        if name in other and "/" in name:
            out.append(table[other[name]])
            continue
        check_name(name, "task name", option="tasks")
        if name in other:
            out.append(replace(table[other[name]], name=name))
        elif name in table:
            out.append(table[name])
        else:
            raise TaskError(
                f"unknown task {name!r} (known: {', '.join(table)}; suites: "
                f"{', '.join(suites())}; or FusionBench's aliases)"
            )
    return out


def read_taskpool_yaml(path: Path) -> list[str]:
    """Task names from a FusionBench taskpool YAML (``clip-vit-classification_TA8`` shape):
    ``test_datasets`` keys, or Hydra ``defaults`` entries ``.../test@test_datasets: [names]``."""
    from clipship.schemas import TaskPool, check_name, parse, read_yaml

    data = read_yaml(path, TaskError, "task pool file")
    pool = parse(TaskPool, data if data is not None else {}, str(path), TaskError)
    names: list[str] = []
    for item in pool.defaults:
        if isinstance(item, dict):
            for key, value in item.items():
                if str(key).endswith("@test_datasets"):
                    names += list(value) if isinstance(value, list) else [value]
    names += [n for n in pool.test_datasets or {} if n not in names]
    if not names:
        raise TaskError(f"{path}: no test_datasets in this task pool")
    for name in names:
        check_name(name, f"{path}: task name")
    return names


def read_lines(path: Path, what: str) -> tuple[str, ...]:
    """One entry per line (blank lines and ``#`` comments skipped)."""
    from clipship.schemas import MAX_YAML_BYTES, read_text

    text = read_text(path, TaskError, f"{what} file", MAX_YAML_BYTES)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise TaskError(f"{path}: no {what} in the file")
    return tuple(lines)


def custom_task(
    name: str, data: str, classnames: Path | None = None, templates: Path | None = None
) -> Task:
    """A task on your own ImageFolder: class names default to the folder names (``_`` → space),
    templates to ``a photo of a {c}.``."""
    if classnames is not None:
        names = read_lines(classnames, "class names")
    else:
        folder = Path(data)
        if not folder.is_dir():
            raise TaskError(
                f"task {name}: {data} is not a folder (give `classnames` for other data)",
                option="classnames",
            )
        names = tuple(p.name.replace("_", " ") for p in sorted(folder.iterdir()) if p.is_dir())
        if not names:
            raise TaskError(f"task {name}: {data} has no class folders")
    chosen = read_lines(templates, "templates") if templates is not None else DEFAULT_TEMPLATES
    return checked(Task(name, names, chosen, None, str(data)))


def checked(task: Task) -> Task:
    """``task`` if it can make a classifier: class names, all different, and templates that
    each name the class (a template without ``{c}`` gives every class the same head, and a
    meaningless accuracy)."""
    if not task.classnames or not all(isinstance(c, str) and c.strip() for c in task.classnames):
        raise TaskError(f"task {task.name}: class names must be a non-empty list of names")
    if len(set(task.classnames)) != len(task.classnames):
        twice = next(c for c in task.classnames if task.classnames.count(c) > 1)
        raise TaskError(f"task {task.name}: class name {twice!r} is given twice")
    if not task.templates or not all(isinstance(t, str) for t in task.templates):
        raise TaskError(f"task {task.name}: templates must be a non-empty list of texts")
    for template in task.templates:
        if PLACEHOLDER not in template:
            raise TaskError(
                f"task {task.name}: template {template!r} has no {PLACEHOLDER} placeholder"
            )
    return task


def with_local_data(tasks: list[Task], data_dir: Path | None) -> list[Task]:
    """Point each task at ``data_dir/<task>`` when that exists. A task that already names its
    local data (a task file, ``--task NAME=PATH``) cannot take another copy: which one was meant
    is not ours to guess."""
    if data_dir is None:
        return tasks
    if not Path(data_dir).is_dir():
        raise TaskError(f"`data_dir` {data_dir}: no such folder", option="data_dir")
    out = []
    for task in tasks:
        local = Path(data_dir) / task.name
        if local.exists() and task.data is not None and Path(task.data) != local:
            raise TaskError(
                f"task {task.name}: its data is given already ({task.data}) and `data_dir` "
                f"gives another copy ({local}); use one",
                option="data_dir",
            )
        out.append(replace(task, data=str(local)) if local.exists() else task)
    return out


def read_taskfile(path: Path) -> list[Task]:
    """Tasks from a JSON task file (``clipship.schemas.TaskFile``):
    ``{"tasks": {name: {classnames, templates?, data?, dataset?}}}``; ``data`` paths are
    relative to the file (the mini-benchmark writes one)."""
    from clipship.schemas import TaskFile, parse, read_json

    data = read_json(path, TaskError, "task file")
    if not isinstance(data, dict) or "tasks" not in data:
        raise TaskError(f"{path}: not a task file (expected {{'tasks': {{name: ...}}}})")
    spec = parse(TaskFile, data, str(path), TaskError)
    tasks = []
    for name, t in spec.tasks.items():
        data_path = t.data
        if data_path is not None and not Path(data_path).is_absolute():
            data_path = str(Path(path).parent / data_path)
        try:
            task = Task(name, tuple(t.classnames), tuple(t.templates), t.dataset, data_path)
            tasks.append(checked(task))
        except TaskError as e:
            raise TaskError(f"{path}: {e}") from None
    return tasks


def select_tasks(
    names: str | None = None,
    taskpool: Path | None = None,
    custom: list[str] | None = None,
    classnames: Path | None = None,
    templates: Path | None = None,
    data_dir: Path | None = None,
    taskfile: Path | None = None,
) -> list[Task]:
    """The tasks a command runs on: built-in names (or a FusionBench task pool, or a task file)
    plus custom ``NAME=PATH`` ImageFolder tasks; ``data_dir/<task>`` replaces a hub source."""
    from clipship.schemas import check_name

    chosen: list[Task] = []
    if taskpool is not None:
        chosen += get_tasks(read_taskpool_yaml(taskpool))
    if taskfile is not None:
        listed = read_taskfile(taskfile)
        wanted = [n for n in (names or "").split(",") if n and n != "all"]
        unknown = [n for n in wanted if n not in {t.name for t in listed}]
        if unknown:
            raise TaskError(f"unknown task {unknown[0]!r} in {taskfile}")
        chosen += [t for t in listed if not wanted or t.name in wanted]
    elif names:
        chosen += get_tasks(names)
    for item in custom or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TaskError(f"`task` {item!r}: expected NAME=PATH", option="task")
        check_name(name, "`task` name", option="task")
        chosen.append(custom_task(name, path, classnames, templates))
    if not chosen:
        raise TaskError(
            "no tasks: give `tasks` all (or names), `taskpool` FILE or `task` NAME=PATH",
            option="tasks",
        )
    seen: set[str] = set()
    for task in chosen:
        if task.name in seen:
            raise TaskError(f"task {task.name!r} is given twice")
        seen.add(task.name)
    return with_local_data(chosen, data_dir)
