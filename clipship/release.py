"""`clipship release RELEASE.yaml`: merge → eval → export → card → push in one gated command.

Each stage writes its own folder under ``RUN_DIR/stages/`` atomically, with a ``stage.json`` that
holds the hash of everything the stage read (configuration, input weights, task definitions,
the previous stage's key). A re-run reuses every stage whose key is unchanged, so the same inputs
give the same bytes. The release folder ``RUN_DIR/release/`` (what is pushed) is assembled from
the stages, the card is written into it, and the push happens only when every gate passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from clipship.errors import ReleaseConfigError
from clipship.eval.request import EvalRequest
from clipship.exporter.request import ExportRequest
from clipship.merge.request import MergeRequest
from clipship.outputs import atomic_folder, remove_stale_temporaries
from clipship.reports import EvalReport, ExportReport, read_eval_reports
from clipship.requests import Sources, TaskSpec, local_path, resolve_sources

SECTIONS = {
    "name": None,
    "pool": {"minibench", "seed", "yaml", "pretrained", "models"},
    "method": None,
    "parameters": None,
    "seed": None,
    "eval": {"tasks", "taskfile", "data_dir", "baselines", "batch_size", "limit", "device"},
    "gates": {"min_average_accuracy", "min_accuracy", "max_drop", "export"},
    "export": {
        "precisions",
        "validation_size",
        "validation_data",
        "tensorrt",
        "max_batch",
        "int8_scheme",
    },
    "card": {"license", "name", "base_model"},
    "hub": {"repo_id", "private", "revision", "tag", "message"},
}
EXPORT_GATES = {"max_logit_diff", "min_agreement_fp32", "min_agreement_fp16", "min_agreement_int8"}


def read_config(path: Path) -> dict[str, Any]:
    from clipship.pool import read_yaml

    path = Path(path)
    config = read_yaml(path, ReleaseConfigError, "release file")
    if not isinstance(config, dict):
        raise ReleaseConfigError(f"{path}: a release file is a mapping (pool:, method:, ...)")
    for key, value in config.items():
        if key not in SECTIONS:
            raise ReleaseConfigError(f"{path}: unknown key {key!r} (known: {', '.join(SECTIONS)})")
        allowed = SECTIONS[key]
        if allowed is not None:
            if not isinstance(value, dict):
                raise ReleaseConfigError(f"{path}: {key}: expected a mapping")
            extra = sorted(set(value) - allowed)
            if extra:
                raise ReleaseConfigError(
                    f"{path}: {key}.{extra[0]}: unknown (known: {', '.join(sorted(allowed))})"
                )
    for required in ("pool", "method"):
        if required not in config:
            raise ReleaseConfigError(f"{path}: missing {required}:")
    export_gates = config.get("gates", {}).get("export") or {}
    extra = sorted(set(export_gates) - EXPORT_GATES)
    if extra:
        raise ReleaseConfigError(f"{path}: gates.export.{extra[0]}: unknown")
    if export_gates and config.get("export") is None:
        raise ReleaseConfigError(f"{path}: gates.export needs an export: section to gate")
    try:
        _check_values(config)
    except ReleaseConfigError as e:
        raise ReleaseConfigError(f"{path}: {e}") from None
    config["_base"] = path.resolve().parent
    return config


def _check_values(config: dict[str, Any]) -> None:
    """Every value's type and range, before any stage runs (a typo found after the merge and
    the evaluation costs the whole run)."""
    from clipship.cards.push import check_repo_id
    from clipship.exporter.onnx_export import FILES
    from clipship.exporter.quantize import DEFAULT_SCHEME, SCHEMES
    from clipship.merge.registry import get_method

    def fail(where: str, value: Any, expected: str) -> None:
        raise ReleaseConfigError(f"{where}: {value!r} is not {expected}")

    def integer(where: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            fail(where, value, f"a whole number ≥ {low}")

    def fraction(where: str, value: Any, low: float = 0.0) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(where, value, "a number")
        if not low <= value <= 1:
            fail(where, value, f"between {low:g} and 1")

    def text(where: str, value: Any) -> None:
        if not isinstance(value, str) or not value:
            fail(where, value, "a text")

    def flag(where: str, value: Any) -> None:
        if not isinstance(value, bool):
            fail(where, value, "true or false")

    if "name" in config:
        text("name", config["name"])
        check_name(config["name"])
    text("method", config["method"])
    method = get_method(config["method"])
    parameters = config.get("parameters") or {}
    if not isinstance(parameters, dict):
        fail("parameters", parameters, "a mapping")
    method.resolve(parameters)  # unknown or invalid parameters: MethodError, one line
    if "seed" in config:
        integer("seed", config["seed"], 0)
    pool = config["pool"]
    if "seed" in pool:
        integer("pool.seed", pool["seed"], 0)
    for key in ("yaml", "pretrained"):
        if key in pool:
            text(f"pool.{key}", pool[key])
    spec = config.get("eval") or {}
    tasks = spec.get("tasks", "pool")
    if not (isinstance(tasks, str) and tasks) and not (
        isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks)
    ):
        fail("eval.tasks", tasks, "pool, a task name or a list of them")
    for key in ("batch_size", "limit"):
        if spec.get(key) is not None:
            integer(f"eval.{key}", spec[key], 1)
    for key in ("taskfile", "data_dir", "device"):
        if key in spec:
            text(f"eval.{key}", spec[key])
    if "baselines" in spec:
        flag("eval.baselines", spec["baselines"])
    gates = config.get("gates") or {}
    if "min_average_accuracy" in gates:
        fraction("gates.min_average_accuracy", gates["min_average_accuracy"])
    minimum = gates.get("min_accuracy")
    if isinstance(minimum, dict):
        for task, value in minimum.items():
            fraction(f"gates.min_accuracy.{task}", value)
    elif minimum is not None:
        fraction("gates.min_accuracy", minimum)
    if "max_drop" in gates:
        fraction("gates.max_drop", gates["max_drop"], low=-1.0)
    for key, value in (gates.get("export") or {}).items():
        if key == "max_logit_diff":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                fail("gates.export.max_logit_diff", value, "a number ≥ 0")
        else:
            fraction(f"gates.export.{key}", value)
    export = config.get("export")
    if export is not None:
        precisions = export.get("precisions", ["fp32"])
        known = tuple(FILES)
        if not isinstance(precisions, list) or not precisions or not set(precisions) <= set(known):
            fail("export.precisions", precisions, f"a non-empty list of {', '.join(known)}")
        if "validation_size" in export:
            integer("export.validation_size", export["validation_size"], 1)
        if "max_batch" in export:
            integer("export.max_batch", export["max_batch"], 32)
        if "tensorrt" in export:
            flag("export.tensorrt", export["tensorrt"])
        if "validation_data" in export:
            text("export.validation_data", export["validation_data"])
        if export.get("int8_scheme", DEFAULT_SCHEME) not in SCHEMES:
            fail("export.int8_scheme", export["int8_scheme"], f"one of {', '.join(SCHEMES)}")
    for key, value in (config.get("card") or {}).items():
        text(f"card.{key}", value)
    hub = config.get("hub") or {}
    for key in ("revision", "tag", "message"):
        if key in hub:
            text(f"hub.{key}", hub[key])
    if "private" in hub:
        flag("hub.private", hub["private"])
    if "repo_id" in hub:
        check_repo_id(hub["repo_id"], "hub.repo_id")


def _path(config: dict[str, Any], value: str | None) -> Path | None:
    """Paths in a release file are relative to the file."""
    return None if value is None else local_path(value, config["_base"])


def resolve_pool(config: dict[str, Any], quiet: bool) -> Sources:
    """The pool the release names (the mini-benchmark comes with its task file)."""
    pool = config["pool"]
    chosen = [k for k in ("minibench", "yaml", "pretrained") if k in pool]
    if len(chosen) != 1:
        raise ReleaseConfigError(
            "pool: give exactly one of minibench:, yaml:, pretrained: + models:"
        )
    if "minibench" in pool:
        from clipship.minibench.build import pool_sources

        return pool_sources(str(pool["minibench"]), int(pool.get("seed", 0)), quiet)
    if "yaml" in pool:
        return resolve_sources(pool["yaml"], base=config["_base"])
    models = pool.get("models")
    if not isinstance(models, dict) or not models:
        raise ReleaseConfigError("pool.models: a mapping of task name → source")
    return resolve_sources(pretrained=pool["pretrained"], models=models, base=config["_base"])


def fingerprint(source: str) -> Any:
    """What identifies a model source: a hub id's resolved commit, or every file's sha256 of a
    local folder (hidden files aside)."""
    from clipship.hashing import tree_sha256
    from clipship.pool import resolve_folder

    folder, repo_id, commit = resolve_folder(source)
    if repo_id:
        return f"{repo_id}@{commit}"
    return tree_sha256(folder, skip_hidden=True)


def data_fingerprint(path: str | Path | None) -> Any:
    """Local data (test sets, validation images) by name, size and modification time: cheap for
    thousands of images, and any edit changes it."""
    if path is None or not Path(path).exists():
        return path
    path = Path(path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [
        (
            f.relative_to(path).as_posix() if path.is_dir() else f.name,
            f.stat().st_size,
            f.stat().st_mtime_ns,
        )
        for f in files
        if f.is_file()
    ]


def key_of(*parts: Any) -> str:
    """A stage key: its inputs, plus the versions that compute it."""
    from clipship.outputs import library_versions

    text = json.dumps(
        [library_versions(), *parts], sort_keys=True, default=str, separators=(",", ":")
    )
    return hashlib.sha256(text.encode()).hexdigest()


class Stages:
    """Stage folders under ``root``, reused when their input key is unchanged and every file
    they wrote still has the sha256 recorded in their ``stage.json``."""

    def __init__(self, root: Path, log):
        self.root, self.log, self.record = root, log, {}

    def run(self, name: str, key: str, build) -> Path:
        folder = self.root / name
        marker = folder / "stage.json"
        try:
            record = json.loads(marker.read_text()) if marker.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = {"key": key, "files": {"stage.json": "unreadable"}}  # damaged: rebuild
        damaged = None
        if record.get("key") == key:
            damaged = _damaged(folder, record.get("files"))
            if damaged is None:
                self.log(f"{name}: reused (inputs unchanged)")
                self.record[name] = {"key": key, "reused": True}
                return folder
            self.log(f"{name}: {damaged} since it was built; running it again")
        else:
            self.log(f"{name}: running")
        started = time.perf_counter()
        with atomic_folder(folder, force=True) as tmp:
            build(tmp)
            files = _digests(tmp)
            (tmp / "stage.json").write_text(json.dumps({"key": key, "files": files}) + "\n")
        seconds = round(time.perf_counter() - started, 1)
        self.log(f"{name}: done in {seconds} s")
        self.record[name] = {"key": key, "reused": False, "seconds": seconds}
        if damaged:
            self.record[name]["rebuilt"] = damaged
        return folder


def _digests(folder: Path) -> dict[str, str]:
    from clipship.hashing import tree_sha256

    return {
        path: digest
        for path, digest in tree_sha256(folder).items()
        if Path(path).name != "stage.json"
    }


def _damaged(folder: Path, files: dict[str, str] | None) -> str | None:
    """Why a stage folder no longer holds what it wrote (None: it does)."""
    if not files:
        return "its record lists no files (an older clipship wrote it)"
    now = _digests(folder)
    for path, digest in files.items():
        if path not in now:
            return f"{path} was removed"
        if now[path] != digest:
            return f"{path} changed"
    extra = sorted(set(now) - set(files))
    return f"{extra[0]} was added" if extra else None


NAME = re.compile(r"[A-Za-z0-9._-]+")
RUN_MARKER = ".clipship-release"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise ReleaseConfigError(
            f"name: {name!r}: a release name is letters, digits, '.', '_' and '-' (it names the "
            "folder release_out/<name>; use `run_dir` for another place)",
            option="run_dir",
        )
    return name


def claim_run_dir(run: Path, force: bool) -> None:
    """Use ``run`` only if it is new, empty or made by an earlier release (its marker file):
    the release replaces its ``stages/`` and ``release/``, which must not be someone else's."""
    if run.exists() and not run.is_dir():
        raise ReleaseConfigError(f"{run}: exists and is not a folder")
    if run.is_dir() and any(run.iterdir()) and not (run / RUN_MARKER).is_file() and not force:
        raise ReleaseConfigError(
            f"{run} already holds files that clipship release did not write (pass `force` to "
            "use it: its stages/ and release/ are replaced)",
            option="force",
        )
    run.mkdir(parents=True, exist_ok=True)
    (run / RUN_MARKER).write_text("made by clipship release\n")
    for name in ("merge", "eval", "export"):
        remove_stale_temporaries(run / "stages" / name)
    remove_stale_temporaries(run / "release")


def task_spec(config: dict[str, Any], sources: Sources) -> TaskSpec:
    """The tasks the release evaluates (and validates the export on): the pool's by default."""
    spec = config.get("eval", {})
    names = spec.get("tasks", "pool")
    if names == "pool":
        names = list(sources.models)
    return TaskSpec(
        ",".join(names) if isinstance(names, list) else str(names),
        data_dir=_path(config, spec.get("data_dir")),
        taskfile=_path(config, spec.get("taskfile")) or sources.taskfile,
    )


def eval_request(config: dict[str, Any], tasks: TaskSpec, sources: Sources) -> EvalRequest:
    """The eval section as the request ``clipship eval`` makes (its model comes later)."""
    spec = config.get("eval", {})
    settings = {k: spec[k] for k in ("device", "batch_size", "limit") if spec.get(k) is not None}
    return EvalRequest(tasks, workers=0, **settings)


def _evaluate(stage: Path, model: Path, request: EvalRequest, sources: Sources, baselines: bool):
    """Heads, then the merged model's report (with the pretrained model's and each fine-tuned
    model's on its own task as baselines); timings kept apart from the report."""
    from clipship.eval import build_heads, save_heads

    tasks = request.tasks.select()
    heads, meta = build_heads(sources.pretrained or "", tasks)
    save_heads(stage / "heads", heads, meta, force=False)
    request = dataclasses.replace(request, heads=stage / "heads")
    reports = {"merged": dataclasses.replace(request, model=str(model)).run().reports}
    if baselines:
        reports["pretrained"] = dataclasses.replace(request, model=sources.pretrained).run().reports
        individual = {}
        evaluated = {t.name for t in tasks}
        for name, source in sources.models.items():
            if name in evaluated:
                one = dataclasses.replace(
                    request,
                    model=source,
                    pretrained=sources.pretrained,
                    tasks=dataclasses.replace(request.tasks, names=name),
                )
                individual[name] = one.run().reports.tasks[name]
        reports["individual"] = EvalReport(individual)
    timings = {}  # kept out of the report, which must be the same bytes on every run
    report = {}
    for label, single in reports.items():
        report[label] = single.to_json()
        for task, row in report[label].items():
            if isinstance(row, dict) and "images_per_second" in row:
                timings[f"{label}/{task}"] = row.pop("images_per_second")
    (stage / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (stage / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")


def accuracy_gates(gates: dict[str, Any], reports: dict[str, EvalReport]) -> list[dict[str, Any]]:
    """Every accuracy gate with its value, limit and verdict (accuracies are fractions)."""
    merged = reports["merged"].accuracies()
    out = []

    def check(name: str, value: float, limit: float, at_least: bool) -> None:
        passed = value >= limit if at_least else value <= limit
        op = "≥" if at_least else "≤"
        out.append({"gate": name, "value": value, "limit": limit, "op": op, "passed": passed})

    if "min_average_accuracy" in gates:
        average = (reports["merged"].average or {})["accuracy"]
        check("average accuracy", average, float(gates["min_average_accuracy"]), True)
    minimum = gates.get("min_accuracy")
    if minimum is not None:
        limits = minimum if isinstance(minimum, dict) else dict.fromkeys(merged, minimum)
        for task, limit in limits.items():
            if task not in merged:
                raise ReleaseConfigError(f"gates.min_accuracy.{task}: not an evaluated task")
            check(f"{task} accuracy", merged[task], float(limit), True)
    if "max_drop" in gates:
        individual = reports.get("individual")
        if not individual or not individual.tasks:
            raise ReleaseConfigError("gates.max_drop needs eval.baselines: true")
        for task, accuracy in individual.accuracies().items():
            drop = accuracy - merged[task]
            check(f"{task} drop vs its fine-tuned model", drop, float(gates["max_drop"]), False)
    return out


def _assemble(out: Path, merged: Path, evaluated: Path, exported: Path | None, card: dict) -> Path:
    """The release folder: model files, heads, eval report, export, then the card."""
    from clipship.cards.card import write_card

    def link(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    parts = [(merged / "model", ""), (evaluated / "heads", "heads/")]
    if exported is not None:
        parts.append((exported / "export", "export/"))
    with atomic_folder(out, force=True) as tmp:
        for folder, prefix in parts:
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    link(file, tmp / prefix / file.relative_to(folder))
        link(evaluated / "eval_report.json", tmp / "eval_report.json")
        write_card(
            tmp,
            license=card.get("license"),
            name=card.get("name"),
            base_model=card.get("base_model"),
        )
    return out


def release(
    config_path: Path | str,
    run_dir: Path | str | None = None,
    *,
    repo_id: str | None = None,
    tag: str | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Run the release; returns the summary (``status`` is ``released``, ``dry_run``,
    ``built`` without a hub target, or ``gate_failed``). ``force`` allows a ``run_dir`` that
    holds files clipship release did not write."""
    config = read_config(Path(config_path))
    exporting = config.get("export") is not None
    if exporting:
        export_request(config, Path(), Path()).check()  # before any stage runs
    name = check_name(str(config.get("name") or Path(config_path).stem))
    run = Path(run_dir) if run_dir else Path("release_out") / name

    def log(message: str) -> None:
        if not quiet:
            print(f"[release] {message}", file=sys.stderr, flush=True)

    if repo_id is not None:
        from clipship.cards.push import check_repo_id

        check_repo_id(repo_id)
    claim_run_dir(run, force)
    sources = resolve_pool(config, quiet)
    tasks = task_spec(config, sources)
    evaluation = eval_request(config, tasks, sources)
    evaluation.check_settings()
    stages = Stages(run / "stages", log)
    summary: dict[str, Any] = {"name": name, "run_dir": str(run), "stages": stages.record}

    selected = tasks.select()
    merged, merge_key = _merge_stage(config, stages, sources, tasks, selected)
    spec = config.get("eval", {})
    eval_key = key_of(
        "eval/2",
        merge_key,
        [dataclasses.asdict(t) for t in selected],
        [data_fingerprint(t.data) for t in selected],
        spec,
    )
    baselines = bool(spec.get("baselines", True))
    evaluated = stages.run(
        "eval",
        eval_key,
        lambda tmp: _evaluate(tmp, merged / "model", evaluation, sources, baselines),
    )
    reports = read_eval_reports(
        json.loads((evaluated / "eval_report.json").read_text()), "eval_report.json"
    )
    summary["accuracy"] = {label: report.accuracies() for label, report in reports.items()}
    summary["gates"] = accuracy_gates(config.get("gates") or {}, reports)
    failed = [g for g in summary["gates"] if not g["passed"]]
    if failed:
        return _failed(summary, failed)

    exported = None
    if exporting:
        request = export_request(config, merged / "model", evaluated / "heads", tasks)
        exported, failure = _export_stage(request, stages, eval_key)
        if exported is not None:
            summary["export"] = _export_figures(exported / "export" / "export_report.json")
        if failure:
            summary["gates"].append(failure)
            return _failed(summary, [failure])

    card = dict(config.get("card") or {})
    hub = config.get("hub") or {}
    repo = repo_id or hub.get("repo_id")
    card.setdefault("name", repo or name)
    out = _assemble(run / "release", merged, evaluated, exported, card)
    summary.update(status="built", release_dir=str(out), card=str(out / "README.md"))
    log(f"release folder: {out}")
    if repo:
        from clipship.cards.push import push

        log(f"push: {repo}" + (" (dry run)" if dry_run else ""))
        summary["push"] = push(
            out,
            repo,
            revision=hub.get("revision"),
            tag=tag or hub.get("tag"),
            private=bool(hub.get("private", False)),
            message=hub.get("message"),
            dry_run=dry_run,
            prune=True,  # the release folder is the whole release: stale files go
        ).to_json()
        summary["status"] = "dry_run" if dry_run else "released"
    return summary


def _merge_stage(
    config: dict[str, Any], stages: Stages, sources: Sources, tasks: TaskSpec, selected: list
) -> tuple[Path, str]:
    """The merge, as ``clipship merge`` runs it, cached under its inputs' key. A data-aware
    method reads each task model's images from the tasks the eval section names."""
    from clipship.merge.registry import get_method

    data_aware = get_method(config["method"]).data is not None
    request = MergeRequest(
        sources,
        Path("model"),
        method=config["method"],
        params=dict(config.get("parameters") or {}),
        seed=int(config.get("seed", 0)),
        tasks=dataclasses.replace(tasks, names=None) if data_aware else TaskSpec(),
    )
    request.check()
    images = [data_fingerprint(t.data) for t in selected] if data_aware else []
    key = key_of(
        "merge/1",
        {
            n: fingerprint(s)
            for n, s in {"pretrained": sources.pretrained, **sources.models}.items()
        },
        list(sources.models),
        request.method,
        request.params,
        request.seed,
        *([images] if images else []),
    )

    def build(tmp: Path) -> None:
        dataclasses.replace(request, out=tmp / "model").run()

    return stages.run("merge", key, build), key


def export_request(
    config: dict[str, Any], model: Path, heads: Path, tasks: TaskSpec | None = None
) -> ExportRequest:
    """The export section as the request ``clipship export`` makes, gates included."""
    from clipship.exporter.onnx_export import Gates

    spec = dict(config["export"] or {})
    limits = config.get("gates", {}).get("export") or {}
    gates = Gates(**{k: float(v) for k, v in limits.items()})
    if "validation_data" in spec:
        spec["validation_data"] = _path(config, spec["validation_data"])
    if "precisions" in spec:
        spec["precisions"] = tuple(spec["precisions"])
    return ExportRequest(
        str(model), heads, Path("export"), tasks or TaskSpec(), gates=gates, **spec
    )


def _export_stage(request: ExportRequest, stages: Stages, eval_key: str):
    from clipship.exporter.onnx_export import ExportValidationError

    settings = {
        k: v
        for k, v in dataclasses.asdict(request).items()
        if k not in ("model", "heads", "out", "tasks")
    }
    data = request.validation_data
    key = key_of("export/2", eval_key, settings, data_fingerprint(data))

    def build(tmp: Path) -> None:
        dataclasses.replace(request, out=tmp / "export").run()

    try:
        return stages.run("export", key, build), None
    except ExportValidationError as e:
        return None, {"gate": "export validation", "passed": False, "message": str(e)}


def _export_figures(path: Path) -> dict[str, Any]:
    return ExportReport.from_json(json.loads(path.read_text()), str(path)).summary()


def _failed(summary: dict[str, Any], failed: list[dict[str, Any]]) -> dict[str, Any]:
    summary["status"] = "gate_failed"
    summary["failed"] = [describe(g) for g in failed]
    stale = Path(summary["run_dir"]) / "release"
    if stale.is_symlink() or stale.is_file():  # an earlier run's release must not look current
        stale.unlink()
    elif stale.exists():
        shutil.rmtree(stale)
    return summary


def describe(gate: dict[str, Any]) -> str:
    if "message" in gate:
        return f"{gate['gate']}: {gate['message']}"
    return f"{gate['gate']} {gate['value']:.4f} (needs {gate['op']} {gate['limit']})"
