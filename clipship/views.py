"""How the CLI shows results: tables and lines drawn from the typed stage results. Printing
only; every figure comes from the result objects (``clipship.reports``, ``PushResult``,
release's summary)."""

from __future__ import annotations

import re
from typing import Any

# Parameters whose flag has another name.
FLAG_OF = {"scaling_factor": "lambda_", "heads": "heads_dir", "precisions": "precision"}


def error_line(error: Exception, app: Any) -> str:
    """The error's message, each parameter it names (in backquotes) written as this command's
    flag where the command has one (``precision`` → ``--precision``), else plainly."""
    text = str(error)
    if "`" not in text:
        return text
    flags = _flags(app)

    def flag(match: re.Match) -> str:
        name = match.group(1)
        return flags.get(FLAG_OF.get(name, name)) or flags.get(name) or name

    return re.sub(r"`(\w+)`", flag, text)


def _flags(app: Any) -> dict[str, str]:
    """{parameter: its long flag} of the command running now (found on the call stack)."""
    import inspect
    import typing

    groups = [app, *(group.typer_instance for group in app.registered_groups)]
    commands = {c.callback.__code__: c.callback for g in groups for c in g.registered_commands}
    frame = inspect.currentframe()
    while frame is not None and frame.f_code not in commands:
        frame = frame.f_back
    if frame is None:
        return {}
    hints = typing.get_type_hints(commands[frame.f_code], include_extras=True)
    flags = {}
    for name, hint in hints.items():
        for info in getattr(hint, "__metadata__", ()):
            # In Annotated[..., typer.Option("--flag")], typer keeps "--flag" as the default.
            names = (getattr(info, "default", None), *(getattr(info, "param_decls", None) or ()))
            decls = [d for d in names if isinstance(d, str) and d.startswith("--")]
            if decls:
                flags[name] = decls[0]
    return flags


def _table(*columns: str, title: str | None = None) -> Any:
    from rich.table import Table

    return Table(*columns, title=title)


def _show(table: Any) -> None:
    from rich.console import Console

    Console().print(table)


def methods(rows: list[dict[str, Any]]) -> None:
    grid = _table("method", "parameters (default)", "cheap to sweep", "paper")
    for row in rows:
        params = ", ".join(f"{k}={v['default']}" for k, v in row["params"].items()) or "—"
        grid.add_row(row["name"], params, ", ".join(row["cheap_to_sweep"]) or "—", row["paper"])
    _show(grid)


def model_info(rows: list[dict[str, Any]]) -> None:
    columns = ("model", "architecture", "params", "vision params")
    grid = _table(*columns, "vision (image/patch/width/layers)", "dtype")
    for row in rows:
        v = row["vision"]
        shape = (v.get(k) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"))
        grid.add_row(
            row["name"],
            row["architecture"],
            f"{row['model_info']['all_params']:,}",
            f"{row['vision_params']:,}",
            "/".join(map(str, shape)),
            ",".join(row["dtype"]),
        )
    _show(grid)
    for row in rows:  # a mixture's own line: experts, router, storage
        m = row.get("mixture")
        if m:
            density = f", density {100 * m['density']:.1f} %" if m["storage"] != "dense" else ""
            router = "one shared router" if m["shared_gate"] else "a router per layer"
            print(
                f"{row['name']}: mixture of {len(m['experts'])} experts ({', '.join(m['experts'])})"
                f"; {router} of depth {m['router_hidden_layers']}, "
                f"{m['router_params']:,} trainable; {m['routing']} routing; "
                f"{m['storage']} task vectors{density}"
            )


def eval_reports(reports: Any) -> None:
    """One model's table (task, accuracy, loss, images), or a pool's (model × task)."""
    from clipship.reports import EvalReport

    if isinstance(reports, EvalReport):
        grid = _table("task", "accuracy (%)", "loss", "images")
        for name, score in reports.tasks.items():
            loss, samples = score.fields["loss"], score.fields["samples"]
            label = f"{name} (unseen)" if score.fields.get("unseen") else name
            grid.add_row(label, f"{100 * score.accuracy:.2f}", f"{loss:.4f}", str(samples))
        for label, avg in (
            ("average", reports.average),
            ("average, seen", reports.average_seen),
            ("average, unseen", reports.average_unseen),
        ):
            if avg:
                grid.add_row(label, f"{100 * avg['accuracy']:.2f}", f"{avg['loss']:.4f}", "")
    else:
        names = list(next(iter(reports.values())).tasks)
        grid = _table("model", *names, "average", title="zero-shot accuracy (%)")
        for model, report in reports.items():
            accuracy = report.accuracies()
            cells = [f"{100 * accuracy[t]:.1f}" for t in names]
            grid.add_row(model, *cells, f"{100 * (report.average or {})['accuracy']:.1f}")
    _show(grid)
    robustness_table(reports)


def robustness_table(reports: Any) -> None:
    """Accuracy (%) under each corruption: one model's corruption × task table, or a pool's
    (or the mini-benchmark's methods') model × corruption averages."""
    from clipship.eval.robustness import averages
    from clipship.reports import EvalReport

    single = isinstance(reports, EvalReport)
    first = reports if single else next(iter(reports.values()))
    if not first.robustness:
        return
    severity = first.robustness["severity"]
    if single:
        section = first.robustness["corruptions"]
        names = list(first.tasks)
        title = f"accuracy (%) under corruption (generated at severity {severity})"
        grid = _table("corruption", *names, "average", title=title)
        clean = [*(first.tasks[t].accuracy for t in names), first.average["accuracy"]]
        grid.add_row("clean", *(f"{100 * a:.1f}" for a in clean))
        for name, rows in section.items():
            grid.add_row(name, *(f"{100 * rows[t]['accuracy']:.1f}" for t in [*names, "average"]))
    else:
        columns = list(averages(first.to_json()))
        title = f"average accuracy (%) under corruption (severity {severity})"
        grid = _table("model", *columns, title=title)
        for model, report in reports.items():
            values = averages(report.to_json())
            grid.add_row(model, *(f"{100 * values[c]:.1f}" for c in columns))
    _show(grid)


def export_lines(figures: dict[str, dict[str, Any]], prefix: str = "") -> None:
    """Per variant: the worst task's Δlogit and agreement (``ExportReport.summary()``)."""
    for variant, s in figures.items():
        print(
            f"{prefix}{variant}: max |Δlogit| {s['max_abs_logit_diff']:.2e}, top-1 agreement ≥ "
            f"{100 * s['min_top1_agreement']:.2f} % per task ({s['disagreements']} of "
            f"{s['images']} images disagree)"
        )


def push_lines(result: Any) -> None:
    """A ``PushResult``: what was (or, dry, would be) uploaded, the commit, the tag, the URL."""
    from clipship.outputs import human_size

    if result.dry_run:
        where = f"{result.endpoint}/{result.repo_id} ({result.revision})"
        print(f"dry run: would upload {len(result.files)} files to {where}")
        for f in result.files:
            print(f"  {human_size(f['size']):>10}  {f['path']}")
        print(f"  {human_size(result.bytes):>10}  total")
        return
    if result.committed:
        deleted = f", deleted {len(result.deleted)}" if result.deleted else ""
        changed = len(result.uploaded)
        print(f"pushed {changed} changed file(s){deleted} in commit {result.commit[:12]}")
    else:
        print(f"nothing to push: {result.repo_id} already has these files")
    if result.tag:
        print(f"tag {result.tag} → {result.commit[:12]}")
    print(result.url)


def release_summary(summary: dict[str, Any]) -> None:
    from clipship.cards.push import PushResult
    from clipship.release import describe

    accuracy = summary.get("accuracy") or {}
    if accuracy:
        tasks = list(accuracy.get("merged", {}))
        print("| model | " + " | ".join(tasks) + " |")
        print("|---" * (len(tasks) + 1) + "|")
        for label, row in accuracy.items():
            cells = " | ".join(f"{100 * row[t]:.1f}" if t in row else "—" for t in tasks)
            print(f"| {label} | {cells} |")
    for gate in summary.get("gates", []):
        print(f"gate {'pass' if gate['passed'] else 'FAIL'}: {describe(gate)}")
    export_lines(summary.get("export") or {}, prefix="export ")
    if summary.get("card"):
        print(f"card: {summary['card']}")
    if summary.get("push"):
        push_lines(PushResult.from_json(summary["push"]))


def merged(result: Any, vision_only: bool) -> None:
    kind = "CLIPVisionModel" if vision_only else "CLIPModel"
    print(f"merged with {result.method} in {result.seconds:.1f}s → {result.out}/")
    print(f"load it with: transformers.{kind}.from_pretrained({str(result.out)!r})")


def swept(result: Any) -> None:
    report = result.report
    chosen = report["selection"]["split"]
    swept_names = list(report["grid"])
    test = "test" in report
    grid = _table(*swept_names, f"average ({chosen})", *(["average (test)"] if test else []))
    for i, point in enumerate(report["points"]):
        cells = [str(point["parameters"][k]) for k in swept_names]
        cells.append(f"{100 * point[chosen]['average']['accuracy']:.2f}")
        if test:
            cells.append(f"{100 * point['test']['average']['accuracy']:.2f}")
        if i == report["best"]["index"]:
            cells = [f"[bold]{c}[/bold]" for c in cells]
        grid.add_row(*cells)
    _show(grid)
    best = ", ".join(f"{k}={v}" for k, v in result.best.items())
    print(f"chosen on {chosen}: {best}; best/ and sweep.md, sweep.json, sweep.png in {result.out}")
    if report["selection"]["on_test_data"]:
        print(f"warning: {report['selection']['warning']}")


def heads(shapes: dict[str, list[int]], out: Any) -> None:
    sizes = ", ".join(f"{k} {v[0]}×{v[1]}" for k, v in shapes.items())
    print(f"{len(shapes)} heads → {out}/ ({sizes})")


def export_result(result: dict[str, Any]) -> None:
    from clipship.reports import ExportReport

    export_lines(ExportReport.from_json(result["report"]).summary())
    print(f"exported → {result['out']}/")


def predictions(results: list[dict[str, Any]]) -> None:
    for row in results:
        top = ", ".join(f"{t['label']} {100 * t['score']:.1f}%" for t in row["top"])
        print(f"{row['image']}: {top}")
