"""`clipship card`: a Hub model card for a release folder, written offline from the stages' files.

Reads ``clipship_recipe.json`` (required), ``eval_report.json`` (optional; one FusionBench-shaped
report, or one per pool member) and ``export/export_report.json`` (optional), and writes
``README.md`` with front matter that ``huggingface_hub.ModelCard`` parses (license, library,
pipeline tag, base model with ``base_model_relation: merge``, tags, datasets and a model-index
with one accuracy result per evaluated task) plus ``accuracy.png``. Missing inputs give a card
without those sections.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from clipship.errors import ClipshipError
from clipship.outputs import refuse_link, write_bytes_atomic, write_text_atomic
from clipship.reports import ExportReport, read_eval_reports

RECIPE = "clipship_recipe.json"
EVAL_REPORT = "eval_report.json"
EXPORT_REPORT = "export/export_report.json"


def _read(path: Path) -> Any:
    """A JSON input of the card (duplicate keys and NaN refused), or None when absent."""
    from clipship.schemas import read_json

    if not path.exists() and not path.is_symlink():
        return None
    return read_json(path, ClipshipError, "JSON file")


def _base_license(recipe: dict[str, Any]) -> str | None:
    """The pretrained model's license, as the merge read it from its model card."""
    from clipship.pool import card_metadata

    source = recipe["pretrained"]
    if source.get("license") or not source.get("path"):
        return source.get("license")
    return card_metadata(Path(source["path"]) / "README.md").get("license")  # older recipes


def _ours(readme: Path) -> bool:
    """Whether a README.md is a card this command wrote (its tags name clipship)."""
    from clipship.pool import card_metadata

    return "clipship" in (card_metadata(readme).get("tags") or [])


def public_source(entry: dict[str, Any]) -> str:
    """How a recipe source is shown in a published card: its hub id, or a local folder's name."""
    return entry.get("repo_id") or f"local folder `{Path(entry['source']).name}`"


def write_card(
    run_dir: Path | str,
    license: str | None = None,
    name: str | None = None,
    base_model: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``README.md`` (and ``accuracy.png`` when there are results) into ``run_dir``.
    ``base_model`` names the hub id of a pretrained model that was merged from a local copy.
    Each task's dataset comes from the eval report (the hub test set it was evaluated on; none
    for local data). A ``README.md`` that ``clipship card`` did not write is kept unless
    ``force``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from clipship.schemas import check_line

    for option, value in (("license", license), ("name", name), ("base_model", base_model)):
        if value is not None:  # they reach the card's front matter and title: one line each
            check_line(value, f"`{option}`", option=option)
    run = Path(run_dir)
    if not run.is_dir():
        raise ClipshipError(f"{run}: not a folder")
    recipe = _read(run / RECIPE)
    if recipe is None:
        raise ClipshipError(f"{run}: no {RECIPE} (is this a merged model folder?)")
    if not isinstance(recipe, dict) or not {"method", "parameters", "pretrained"} <= set(recipe):
        raise ClipshipError(f"{run / RECIPE}: not a clipship recipe")
    from clipship.pool import hf_id
    from clipship.schemas import Recipe, parse

    parse(Recipe, recipe, str(run / RECIPE))
    for output in ("README.md", "accuracy.png", "routing.png"):
        refuse_link(run / output)  # before any work: the card is not written through a link
    if (run / "README.md").exists() and not force and not _ours(run / "README.md"):
        raise ClipshipError(
            f"{run / 'README.md'} was not written by clipship card: keeping it (pass `force` "
            "to replace it)",
            option="force",
        )
    license = license or _base_license(recipe)
    if not license:
        raise ClipshipError(
            "the base model's license is unknown here: pass `license` (e.g. mit)", option="license"
        )
    data = _read(run / EVAL_REPORT)
    reports = read_eval_reports(data, str(run / EVAL_REPORT)) if data is not None else {}
    rows = {label: report.accuracies() for label, report in reports.items()}
    merged = rows.get("merged") or {}
    name = name or run.resolve().name
    # a Hugging Face id, or no base_model field (a ModelScope id is no Hub model to link)
    base = hf_id(recipe["pretrained"].get("repo_id")) or base_model
    mixture = _mixture(run)
    bases: Any = base
    if mixture is not None:  # a mixture's bases: the pretrained model and every expert
        experts = [e for e in (hf_id(m.get("repo_id")) for m in recipe["models"]) if e]
        bases = [b for b in [base, *experts] if b] or None
    task_datasets = reports["merged"].datasets() if "merged" in reports else {}
    results, datasets = [], []
    for task, accuracy in merged.items():
        hub = task_datasets.get(task)
        if hub:
            datasets.append(hub)
        results.append(
            EvalResult(
                task_type="zero-shot-image-classification",
                task_name="Zero-shot image classification",
                dataset_type=hub or task,
                dataset_name=task,
                dataset_split="test",
                metric_type="accuracy",
                metric_name="accuracy",
                metric_value=round(100 * accuracy, 2),
            )
        )
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        base_model=bases,
        base_model_relation="merge" if bases else None,
        tags=["clip", "model-merging", recipe["method"], "clipship"],
        datasets=sorted(set(datasets)) or None,
        model_name=name,
        eval_results=results or None,
    )
    hidden = set()  # tasks no merged task model was tuned on (the eval report marks them)
    if "merged" in reports:
        hidden = {n for n, s in reports["merged"].tasks.items() if s.fields.get("unseen")}
    body = _body(
        name,
        base or public_source(recipe["pretrained"]),
        recipe,
        rows,
        _read(run / EXPORT_REPORT),
        hidden,
    )
    heatmap = None
    if mixture is not None:
        from clipship.eval.routing import routing_heatmap

        merged_report = reports["merged"].to_json() if "merged" in reports else {}
        heatmap = routing_heatmap(merged_report)
        body = _mixture_section(body, mixture, merged_report, heatmap is not None)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    if heatmap is not None:
        write_bytes_atomic(run / "routing.png", heatmap)
    if rows:
        write_bytes_atomic(run / "accuracy.png", _chart(rows))
    write_text_atomic(run / "README.md", str(card))
    return run / "README.md"


def _body(
    name: str,
    base: str,
    recipe: dict[str, Any],
    rows: dict,
    export: dict | None,
    hidden: set[str] = frozenset(),
) -> str:
    params = ", ".join(f"`{k}={v}`" for k, v in recipe["parameters"].items()) or "none"
    lines = [
        f"# {name}",
        "",
        f"A CLIP model whose vision encoder merges {len(recipe['models'])} task encoders tuned "
        f"from {_link(base)} with **{recipe['method']}** ({params}); the "
        "text tower, projections and logit scale are the base model's. Built with clipship.",
        "",
        "## Merge recipe",
        "",
        "| model | source | revision | weights sha256 |",
        "|---|---|---|---|",
    ]
    for entry in [recipe["pretrained"], *recipe["models"]]:
        hashes = ", ".join(f"`{v[:12]}…`" for v in entry["files"].values())
        lines.append(
            f"| {entry['name']} | {public_source(entry)} | {entry.get('revision') or '—'} | "
            f"{hashes} |"
        )
    lines += [
        "",
        f"Seed {recipe['seed']}; `clipship merge --recipe clipship_recipe.json` rebuilds the "
        "same bytes.",
        "",
    ]
    if recipe.get("sweep"):
        lines += _sweep_section(recipe["sweep"])
    if rows:
        tasks = list(next(iter(rows.values())))
        groups = {"avg.": tasks}
        if hidden:  # generalization: seen and unseen tasks averaged apart
            groups["seen avg."] = [t for t in tasks if t not in hidden]
            groups["unseen avg."] = [t for t in tasks if t in hidden]
        heads = [f"{t} (unseen)" if t in hidden else t for t in tasks]
        lines += [
            "## Zero-shot accuracy (%)",
            "",
            "| model | " + " | ".join(heads) + " | " + " | ".join(groups) + " |",
            "|---" * (len(tasks) + len(groups) + 1) + "|",
        ]
        for label, acc in rows.items():
            cells = " | ".join(f"{100 * acc[t]:.1f}" if t in acc else "—" for t in tasks)
            means = []
            for members in groups.values():
                values = [100 * acc[t] for t in members if t in acc]
                means.append(f"{sum(values) / len(values):.1f}" if values else "—")
            lines.append(f"| {label} | {cells} | {' | '.join(means)} |")
        if hidden:
            lines += [
                "",
                f"Unseen: {', '.join(t for t in tasks if t in hidden)}: no merged task model "
                "was tuned on these tasks.",
            ]
        lines += ["", "![per-task accuracy](accuracy.png)", ""]
    if export:
        lines += [
            "## Export validation (ONNX vs PyTorch)",
            "",
            "| variant | task | max abs Δlogit | top-1 agreement |",
            "|---|---|---|---|",
        ]
        validated = ExportReport.from_json(export, EXPORT_REPORT)
        for variant in validated.variants:
            for task, row in validated.task_rows(variant).items():
                lines.append(
                    f"| {variant} | {task} | {row['max_abs_logit_diff']:.2e} | "
                    f"{100 * row['top1_agreement']:.2f} % |"
                )
        lines.append("")
        scheme = validated.fields.get("int8_scheme")
        if isinstance(scheme, dict) and isinstance(scheme.get("candidates"), dict):
            tried = ", ".join(
                f"{name} {100 * c['top1_agreement']:.2f} %"
                + ("" if c["passed"] else " (failed the gate)")
                for name, c in scheme["candidates"].items()
            )
            lines += [
                f"int8 weights: **{scheme['name']}** ({scheme['by']}; top-1 agreement over all "
                f"validation images: {tried}). Its integer products are exact on every CPU.",
                "",
            ]
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        f'classify = pipeline("zero-shot-image-classification", model="{name}")',
        'classify("photo.jpg", candidate_labels=["a cat", "a dog"])',
        "```",
        "",
    ]
    if export:
        lines += [
            "```python",
            "import onnxruntime as ort",
            'session = ort.InferenceSession("export/model.onnx")',
            'logits = session.run(["logits"], {"pixel_values": pixel_values})[0]',
            "```",
            "",
            "or `clipship predict export/ photo.jpg --task <task>`.",
            "",
        ]
    return "\n".join(lines)


def _mixture(run: Path) -> dict[str, Any] | None:
    """``clipship info``'s description of a mixture folder (None for a merged encoder)."""
    from clipship.info import describe_mixture
    from clipship.pool import count_params, load_model

    config = _read(run / "config.json")
    if not isinstance(config, dict) or config.get("model_type") != "clipship_wemoe":
        return None
    model = load_model("mixture", str(run))
    try:
        summary = describe_mixture(model)
        summary["all_params"] = count_params(model)["all_params"]
        return summary
    finally:
        model.checkpoint.close()


def _mixture_section(body: str, mixture: dict[str, Any], report: dict, heatmap: bool) -> str:
    """The card's description of a mixture, after its first paragraph."""
    sparse = mixture["storage"] != "dense"
    routing = (report.get("model_info") or {}).get("routing")
    lines = [
        "## Mixture",
        "",
        f"The vision encoder is a {'sparse ' if sparse else ''}weight-ensembling mixture of "
        f"experts ({'E-WEMoE' if sparse else 'WEMoE'}): outside the MLPs, task arithmetic of the "
        f"experts; in every layer the MLP is the base model's plus Σₜ wₜ τₜ, the routing weights "
        f"w coming from a router of depth {mixture['router_hidden_layers']} "
        f"({'one router shared by every layer' if mixture['shared_gate'] else 'one per layer'}) "
        "over the MLP's input. **Each image is routed on its own**: a prediction does not depend "
        "on the other images in its batch.",
        "",
        "| | |",
        "|---|---|",
        f"| experts (by task) | {', '.join(mixture['experts'])} |",
        f"| parameters (total) | {mixture['all_params']:,} |",
        f"| trainable (the routers) | {mixture['router_params']:,} |",
        f"| task-vector storage | {mixture['storage']}"
        + (f", density {100 * mixture['density']:.1f} %" if sparse else "")
        + " |",
        "",
        "Load it with `AutoModel.from_pretrained(repo, trust_remote_code=True)` (the modeling file "
        "ships in the repository).",
        "",
    ]
    if routing:
        lines += [f"The accuracy below was measured with routing `{routing}`.", ""]
    if heatmap:
        lines += [
            "![mean routing weight per layer and expert, by task](routing.png)",
            "",
        ]
    marker = "## Merge recipe"
    body = body.replace(marker, "\n".join(lines) + "\n" + marker, 1)
    # the modeling file is the repository's own code: the pipeline must be allowed to run it
    return body.replace(
        '-classification", model=', '-classification", trust_remote_code=True, model='
    )


def _sweep_section(sweep: dict[str, Any]) -> list[str]:
    """How ``clipship sweep`` chose the parameters: the grid, the split, the rule, the choice."""
    grid = "; ".join(f"`{k}` ∈ {{{', '.join(map(str, v))}}}" for k, v in sweep["grid"].items())
    chosen = ", ".join(f"`{k}={v}`" for k, v in sweep["chosen"].items())
    sources = sorted({t["source"] for t in sweep.get("tasks", {}).values()})
    split = sweep["select_on"]
    where = f"the **{split}** split" + (f" ({'; '.join(sources)})" if sources else "")
    lines = [
        "## How the parameters were chosen",
        "",
        f"`clipship sweep` merged and evaluated every point of the grid {grid} and chose "
        f"{chosen} on {where}: {sweep['rule']}. The accuracy below is measured on the test "
        "sets, which took no part in the choice."
        if split != "test"
        else f"`clipship sweep` merged and evaluated every point of the grid {grid} and chose "
        f"{chosen} on {where}: {sweep['rule']}.",
        "",
    ]
    if sweep.get("warning"):
        lines += [f"**Warning: {sweep['warning']}.**", ""]
    return lines


def _link(base: str) -> str:
    return base if base.startswith("local folder") else f"[{base}](https://huggingface.co/{base})"


def _chart(rows: dict[str, dict[str, float]]) -> bytes:
    from clipship.runtime.state import figure

    tasks = list(next(iter(rows.values())))
    fig = figure(figsize=(1.6 + 1.2 * len(tasks), 3.6), dpi=110)
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for i, (label, acc) in enumerate(rows.items()):
        ax.bar(
            [j + i * width for j in range(len(tasks))],
            [100 * acc.get(t, 0) for t in tasks],
            width,
            label=label,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
