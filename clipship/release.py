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
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from clipship.errors import ClipshipError, OutputError, ReleaseConfigError
from clipship.eval.request import EvalRequest
from clipship.exporter.request import ExportRequest
from clipship.merge.request import MergeRequest
from clipship.outputs import (
    atomic_folder,
    check_beneath,
    json_text,
    refuse_link,
    remove_output,
    remove_stale_temporaries,
)
from clipship.release_file import Gates, ReleaseFile, read_release_file
from clipship.reports import EvalReport, ExportReport, read_eval_reports
from clipship.requests import Sources, TaskSpec, local_path, resolve_sources
from clipship.schemas import StageRecord, check_revision, parse, read_json


def read_config(path: Path) -> ReleaseFile:
    """The release file, parsed by its schema (``clipship.release_file``)."""
    return read_release_file(Path(path))


def resolve_pool(config: ReleaseFile, base: Path, quiet: bool) -> Sources:
    """The pool the release names (the mini-benchmark comes with its task file)."""
    pool = config.pool
    if pool.minibench is not None:
        from clipship.minibench.build import pool_sources

        return pool_sources(pool.minibench, pool.seed, quiet)
    if pool.yaml is not None:
        return resolve_sources(pool.yaml, base=base)
    return resolve_sources(pretrained=pool.pretrained, models=dict(pool.models or {}), base=base)


def fingerprint(source: str) -> Any:
    """What identifies a model source: a hub id's resolved commit, or every file's sha256 of a
    local folder (hidden files aside)."""
    from clipship.hashing import tree_sha256
    from clipship.pool import resolve_folder

    folder, repo_id, commit = resolve_folder(source)
    if repo_id:
        return f"{repo_id}@{commit}"
    return tree_sha256(folder, skip_hidden=True)


def pool_fingerprint(sources: Sources) -> dict[str, Any]:
    return {
        n: fingerprint(s) for n, s in {"pretrained": sources.pretrained, **sources.models}.items()
    }


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
    """Stage folders under ``run/stages``, reused when their input key is unchanged and every
    file they wrote still has the sha256 recorded in their ``stage.json``. Nothing is written
    through a link: a link anywhere in a stage folder makes it damaged (rebuilt), and one at
    ``stages/`` or a stage's name is refused."""

    def __init__(self, run: Path, log):
        self.run, self.root, self.log, self.record = run, run / "stages", log, {}

    def run_stage(self, name: str, key: str, build) -> Path:
        folder = self.root / name
        check_beneath(self.run, folder)
        record = _stage_record(folder / "stage.json")
        damaged = None
        if record is not None and record.key == key:
            damaged = _damaged(folder, record.files)
            if damaged is None:
                self.log(f"{name}: reused (inputs unchanged)")
                self.record[name] = {"key": key, "reused": True}
                return folder
            self.log(f"{name}: {damaged} since it was built; running it again")
        else:
            self.log(f"{name}: running")
        started = time.perf_counter()
        with atomic_folder(folder, force=True, root=self.run) as tmp:
            build(tmp)
            files = _digests(tmp)
            (tmp / "stage.json").write_text(json_text({"key": key, "files": files}, "stage.json"))
        seconds = round(time.perf_counter() - started, 1)
        self.log(f"{name}: done in {seconds} s")
        self.record[name] = {"key": key, "reused": False, "seconds": seconds}
        if damaged:
            self.record[name]["rebuilt"] = damaged
        return folder


def _stage_record(path: Path) -> StageRecord | None:
    """A stage's record; None when there is none or it is damaged (the stage runs again)."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return parse(StageRecord, read_json(path, ClipshipError, "stage record"), str(path))
    except ClipshipError:
        return None


def _digests(folder: Path) -> dict[str, str]:
    from clipship.hashing import tree_sha256

    return {
        path: digest
        for path, digest in tree_sha256(folder).items()
        if Path(path).name != "stage.json"
    }


def _damaged(folder: Path, files: dict[str, str]) -> str | None:
    """Why a stage folder no longer holds what it wrote (None: it does)."""
    if not files:
        return "its record lists no files"
    links = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink())
    if links:
        return f"{links[0]} is a link"
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
# What a release writes in its run folder; none of these may be a link.
RUN_NAMES = (RUN_MARKER, "stages", "release", "stages/merge", "stages/eval", "stages/export")


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
    the release replaces its ``stages/`` and ``release/``, which must not be someone else's.
    Nothing it writes there may be a link (a planted ``stages`` link would make the release
    replace a folder elsewhere); a folder that cannot be written is one line, up front."""
    refuse_link(run)
    if run.exists() and not run.is_dir():
        raise ReleaseConfigError(f"{run}: exists and is not a folder")
    for name in RUN_NAMES:
        refuse_link(run / name)
    marker = run / RUN_MARKER
    if run.is_dir() and any(run.iterdir()) and not marker.is_file() and not force:
        raise ReleaseConfigError(
            f"{run} already holds files that clipship release did not write (pass `force` to "
            "use it: its stages/ and release/ are replaced)",
            option="force",
        )
    try:
        run.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link planted after the check above is refused by the kernel.
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write("made by clipship release\n")
    except OSError as e:
        raise OutputError(f"cannot write the run folder {run}: {e.strerror}") from None
    for name in ("merge", "eval", "export"):
        remove_stale_temporaries(run / "stages" / name)
    remove_stale_temporaries(run / "release")


def task_spec(config: ReleaseFile, base: Path, sources: Sources) -> TaskSpec:
    """The tasks the release evaluates (and validates the export on): the pool's by default."""
    spec = config.eval
    names = spec.tasks
    if names == "pool":
        names = list(sources.models)
    return TaskSpec(
        ",".join(names) if isinstance(names, list) else str(names),
        data_dir=_path(base, spec.data_dir),
        taskfile=_path(base, spec.taskfile) or sources.taskfile,
    )


def _path(base: Path, value: str | None) -> Path | None:
    """Paths in a release file are relative to the file."""
    return None if value is None else local_path(value, base)


def eval_request(config: ReleaseFile, tasks: TaskSpec) -> EvalRequest:
    """The eval section as the request ``clipship eval`` makes (its model comes later)."""
    spec = config.eval
    settings = {k: getattr(spec, k) for k in ("device", "batch_size", "limit")}
    return EvalRequest(tasks, workers=0, **{k: v for k, v in settings.items() if v is not None})


def check_gate_tasks(gates: Gates, evaluated: list[str]) -> None:
    """Every task a gate names is evaluated: checked before any stage runs."""
    if isinstance(gates.min_accuracy, dict):
        for task in gates.min_accuracy:
            if task not in evaluated:
                raise ReleaseConfigError(
                    f"gates.min_accuracy.{task}: not an evaluated task "
                    f"(evaluated: {', '.join(evaluated)})"
                )


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
    (stage / "eval_report.json").write_text(json_text(report, "eval_report.json"))
    (stage / "timings.json").write_text(json_text(timings, "timings.json"))


def accuracy_gates(gates: Gates, reports: dict[str, EvalReport]) -> list[dict[str, Any]]:
    """Every accuracy gate with its value, limit and verdict (accuracies are fractions). A value
    that is not a finite number fails its gate."""
    merged = reports["merged"].accuracies()
    out = []

    def check(name: str, value: Any, limit: float, at_least: bool) -> None:
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        passed = finite and (value >= limit if at_least else value <= limit)
        op = "≥" if at_least else "≤"
        out.append({"gate": name, "value": value, "limit": limit, "op": op, "passed": passed})

    if gates.min_average_accuracy is not None:
        average = (reports["merged"].average or {}).get("accuracy")
        check("average accuracy", average, gates.min_average_accuracy, True)
    minimum = gates.min_accuracy
    if minimum is not None:
        limits = minimum if isinstance(minimum, dict) else dict.fromkeys(merged, minimum)
        for task, limit in limits.items():
            if task not in merged:
                raise ReleaseConfigError(f"gates.min_accuracy.{task}: not an evaluated task")
            check(f"{task} accuracy", merged[task], limit, True)
    if gates.max_drop is not None:
        individual = reports.get("individual")
        if not individual or not individual.tasks:
            raise ReleaseConfigError("gates.max_drop needs eval.baselines: true")
        for task, accuracy in individual.accuracies().items():
            drop = accuracy - merged[task]
            check(f"{task} drop vs its fine-tuned model", drop, gates.max_drop, False)
    return out


def _assemble(run: Path, merged: Path, evaluated: Path, exported: Path | None, card: dict) -> Path:
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
    out = run / "release"
    with atomic_folder(out, force=True, root=run) as tmp:
        for folder, prefix in parts:
            for file in sorted(folder.rglob("*")):
                if file.is_file() and not file.is_symlink():
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
    ``built`` without a hub target, ``gate_failed`` or ``push_failed``). ``force`` allows a
    ``run_dir`` that holds files clipship release did not write. The release folder of an
    earlier run is removed first: whatever stops this run, no stale ``release/`` looks current."""
    path = Path(config_path)
    config = read_config(path)
    base = path.resolve().parent
    exporting = config.export is not None
    if exporting:
        export_request(config, base, Path(), Path()).check()  # before any stage runs
    name = check_name(config.name or path.stem)
    run = Path(run_dir) if run_dir else Path("release_out") / name

    def log(message: str) -> None:
        if not quiet:
            print(f"[release] {message}", file=sys.stderr, flush=True)

    if repo_id is not None:
        from clipship.cards.push import check_repo_id

        check_repo_id(repo_id)
    if tag is not None:
        check_revision(tag, "`tag`", option="tag")
    claim_run_dir(run, force)
    remove_output(run / "release")
    sources = resolve_pool(config, base, quiet)
    tasks = task_spec(config, base, sources)
    evaluation = eval_request(config, tasks)
    evaluation.check_settings()
    selected = tasks.select()
    check_gate_tasks(config.gates, [t.name for t in selected])
    stages = Stages(run, log)
    summary: dict[str, Any] = {"name": name, "run_dir": str(run), "stages": stages.record}

    swept = None
    if config.swept():
        swept = _sweep_stage(config, stages, sources, tasks, selected, quiet)
        report = read_json(swept[0] / "sweep" / "sweep.json", ClipshipError, "sweep report")
        summary["sweep"] = {
            "chosen": report["best"]["parameters"],
            "select_on": report["selection"]["split"],
        }
    merged, merge_key = _merge_stage(config, stages, sources, tasks, selected, swept)
    spec = config.eval.model_dump(mode="json", exclude_none=True)
    eval_key = key_of(
        "eval/3",
        merge_key,
        [dataclasses.asdict(t) for t in selected],
        [data_fingerprint(t.data) for t in selected],
        spec,
    )
    evaluated = stages.run_stage(
        "eval",
        eval_key,
        lambda tmp: _evaluate(tmp, merged / "model", evaluation, sources, config.eval.baselines),
    )
    reports = read_eval_reports(
        read_json(evaluated / "eval_report.json", ClipshipError, "eval report"), "eval_report.json"
    )
    summary["accuracy"] = {label: report.accuracies() for label, report in reports.items()}
    summary["gates"] = accuracy_gates(config.gates, reports)
    failed = [g for g in summary["gates"] if not g["passed"]]
    if failed:
        return _failed(summary, failed)

    exported = None
    if exporting:
        request = export_request(config, base, merged / "model", evaluated / "heads", tasks)
        exported, failure = _export_stage(request, stages, eval_key)
        if exported is not None:
            summary["export"] = _export_figures(exported / "export" / "export_report.json")
        if failure:
            summary["gates"].append(failure)
            return _failed(summary, [failure])

    card = config.card.model_dump(exclude_none=True)
    hub = config.hub
    repo = repo_id or (hub.repo_id if hub else None)
    card.setdefault("name", repo or name)
    out = _assemble(run, merged, evaluated, exported, card)
    summary.update(status="built", release_dir=str(out), card=str(out / "README.md"))
    log(f"release folder: {out}")
    if repo:
        from clipship.cards.push import push
        from clipship.errors import PushError

        log(f"push: {repo}" + (" (dry run)" if dry_run else ""))
        try:
            summary["push"] = push(
                out,
                repo,
                revision=hub.revision if hub else None,
                tag=tag or (hub.tag if hub else None),
                private=bool(hub and hub.private),
                message=hub.message if hub else None,
                dry_run=dry_run,
                prune=True,  # the release folder is the whole release: stale files go
            ).to_json()
        except PushError as e:
            summary.update(status="push_failed", failed=[f"push: {e}"])
            return summary
        summary["status"] = "dry_run" if dry_run else "released"
    return summary


def _sweep_stage(
    config: ReleaseFile,
    stages: Stages,
    sources: Sources,
    tasks: TaskSpec,
    selected: list,
    quiet: bool,
) -> tuple[Path, str]:
    """``clipship sweep`` over the swept parameters, on the tasks the eval section names: its
    report and ``best/``, which the merge stage takes as the merged model."""
    from clipship.eval.request import SweepRequest

    grid = tuple(f"{k}={','.join(map(str, v))}" for k, v in config.swept().items())
    settings = {k: getattr(config.eval, k) for k in ("device", "batch_size", "limit")}
    request = SweepRequest(
        sources, Path("sweep"), tasks, method=config.method, grid=grid, params=config.fixed(),
        select_on=config.select_on, allow_test_selection=config.allow_test_selection,
        val_fraction=config.val_fraction, seed=config.seed, workers=0, quiet=quiet,
        **{k: v for k, v in settings.items() if v is not None},
    )  # fmt: skip
    request.check()
    key = key_of(
        "sweep/1",
        pool_fingerprint(sources), list(sources.models), config.method, config.parameters,
        config.select_on, config.val_fraction, config.seed, settings,
        [dataclasses.asdict(t) for t in selected], [data_fingerprint(t.data) for t in selected],
    )  # fmt: skip

    def build(tmp: Path) -> None:
        dataclasses.replace(request, out=tmp / "sweep").run()

    return stages.run_stage("sweep", key, build), key


def _merge_stage(
    config: ReleaseFile,
    stages: Stages,
    sources: Sources,
    tasks: TaskSpec,
    selected: list,
    swept: tuple[Path, str] | None = None,
) -> tuple[Path, str]:
    """The merge, as ``clipship merge`` runs it, cached under its inputs' key. A data-aware
    method reads each task model's images from the tasks the eval section names. After a
    sweep, the merged model is the sweep's ``best/`` (``clipship merge``'s bytes, its recipe
    saying how the parameters were chosen)."""
    from clipship.merge.registry import get_method

    if swept is not None:
        key = key_of("merge/1", swept[1])

        def copy(tmp: Path) -> None:
            shutil.copytree(swept[0] / "sweep" / "best", tmp / "model")

        return stages.run_stage("merge", key, copy), key
    data_aware = get_method(config.method).data is not None
    request = MergeRequest(
        sources,
        Path("model"),
        method=config.method,
        params=dict(config.parameters),
        seed=config.seed,
        tasks=dataclasses.replace(tasks, names=None) if data_aware else TaskSpec(),
    )
    request.check()
    images = [data_fingerprint(t.data) for t in selected] if data_aware else []
    key = key_of(
        "merge/1",
        pool_fingerprint(sources),
        list(sources.models),
        request.method,
        request.params,
        request.seed,
        *([images] if images else []),
    )

    def build(tmp: Path) -> None:
        dataclasses.replace(request, out=tmp / "model").run()

    return stages.run_stage("merge", key, build), key


def export_request(
    config: ReleaseFile, base: Path, model: Path, heads: Path, tasks: TaskSpec | None = None
) -> ExportRequest:
    """The export section as the request ``clipship export`` makes, gates included."""
    from clipship.exporter.onnx_export import Gates as ExportGates

    assert config.export is not None
    spec = config.export.model_dump(exclude_none=True)
    limits = config.gates.export.model_dump(exclude_none=True) if config.gates.export else {}
    gates = ExportGates(**limits)
    if "validation_data" in spec:
        spec["validation_data"] = _path(base, spec["validation_data"])
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
        return stages.run_stage("export", key, build), None
    except ExportValidationError as e:
        return None, {"gate": "export validation", "passed": False, "message": str(e)}


def _export_figures(path: Path) -> dict[str, Any]:
    return ExportReport.from_json(
        read_json(path, ClipshipError, "export report"), str(path)
    ).summary()


def _failed(summary: dict[str, Any], failed: list[dict[str, Any]]) -> dict[str, Any]:
    summary["status"] = "gate_failed"
    summary["failed"] = [describe(g) for g in failed]
    remove_output(Path(summary["run_dir"]) / "release")  # an earlier run's must not look current
    return summary


def describe(gate: dict[str, Any]) -> str:
    if "message" in gate:
        return f"{gate['gate']}: {gate['message']}"
    value = gate["value"]
    shown = f"{value:.4f}" if isinstance(value, (int, float)) else repr(value)
    return f"{gate['gate']} {shown} (needs {gate['op']} {gate['limit']})"
