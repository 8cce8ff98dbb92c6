"""The ``clipship`` command line: argument parsing only, one library call per command.

Heavy libraries (torch, transformers) are imported inside the commands so ``--help`` is instant.
A ``ClipshipError`` becomes one ``error: ...`` line on stderr and its exit code; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from clipship.errors import ClipshipError, MethodError, SourceNotFoundError

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

PoolOpt = Annotated[Path | None, typer.Option("--pool", help="FusionBench modelpool YAML file.")]
PretrainedOpt = Annotated[
    str | None, typer.Option("--pretrained", help="Pretrained CLIP: hub id[@revision] or folder.")
]
ModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model", help="Task encoder as NAME=SOURCE (hub id[@revision] or folder); repeat."
    ),
]
PickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Load pytorch_model.bin checkpoints (torch.load weights_only=True)."
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output atomically.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary.")]


def _run(call: Callable[[], T]) -> T:
    try:
        return call()
    except ClipshipError as e:
        if _debug["on"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None


def _pool_sources(
    pool: Path | None, pretrained: str | None, model: list[str] | None, partial: bool = False
):
    """(pretrained, {task: source}); with ``partial`` (a recipe replay) either may be missing."""
    from clipship.pool import parse_model_args, read_pool_yaml

    if pool is not None:
        if pretrained or model:
            raise SourceNotFoundError("give either --pool or --pretrained/--model, not both")
        return read_pool_yaml(pool)
    if partial:
        return pretrained, parse_model_args(model or [])
    if not pretrained:
        raise SourceNotFoundError(
            "no pool: give --pool POOL.yaml or --pretrained SRC --model NAME=SRC ..."
        )
    return pretrained, parse_model_args(model or [])


def _params(lambda_: str | None, threshold: str | None, param: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in param or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MethodError(f"--param {item!r}: expected NAME=VALUE")
        params[name] = value
    if lambda_ is not None:
        params["scaling_factor"] = lambda_
    if threshold is not None:
        params["threshold"] = threshold
    return params


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _debug["on"] = debug


@app.command()
def merge(
    out: Annotated[Path, typer.Option("--out", help="Output folder (written atomically).")],
    method: Annotated[
        str | None, typer.Option("--method", help="Merge method (see `clipship methods`).")
    ] = None,
    pool: PoolOpt = None,
    pretrained: PretrainedOpt = None,
    model: ModelOpt = None,
    lambda_: Annotated[
        str | None, typer.Option("--lambda", help="Scaling factor λ (scaling_factor).")
    ] = None,
    threshold: Annotated[
        str | None, typer.Option("--threshold", help="TIES/DARE-TIES: percent kept.")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="Method parameter NAME=VALUE; repeat.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for random methods (DARE).")] = 0,
    vision_only: Annotated[
        bool, typer.Option("--vision-only", help="Write only the vision tower.")
    ] = False,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Rerun a clipship_recipe.json.")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Shard weights above this size.")
    ] = "5GB",
    device: Annotated[
        str | None,
        typer.Option("--device", help="Where per-tensor methods compute: cpu, cuda or auto."),
    ] = None,
    allow_pickle: PickleOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge task encoders into one CLIP model folder, streaming tensor by tensor."""

    def call():
        from clipship.merge import merge as run_merge
        from clipship.merge import merge_from_recipe

        if recipe is not None:
            if method or lambda_ or threshold or param:
                raise MethodError("--recipe replays a merge: drop the method and its parameters")
            base, models = _pool_sources(pool, pretrained, model, partial=True)
            where = {"device": device} if device else {}
            return merge_from_recipe(
                recipe,
                out,
                base,
                models,
                force=force,
                quiet=quiet,
                allow_pickle=allow_pickle,
                **where,
            )
        if not method:
            raise MethodError("no merge method: pass --method NAME (see `clipship methods`)")
        base, models = _pool_sources(pool, pretrained, model)
        return run_merge(
            base,
            models,
            method,
            out,
            _params(lambda_, threshold, param),
            seed=seed,
            vision_only=vision_only,
            force=force,
            allow_pickle=allow_pickle,
            max_shard_size=max_shard_size,
            quiet=quiet,
            device=device or "cpu",
        )

    result = _run(call)
    if json_out:
        print(json.dumps(result.summary(), indent=2))
    elif not quiet:
        kind = "CLIPVisionModel" if vision_only else "CLIPModel"
        print(f"merged with {result.method} in {result.seconds:.1f}s → {result.out}/")
        print(f"load it with: transformers.{kind}.from_pretrained({str(result.out)!r})")


@app.command()
def methods(json_out: JsonOpt = False) -> None:
    """List the merge methods with their parameters, defaults and papers."""
    from clipship.merge import method_table as table

    rows = [
        {
            "name": m.name,
            "summary": m.summary,
            "paper": m.paper,
            "params": {
                p.name: {
                    "default": p.default,
                    "help": p.help,
                    **({"choices": list(p.choices)} if p.choices else {}),
                }
                for p in m.params
            },
        }
        for m in table().values()
    ]
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    grid = Table("method", "parameters (default)", "paper")
    for row in rows:
        params = ", ".join(f"{k}={v['default']}" for k, v in row["params"].items()) or "—"
        grid.add_row(row["name"], params, row["paper"])
    Console().print(grid)


@analyze_app.command("similarity")
def similarity(
    out: Annotated[Path, typer.Option("--out", help="Folder for the CSV and PNG.")],
    pool: PoolOpt = None,
    pretrained: PretrainedOpt = None,
    model: ModelOpt = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Skip the heatmap PNG.")] = False,
    allow_pickle: PickleOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Cosine similarity between task vectors → task_vector_cos_similarity.csv (+ .png)."""

    def call():
        from clipship.merge.similarity import analyze_similarity

        base, models = _pool_sources(pool, pretrained, model)
        return analyze_similarity(
            base, models, out, force=force, allow_pickle=allow_pickle, plot=not no_plot
        )

    result = _run(call)
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(result["files"]))


@app.command()
def info(
    sources: Annotated[list[str] | None, typer.Argument(help="Model folders or hub ids.")] = None,
    pool: PoolOpt = None,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Parameter counts (FusionBench's model_info) and architecture of models or a pool."""

    def call():
        from clipship.info import model_info
        from clipship.pool import PRETRAINED, read_pool_yaml

        if pool is not None:
            base, models = read_pool_yaml(pool)
            named = {PRETRAINED: base, **models}
        elif sources:
            named = {src: src for src in sources}
        else:
            raise SourceNotFoundError("give one or more model sources, or --pool POOL.yaml")
        return model_info(named, allow_pickle)

    rows = _run(call)
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    grid = Table(
        "model",
        "architecture",
        "params",
        "vision params",
        "vision (image/patch/width/layers)",
        "dtype",
    )
    for row in rows:
        v = row["vision"]
        grid.add_row(
            row["name"],
            row["architecture"],
            f"{row['model_info']['all_params']:,}",
            f"{row['vision_params']:,}",
            f"{v.get('image_size')}/{v.get('patch_size')}/{v.get('hidden_size')}/{v.get('num_hidden_layers')}",
            ",".join(row["dtype"]),
        )
    Console().print(grid)


TasksOpt = Annotated[
    str | None,
    typer.Option("--tasks", help="'all' (the eight tasks) or comma-separated task names."),
]
TaskpoolOpt = Annotated[Path | None, typer.Option("--taskpool", help="FusionBench taskpool YAML.")]
CustomOpt = Annotated[
    list[str] | None, typer.Option("--task", help="Custom ImageFolder task NAME=PATH; repeat.")
]
ClassnamesOpt = Annotated[
    Path | None, typer.Option("--classnames", help="Custom tasks: one class name per line.")
]
TaskfileOpt = Annotated[
    Path | None, typer.Option("--taskfile", help="JSON task file (e.g. the mini-benchmark's).")
]
TemplatesOpt = Annotated[
    Path | None, typer.Option("--templates", help="Custom tasks: one template per line, with {c}.")
]


@app.command()
def heads(
    model: Annotated[str, typer.Argument(help="Pretrained CLIPModel folder or hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (written atomically).")],
    tasks: TasksOpt = "all",
    taskpool: TaskpoolOpt = None,
    task: CustomOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    device: Annotated[str, typer.Option("--device", help="cuda, cpu or auto.")] = "auto",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Rebuild even if cached.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Build the zero-shot text heads (text_heads.safetensors + text_heads.json)."""

    def call():
        from clipship.eval import build_heads, save_heads, select_tasks
        from clipship.machine import pick_device
        from clipship.outputs import check_target

        check_target(out, force, inputs=(model,))
        chosen = select_tasks(tasks, taskpool, task, classnames, templates)
        table, meta = build_heads(model, chosen, device=pick_device(device), use_cache=not no_cache)
        save_heads(out, table, meta, force)
        return {name: list(head.shape) for name, head in table.items()}

    shapes = _run(call)
    if json_out:
        print(json.dumps({"out": str(out), "heads": shapes}, indent=2))
    else:
        sizes = ", ".join(f"{k} {v[0]}×{v[1]}" for k, v in shapes.items())
        print(f"{len(shapes)} heads → {out}/ ({sizes})")


@app.command("eval")
def eval_(
    model: Annotated[
        str | None, typer.Argument(help="Merged folder, task encoder or hub id.")
    ] = None,
    pool: PoolOpt = None,
    pretrained: PretrainedOpt = None,
    tasks: TasksOpt = None,
    taskpool: TaskpoolOpt = None,
    task: CustomOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Local data: DIR/<task>.")
    ] = None,
    taskfile: TaskfileOpt = None,
    heads_dir: Annotated[
        Path | None, typer.Option("--heads", help="Heads from `clipship heads`.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cuda, cpu or auto.")] = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="fp32, fp16 or bf16 (autocast).")
    ] = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    limit: Annotated[
        int | None, typer.Option("--limit", help="First N test images per task.")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="DataLoader workers.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON report here.")] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Zero-shot accuracy and loss per task, in FusionBench's report shape."""

    def call():
        from clipship.eval import evaluate, evaluate_pool, select_tasks
        from clipship.outputs import check_target

        if out is not None:
            inputs = (model, pretrained, pool, heads_dir, taskfile, taskpool, classnames, templates)
            check_target(out, force, inputs=inputs, kind="file")
        chosen = select_tasks(tasks, taskpool, task, classnames, templates, data_dir, taskfile)
        options = dict(
            heads=heads_dir,
            device=device,
            precision=precision,
            batch_size=batch_size,
            limit=limit,
            workers=workers,
            seed=seed,
            skip_bad_images=skip_bad_images,
            quiet=quiet,
        )
        if pool is not None:
            if model or pretrained:
                raise SourceNotFoundError("give either MODEL or --pool, not both")
            base, models = _pool_sources(pool, None, None)
            return evaluate_pool(base, models, chosen, **options), True
        if not model:
            raise SourceNotFoundError(
                "no model: give MODEL (a folder or hub id) or --pool POOL.yaml"
            )
        return evaluate(model, chosen, pretrained=pretrained, **options), False

    report, is_pool = _run(call)
    from clipship.eval.evaluate import distributed_rank

    if distributed_rank()[0] != 0:  # under torchrun, rank 0 reports for everyone
        return
    if out is not None:
        from clipship.outputs import write_text_atomic

        write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    if json_out:
        print(json.dumps(report, indent=2))
    elif not quiet:
        _print_report(report, is_pool)


def _print_report(report: dict, is_pool: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from clipship.reports import EvalReport

    if is_pool:
        reports = {model: EvalReport.from_json(rep) for model, rep in report.items()}
        names = list(next(iter(reports.values())).tasks)
        grid = Table("model", *names, "average", title="zero-shot accuracy (%)")
        for model, rep in reports.items():
            accuracy = rep.accuracies()
            grid.add_row(
                model,
                *(f"{100 * accuracy[t]:.1f}" for t in names),
                f"{100 * (rep.average or {})['accuracy']:.1f}",
            )
    else:
        single = EvalReport.from_json(report)
        grid = Table("task", "accuracy (%)", "loss", "images")
        for name, score in single.tasks.items():
            grid.add_row(
                name,
                f"{100 * score.accuracy:.2f}",
                f"{score.fields['loss']:.4f}",
                str(score.fields["samples"]),
            )
        avg = single.average or {}
        grid.add_row("average", f"{100 * avg['accuracy']:.2f}", f"{avg['loss']:.4f}", "")
    Console().print(grid)


@app.command()
def finetune(
    pretrained: Annotated[str, typer.Argument(help="Pretrained CLIPModel folder or hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Output CLIPVisionModel folder.")],
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="The built-in task to tune for.")
    ] = None,
    task: CustomOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Local data: DIR/<task>.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps")] = 4000,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    lr: Annotated[float, typer.Option("--lr")] = 1e-5,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cuda, cpu or auto.")] = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="fp32, fp16 or bf16 (AMP).")
    ] = "fp32",
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers.")] = 0,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps; 0 = never.")
    ] = 500,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint.")
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune a task encoder (vision tower only, frozen zero-shot head as classifier)."""

    def call():
        from clipship.errors import TaskError
        from clipship.eval import select_tasks
        from clipship.eval.finetune import finetune as run

        chosen = select_tasks(tasks, None, task, classnames, templates, data_dir)
        if len(chosen) != 1:
            raise TaskError(
                "finetune tunes one task at a time: give one --tasks NAME or --task NAME=PATH"
            )
        return run(
            pretrained,
            chosen[0],
            out,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            device=device,
            precision=precision,
            workers=workers,
            checkpoint_every=checkpoint_every,
            resume=resume,
            force=force,
            quiet=quiet or json_out,
        )

    result = _run(call)
    if json_out:
        print(json.dumps(result, indent=2))
    elif not quiet:
        print(f"fine-tuned {result['task']} for {result['steps']} steps → {result['out']}/")


@app.command()
def export(
    model: Annotated[
        str, typer.Argument(help="Merged CLIPModel folder (or encoder + --pretrained).")
    ],
    heads_dir: Annotated[Path, typer.Option("--heads", help="Heads from `clipship heads`.")],
    out: Annotated[Path, typer.Option("--out", help="Export folder (written atomically).")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Write the ONNX graph (the format).")] = True,
    tensorrt: Annotated[
        bool, typer.Option("--tensorrt", help="Also a TensorRT fp16 engine (needs a GPU).")
    ] = False,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="TensorRT profile's largest batch.")
    ] = 64,
    precision: Annotated[str, typer.Option("--precision", help="fp32,fp16,int8")] = "fp32",
    pretrained: PretrainedOpt = None,
    tasks: TasksOpt = None,
    taskfile: TaskfileOpt = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="DIR/<task> data.")] = None,
    validation_data: Annotated[
        Path | None, typer.Option("--validation-data", help="Images or a dataset.")
    ] = None,
    validation_size: Annotated[
        int, typer.Option("--validation-size", help="Validation images per task.")
    ] = 500,
    int8_scheme: Annotated[
        str, typer.Option("--int8-scheme", help="u8u8 or reduce_range (both exact on any CPU).")
    ] = "u8u8",
    max_logit_diff: Annotated[float, typer.Option("--max-logit-diff", help="fp32 gate.")] = 1e-3,
    min_agreement_fp16: Annotated[float, typer.Option("--min-agreement-fp16")] = 0.995,
    min_agreement_int8: Annotated[float, typer.Option("--min-agreement-int8")] = 0.98,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export encoder + text heads as one ONNX graph, validated against PyTorch first."""

    def call():
        from clipship.exporter.onnx_export import Gates
        from clipship.exporter.onnx_export import export as run
        from clipship.runtime.tasks import get_tasks, read_taskfile, with_local_data

        if not onnx:
            raise MethodError("nothing to export: --onnx is the format clipship writes")
        names = [n for n in (tasks or "").split(",") if n and n != "all"] or None
        val_tasks = read_taskfile(taskfile) if taskfile else []
        if data_dir is not None:
            val_tasks = with_local_data(val_tasks or get_tasks(names or "all"), data_dir)
        gates = Gates(
            max_logit_diff=max_logit_diff,
            min_agreement_fp16=min_agreement_fp16,
            min_agreement_int8=min_agreement_int8,
        )
        return run(
            model,
            heads_dir,
            out,
            pretrained=pretrained,
            tasks=names,
            precisions=[p for p in precision.split(",") if p],
            validation_tasks=val_tasks,
            validation_data=validation_data,
            validation_size=validation_size,
            gates=gates,
            force=force,
            tensorrt=tensorrt,
            max_batch=max_batch,
            int8_scheme=int8_scheme,
        )

    result = _run(call)
    if json_out:
        print(json.dumps(result["report"], indent=2))
        return
    from clipship.reports import ExportReport

    for variant, s in ExportReport.from_json(result["report"]).summary().items():
        print(
            f"{variant}: max |Δlogit| {s['max_abs_logit_diff']:.2e}, top-1 agreement ≥ "
            f"{100 * s['min_top1_agreement']:.2f} % per task ({s['disagreements']} of "
            f"{s['images']} images disagree)"
        )
    print(f"exported → {result['out']}/")


@app.command()
def predict(
    export_dir: Annotated[Path, typer.Argument(help="Folder written by `clipship export`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    task: Annotated[str | None, typer.Option("--task", help="Which exported task.")] = None,
    top_k: Annotated[int, typer.Option("--top-k")] = 5,
    variant: Annotated[str, typer.Option("--variant", help="fp32, fp16 or int8.")] = "fp32",
    provider: Annotated[str, typer.Option("--provider", help="cpu, cuda, tensorrt.")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Classify images with the exported graph (onnxruntime, numpy and Pillow only)."""

    def call():
        from clipship.exporter.predict import predict as run

        return run(export_dir, images, task=task, top_k=top_k, variant=variant, provider=provider)

    results = _run(call)
    if json_out:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for row in results:
        top = ", ".join(f"{t['label']} {100 * t['score']:.1f}%" for t in row["top"])
        print(f"{row['image']}: {top}")


@app.command()
def card(
    run_dir: Annotated[Path, typer.Argument(help="Release folder (a merged model folder).")],
    license: Annotated[
        str | None, typer.Option("--license", help="When the base's is unknown.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model name in the card.")] = None,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="Hub id of a pretrained model merged from a local copy."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a README.md clipship did not write.")
    ] = False,
) -> None:
    """Write README.md (Hub model card) offline from the recipe, eval and export reports."""

    def call():
        from clipship.cards.card import write_card

        return write_card(run_dir, license=license, name=name, base_model=base_model, force=force)

    print(_run(call))


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="Release folder (a merged model folder).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="owner/name on the Hub.")],
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch (created if needed).")
    ] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Tag the pushed commit.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    message: Annotated[str | None, typer.Option("--message", help="Commit summary.")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Default: HF_TOKEN, then the saved login.")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Default: HF_ENDPOINT, then huggingface.co.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be uploaded; contact no server.")
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="Also delete remote files the folder does not have.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Upload a release folder to the Hugging Face Hub in one commit (none if nothing changed)."""

    def call():
        from clipship.cards.push import push as push_folder

        return push_folder(
            run_dir,
            repo_id,
            token=token,
            endpoint=endpoint,
            revision=revision,
            tag=tag,
            private=private,
            dry_run=dry_run,
            message=message,
            prune=prune,
        )

    result = _run(call)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    _print_push(result)


def _print_push(result: dict[str, Any]) -> None:
    from clipship.outputs import human_size

    if result["dry_run"]:
        where = f"{result['endpoint']}/{result['repo_id']} ({result['revision']})"
        print(f"dry run: would upload {len(result['files'])} files to {where}")
        for f in result["files"]:
            print(f"  {human_size(f['size']):>10}  {f['path']}")
        print(f"  {human_size(result['bytes']):>10}  total")
        return
    if result["committed"]:
        deleted = f", deleted {len(result['deleted'])}" if result["deleted"] else ""
        print(
            f"pushed {len(result['uploaded'])} changed file(s){deleted} in commit "
            f"{result['commit'][:12]}"
        )
    else:
        print(f"nothing to push: {result['repo_id']} already has these files")
    if result["tag"]:
        print(f"tag {result['tag']} → {result['commit'][:12]}")
    print(result["url"])


@app.command()
def release(
    config: Annotated[Path, typer.Argument(help="Release YAML (see examples/release.yaml).")],
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Default: release_out/<name>.")
    ] = None,
    repo_id: Annotated[str | None, typer.Option("--repo-id", help="Override hub.repo_id.")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Override hub.tag.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Everything but the upload (lists it instead).")
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Use a --run-dir that holds other files.")
    ] = False,
) -> None:
    """Merge → eval → export → card → push in one command, stopping at the first failed gate."""

    def call():
        from clipship.release import release as run_release

        return run_release(
            config, run_dir, repo_id=repo_id, tag=tag, dry_run=dry_run, quiet=quiet, force=force
        )

    summary = _run(call)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        _print_release(summary)
    if summary["status"] == "gate_failed":
        print(f"error: release gate failed: {'; '.join(summary['failed'])}", file=sys.stderr)
        raise typer.Exit(3)


def _print_release(summary: dict[str, Any]) -> None:
    accuracy = summary.get("accuracy") or {}
    if accuracy:
        tasks = list(accuracy.get("merged", {}))
        print("| model | " + " | ".join(tasks) + " |")
        print("|---" * (len(tasks) + 1) + "|")
        for label, row in accuracy.items():
            cells = " | ".join(f"{100 * row[t]:.1f}" if t in row else "—" for t in tasks)
            print(f"| {label} | {cells} |")
    from clipship.release import describe

    for gate in summary.get("gates", []):
        print(f"gate {'pass' if gate['passed'] else 'FAIL'}: {describe(gate)}")
    for variant, row in (summary.get("export") or {}).items():
        print(
            f"export {variant}: max |Δlogit| {row['max_abs_logit_diff']:.1e}, top-1 agreement "
            f"≥ {100 * row['min_top1_agreement']:.2f} % per task ({row['disagreements']} of "
            f"{row['images']} images disagree)"
        )
    if summary.get("card"):
        print(f"card: {summary['card']}")
    if summary.get("push"):
        _print_push(summary["push"])


BudgetOpt = Annotated[str, typer.Option("--budget", help="smoke (tests, < 1 min) or full (demo).")]


@minibench_app.command("build")
def minibench_build(
    out: Annotated[
        Path | None, typer.Option("--out", help="Copy the pool here (default: cache).")
    ] = None,
    budget: BudgetOpt = "full",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build (or reuse from the cache) the mini-benchmark pool."""

    def call():
        from clipship.minibench.build import BUDGETS, build

        if budget not in BUDGETS:
            raise MethodError(f"--budget {budget}: choose {' or '.join(BUDGETS)}")
        return build(out, budget, seed, force=force, quiet=quiet)

    folder = _run(call)
    print(folder)


@minibench_app.command("run")
def minibench_run(
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated merge methods, or all.")
    ] = "task_arithmetic,ties",
    pool_dir: Annotated[
        Path | None, typer.Option("--pool-dir", help="A built pool (default: build).")
    ] = None,
    budget: BudgetOpt = "full",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Results folder.")] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge the pool with each method, evaluate everything, write results.{md,json,png}."""

    def call():
        from clipship.minibench.build import build
        from clipship.minibench.run import expand_methods, markdown, run

        chosen = expand_methods([m for m in methods.split(",") if m])
        folder = pool_dir or build(None, budget, seed, quiet=quiet)
        results = run(folder, chosen, out, quiet=quiet)
        return results, markdown(results)

    results, table = _run(call)
    print(json.dumps(results, indent=2) if json_out else table, end="" if not json_out else "\n")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the results.")] = Path("demo_out"),
    budget: BudgetOpt = "full",
    force: ForceOpt = False,
) -> None:
    """Offline demo: build the mini-benchmark (cached), merge with TA and TIES, print the table."""
    from clipship.demo import run_demo

    _run(lambda: run_demo(out, budget=budget, force=force))


def main() -> None:
    import signal

    from clipship.errors import Terminated
    from clipship.outputs import deliver

    def terminate(signum, frame):
        deliver(Terminated())

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)
    try:
        app()
    except Terminated:
        print("error: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        sys.exit(Terminated.exit_code)


if __name__ == "__main__":
    main()
