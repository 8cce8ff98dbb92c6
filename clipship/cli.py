"""The ``clipship`` command line: parse, one library call per command, print.

Heavy libraries (torch, transformers) are imported inside the commands so ``--help`` is instant.
A ``ClipshipError`` becomes one ``error: ...`` line on stderr and its exit code, with the
parameter it names (``option``) written as this command's flag; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from clipship import options as o
from clipship import views
from clipship.errors import ClipshipError
from clipship.requests import TaskSpec, parse_params, resolve_sources

app = typer.Typer(
    name="clipship",
    help="Merge, evaluate, export and ship CLIP vision encoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
analyze_app = typer.Typer(help="Analyses of a model pool.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
minibench_app = typer.Typer(
    help="The offline mini-benchmark: real data, a tiny CLIP, task encoders.", no_args_is_help=True
)
app.add_typer(minibench_app, name="minibench")

_debug = {"on": False}
T = TypeVar("T")


def _run(call: Callable[[], T]) -> T:
    try:
        return call()
    except ClipshipError as e:
        if _debug["on"]:
            raise
        print(f"error: {views.error_line(e, app)}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # a disk that fills up or turns read-only where no stage expected it
        from clipship.outputs import WRITE_ERRNOS

        if _debug["on"] or e.errno not in WRITE_ERRNOS:
            raise
        where = f" {Path(e.filename).name}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror}", file=sys.stderr)
        raise typer.Exit(1) from None


def _call(target: str, *args: Any, **kwargs: Any) -> Any:
    """``_run`` of ``module:function`` (imported now: torch and friends load only when used)."""
    module, _, name = target.partition(":")
    return _run(lambda: getattr(importlib.import_module(module), name)(*args, **kwargs))


def _dump(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


@app.callback()
def _main(debug: o.MainDebug = False):
    _debug["on"] = debug


@app.command()
def merge(
    out: o.Out,
    method: o.MergeMethod = None,
    pool: o.Pool = None,
    pretrained: o.Pretrained = None,
    model: o.Model = None,
    lambda_: o.MergeLambda = None,
    threshold: o.MergeThreshold = None,
    param: o.MergeParam = None,
    seed: o.MergeSeed = 0,
    vision_only: o.MergeVisionOnly = False,
    recipe: o.MergeRecipe = None,
    max_shard_size: o.MergeMaxShardSize = "5GB",
    device: o.MergeDevice = None,
    taskfile: o.MergeTaskfile = None,
    data_dir: o.MergeDataDir = None,
    data_examples: o.MergeDataExamples = None,
    batch_size: o.MergeBatchSize = None,
    data_order: o.MergeDataOrder = None,
    merging_weights: o.MergeMergingWeights = None,
    save_merging_weights: o.MergeSaveMergingWeights = None,
    allow_pickle: o.Pickle = False,
    force: o.Force = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
) -> None:
    """Merge task encoders into one CLIP model folder, streaming tensor by tensor."""
    from clipship.machine import return_freed_memory

    return_freed_memory()  # a mixture's adaptation frees many MLP-sized temporaries
    sources = _run(lambda: resolve_sources(pool, pretrained, model, partial=recipe is not None))
    params = _run(lambda: parse_params(lambda_, threshold, param))
    request = _call(
        "clipship.merge.request:MergeRequest", sources, out, method=method, params=params,
        seed=seed, vision_only=vision_only, max_shard_size=max_shard_size, device=device,
        recipe=recipe, allow_pickle=allow_pickle, force=force, quiet=quiet,
        tasks=TaskSpec(data_dir=data_dir, taskfile=taskfile), data_examples=data_examples,
        batch_size=batch_size, data_order=data_order, merging_weights=merging_weights,
        save_merging_weights=save_merging_weights,
    )  # fmt: skip
    result = _run(request.run)
    if json_out:
        _dump(result.summary())
    elif not quiet:
        views.merged(result, vision_only)


@app.command()
def methods(json_out: o.Json = False) -> None:
    """List the merge methods with their parameters, defaults and papers."""
    rows = _call("clipship.merge.registry:method_rows")
    _dump(rows) if json_out else views.methods(rows)


@analyze_app.command("similarity")
def similarity(
    out: o.SimilarityOut,
    pool: o.Pool = None,
    pretrained: o.Pretrained = None,
    model: o.Model = None,
    no_plot: o.SimilarityNoPlot = False,
    allow_pickle: o.Pickle = False,
    force: o.Force = False,
    json_out: o.Json = False,
) -> None:
    """Cosine similarity between task vectors → task_vector_cos_similarity.csv (+ .png)."""
    sources = _run(lambda: resolve_sources(pool, pretrained, model))
    result = _call(
        "clipship.merge.similarity:analyze_similarity", sources.pretrained, sources.models, out,
        force=force, allow_pickle=allow_pickle, plot=not no_plot,
    )  # fmt: skip
    _dump(result) if json_out else print("\n".join(result["files"]))


@app.command()
def info(
    sources: o.InfoSources = None,
    pool: o.Pool = None,
    allow_pickle: o.Pickle = False,
    json_out: o.Json = False,
) -> None:
    """Parameter counts (FusionBench's model_info) and architecture of models or a pool."""
    rows = _call("clipship.info:pool_info", sources or [], pool, allow_pickle)
    _dump(rows) if json_out else views.model_info(rows)


@app.command()
def heads(
    model: o.HeadsModel,
    out: o.Out,
    tasks: o.Tasks = None,
    taskpool: o.Taskpool = None,
    task: o.Custom = None,
    classnames: o.Classnames = None,
    templates: o.Templates = None,
    taskfile: o.Taskfile = None,
    device: o.Device = "auto",
    no_cache: o.HeadsNoCache = False,
    force: o.Force = False,
    json_out: o.Json = False,
) -> None:
    """Build the zero-shot text heads (text_heads.safetensors + text_heads.json)."""
    spec = TaskSpec(tasks, taskpool, tuple(task or ()), classnames, templates, taskfile=taskfile)
    request = _call(
        "clipship.eval.request:HeadsRequest", model, out, spec, device=device,
        use_cache=not no_cache, force=force,
    )  # fmt: skip
    shapes = _run(request.run)
    _dump({"out": str(out), "heads": shapes}) if json_out else views.heads(shapes, out)


@app.command("eval")
def eval_(
    model: o.EvalModel = None,
    pool: o.Pool = None,
    pretrained: o.Pretrained = None,
    tasks: o.Tasks = None,
    taskpool: o.Taskpool = None,
    task: o.Custom = None,
    classnames: o.Classnames = None,
    templates: o.Templates = None,
    data_dir: o.DataDir = None,
    taskfile: o.Taskfile = None,
    heads_dir: o.Heads = None,
    device: o.Device = "auto",
    precision: o.EvalPrecision = "fp32",
    batch_size: o.EvalBatchSize = 128,
    limit: o.EvalLimit = None,
    workers: o.EvalWorkers = None,
    seed: o.Seed = 0,
    skip_bad_images: o.EvalSkipBadImages = False,
    routing: o.EvalRouting = "per_sample",
    corruption: o.EvalCorruption = None,
    severity: o.EvalSeverity = None,
    out: o.EvalOut = None,
    force: o.Force = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
) -> None:
    """Zero-shot accuracy and loss per task, in FusionBench's report shape."""
    spec = TaskSpec(tasks, taskpool, tuple(task or ()), classnames, templates, data_dir, taskfile)
    sources = _run(lambda: resolve_sources(pool)) if pool is not None else None
    request = _call(
        "clipship.eval.request:EvalRequest", spec, model=model, pretrained=pretrained,
        pool=sources, heads=heads_dir, device=device, precision=precision, batch_size=batch_size,
        limit=limit, workers=workers, seed=seed, skip_bad_images=skip_bad_images,
        routing=routing, corruption=corruption, severity=severity, out=out, force=force,
        quiet=quiet,
    )  # fmt: skip
    outcome = _run(request.run)
    if not outcome.primary:  # under torchrun, rank 0 reports for everyone
        return
    if json_out:
        _dump(outcome.to_json())
    elif not quiet or out is None:  # --quiet silences progress; a report must go somewhere
        views.eval_reports(outcome.reports)


@app.command()
def sweep(
    out: o.SweepOut,
    grid: o.SweepGrid = None,
    method: o.MergeMethod = None,
    pool: o.Pool = None,
    pretrained: o.Pretrained = None,
    model: o.Model = None,
    lambda_: o.MergeLambda = None,
    threshold: o.MergeThreshold = None,
    param: o.MergeParam = None,
    select_on: o.SweepSelectOn = "validation",
    allow_test_selection: o.SweepAllowTest = False,
    val_fraction: o.SweepValFraction = None,
    report_test: o.SweepReportTest = False,
    tasks: o.Tasks = None,
    taskpool: o.Taskpool = None,
    task: o.Custom = None,
    classnames: o.Classnames = None,
    templates: o.Templates = None,
    data_dir: o.DataDir = None,
    taskfile: o.Taskfile = None,
    seed: o.MergeSeed = 0,
    vision_only: o.MergeVisionOnly = False,
    device: o.Device = "auto",
    precision: o.EvalPrecision = "fp32",
    batch_size: o.EvalBatchSize = 128,
    limit: o.SweepLimit = None,
    workers: o.EvalWorkers = None,
    allow_pickle: o.Pickle = False,
    force: o.Force = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
) -> None:
    """Choose merge parameters on validation data: every grid point merged and evaluated."""
    sources = _run(lambda: resolve_sources(pool, pretrained, model))
    params = _run(lambda: parse_params(lambda_, threshold, param))
    spec = TaskSpec(tasks, taskpool, tuple(task or ()), classnames, templates, data_dir, taskfile)
    request = _call(
        "clipship.eval.request:SweepRequest", sources, out, spec, method=method,
        grid=tuple(grid or ()), params=params, select_on=select_on,
        allow_test_selection=allow_test_selection, val_fraction=val_fraction,
        report_test=report_test, seed=seed, vision_only=vision_only, device=device,
        precision=precision, batch_size=batch_size, limit=limit, workers=workers,
        allow_pickle=allow_pickle, force=force, quiet=quiet,
    )  # fmt: skip
    result = _run(request.run)
    if not result.primary:  # under torchrun, rank 0 reports for everyone
        return
    if json_out:
        _dump(result.summary())
    elif not quiet:
        views.swept(result)


@app.command()
def finetune(
    pretrained: o.HeadsModel,
    out: o.FinetuneOut,
    tasks: o.FinetuneTasks = None,
    taskpool: o.Taskpool = None,
    task: o.Custom = None,
    classnames: o.Classnames = None,
    templates: o.Templates = None,
    data_dir: o.DataDir = None,
    taskfile: o.Taskfile = None,
    steps: o.FinetuneSteps = 4000,
    batch_size: o.EvalBatchSize = 32,
    lr: o.FinetuneLr = 1e-5,
    weight_decay: o.FinetuneWeightDecay = 0.0,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    precision: o.FinetunePrecision = "fp32",
    workers: o.FinetuneWorkers = 0,
    checkpoint_every: o.FinetuneCheckpointEvery = 500,
    resume: o.FinetuneResume = False,
    force: o.Force = False,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
) -> None:
    """Fine-tune a task encoder (vision tower only, frozen zero-shot head as classifier)."""
    spec = TaskSpec(tasks, taskpool, tuple(task or ()), classnames, templates, data_dir, taskfile)
    options = dict(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
        device=device, precision=precision, workers=workers, checkpoint_every=checkpoint_every,
        resume=resume, force=force, quiet=quiet or json_out,
    )  # fmt: skip
    request = _call("clipship.eval.request:FinetuneRequest", pretrained, out, spec, options)
    result = _run(request.run)
    if json_out:
        _dump(result)
    elif not quiet:
        print(f"fine-tuned {result['task']} for {result['steps']} steps → {result['out']}/")


@app.command()
def export(
    model: o.ExportModel,
    heads_dir: o.ExportHeadsDir,
    out: o.ExportOut,
    onnx: o.ExportOnnx = True,
    tensorrt: o.ExportTensorrt = False,
    max_batch: o.ExportMaxBatch = 64,
    precision: o.ExportPrecision = "fp32",
    pretrained: o.Pretrained = None,
    tasks: o.Tasks = None,
    taskpool: o.Taskpool = None,
    task: o.Custom = None,
    classnames: o.Classnames = None,
    templates: o.Templates = None,
    taskfile: o.Taskfile = None,
    data_dir: o.ExportDataDir = None,
    validation_data: o.ExportValidationData = None,
    validation_size: o.ExportValidationSize = 500,
    int8_scheme: o.ExportInt8Scheme = "auto",
    max_logit_diff: o.ExportMaxLogitDiff = 1e-3,
    min_agreement_fp16: o.ExportMinAgreementFp16 = 0.995,
    min_agreement_int8: o.ExportMinAgreementInt8 = 0.98,
    force: o.Force = False,
    json_out: o.Json = False,
) -> None:
    """Export encoder + text heads as one ONNX graph, validated against PyTorch first."""
    gates = _call(
        "clipship.exporter.onnx_export:Gates", max_logit_diff,
        min_agreement_fp16=min_agreement_fp16, min_agreement_int8=min_agreement_int8,
    )  # fmt: skip
    spec = TaskSpec(tasks, taskpool, tuple(task or ()), classnames, templates, data_dir, taskfile)
    request = _call(
        "clipship.exporter.request:ExportRequest", model, heads_dir, out, tasks=spec,
        pretrained=pretrained, precisions=tuple(p for p in precision.split(",") if p),
        validation_data=validation_data, validation_size=validation_size,
        int8_scheme=int8_scheme, gates=gates, tensorrt=tensorrt, max_batch=max_batch, onnx=onnx,
        force=force,
    )  # fmt: skip
    result = _run(request.run)
    _dump(result["report"]) if json_out else views.export_result(result)


@app.command()
def predict(
    export_dir: o.PredictExportDir,
    images: o.PredictImages,
    task: o.PredictTask = None,
    top_k: o.PredictTopK = 5,
    variant: o.PredictVariant = "fp32",
    provider: o.PredictProvider = "cpu",
    json_out: o.Json = False,
) -> None:
    """Classify images with the exported graph (onnxruntime, numpy and Pillow only)."""
    results = _call(
        "clipship.exporter.predict:predict", export_dir, images, task=task, top_k=top_k,
        variant=variant, provider=provider,
    )  # fmt: skip
    _dump(results) if json_out else views.predictions(results)


@app.command()
def card(
    run_dir: o.CardRunDir,
    license: o.CardLicense = None,
    name: o.CardName = None,
    base_model: o.CardBaseModel = None,
    force: o.CardForce = False,
) -> None:
    """Write README.md (Hub model card) offline from the recipe, eval and export reports."""
    card = "clipship.cards.card:write_card"
    print(_call(card, run_dir, license=license, name=name, base_model=base_model, force=force))


@app.command()
def push(
    run_dir: o.CardRunDir,
    repo_id: o.PushRepoId,
    revision: o.PushRevision = None,
    tag: o.PushTag = None,
    private: o.PushPrivate = False,
    message: o.PushMessage = None,
    token: o.PushToken = None,
    endpoint: o.PushEndpoint = None,
    dry_run: o.PushDryRun = False,
    prune: o.PushPrune = False,
    json_out: o.Json = False,
) -> None:
    """Upload a release folder to the Hugging Face Hub in one commit (none if nothing changed)."""
    result = _call(
        "clipship.cards.push:push", run_dir, repo_id, token=token, endpoint=endpoint,
        revision=revision, tag=tag, private=private, dry_run=dry_run, message=message, prune=prune,
    )  # fmt: skip
    _dump(result.to_json()) if json_out else views.push_lines(result)


@app.command()
def release(
    config: o.ReleaseConfig = None,
    run_dir: o.ReleaseRunDir = None,
    repo_id: o.ReleaseRepoId = None,
    tag: o.ReleaseTag = None,
    dry_run: o.ReleaseDryRun = False,
    json_out: o.Json = False,
    quiet: o.Quiet = False,
    force: o.ReleaseForce = False,
    schema: o.ReleaseSchema = False,
) -> None:
    """Merge → eval → export → card → push in one command, stopping at the first failed gate."""
    if schema:
        print(_call("clipship.release_file:schema_text"), end="")
        return
    if config is None:
        print("error: give the release file (RELEASE.yaml), or --schema", file=sys.stderr)
        raise typer.Exit(2)
    summary = _call(
        "clipship.release:release", config, run_dir, repo_id=repo_id, tag=tag, dry_run=dry_run,
        quiet=quiet, force=force,
    )  # fmt: skip
    _dump(summary) if json_out else views.release_summary(summary)
    if summary["status"] == "gate_failed":
        print(f"error: release gate failed: {'; '.join(summary['failed'])}", file=sys.stderr)
        raise typer.Exit(3)
    if summary["status"] == "push_failed":  # the summary above says what was built
        print(f"error: {'; '.join(summary['failed'])}", file=sys.stderr)
        raise typer.Exit(1)


@minibench_app.command("build")
def minibench_build(
    out: o.MinibenchBuildOut = None,
    budget: o.Budget = "full",
    seed: o.Seed = 0,
    force: o.Force = False,
    quiet: o.Quiet = False,
) -> None:
    """Build (or reuse from the cache) the mini-benchmark pool."""
    print(_call("clipship.minibench.build:build", out, budget, seed, force=force, quiet=quiet))


@minibench_app.command("run")
def minibench_run(
    methods: o.MinibenchRunMethods = "task_arithmetic,ties",
    pool_dir: o.MinibenchRunPoolDir = None,
    budget: o.Budget = "full",
    seed: o.Seed = 0,
    out: o.MinibenchRunOut = None,
    corruptions: o.MinibenchCorruptions = None,
    severity: o.EvalSeverity = None,
    quiet: o.Quiet = False,
    json_out: o.Json = False,
) -> None:
    """Merge the pool with each method, evaluate everything, write results.{md,json,png}."""
    bench = "clipship.minibench.run:benchmark"
    results, table = _call(
        bench, methods, pool_dir, budget, seed, out, quiet, corruptions, severity
    )
    _dump(results) if json_out else print(table, end="")
    if not quiet:  # where the tables and merged models went (stderr: --json stays parseable)
        where = out or Path("minibench_results")
        print(f"results: {where}/results.{{md,json,png}}; merged models: {where}/merged/<method>",
              file=sys.stderr)  # fmt: skip


@app.command()
def demo(
    out: o.DemoOut = Path("demo_out"),
    budget: o.Budget = "full",
    force: o.Force = False,
) -> None:
    """Offline demo: build the mini-benchmark (cached), merge with TA and TIES, print the table."""
    _call("clipship.demo:run_demo", out, budget=budget, force=force)


def main() -> None:
    from clipship.errors import Terminated
    from clipship.outputs import unwind_on_sigterm

    unwind_on_sigterm()
    try:
        app()
    except Terminated:
        print("error: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        sys.exit(Terminated.exit_code)


if __name__ == "__main__":
    main()
