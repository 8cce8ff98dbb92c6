"""Robustness: accuracy under FusionBench's seven corruptions, as eval reports it (its
``robustness`` section) and draws it (a heatmap PNG beside the report)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from clipship.errors import ClipshipError
from clipship.runtime.corruptions import CORRUPTIONS, SEVERITIES

DEFAULT_SEVERITY = 3


def corruptions(spec: str | None, severity: int | None) -> list[str]:
    """The corruptions ``spec`` names (``all``, or NAME[,NAME]), checked with the severity."""
    if severity is not None and severity not in SEVERITIES:
        raise ClipshipError(f"`severity` {severity}: must be 1 to 5", option="severity")
    if not spec:
        if severity is not None:
            raise ClipshipError("`severity` needs `corruption`", option="severity")
        return []
    names = list(CORRUPTIONS) if spec.strip() == "all" else [n.strip() for n in spec.split(",")]
    for name in names:
        if name not in CORRUPTIONS:
            raise ClipshipError(
                f"unknown corruption {name!r} (one of: {', '.join(CORRUPTIONS)}, or all)",
                option="corruption",
            )
    if len(set(names)) != len(names):
        raise ClipshipError(f"`corruption` {spec}: a name twice", option="corruption")
    return names


def averages(report: dict[str, Any]) -> dict[str, float]:
    """``{"clean": acc, corruption: acc, ...}``: the average accuracy over the tasks."""
    section = report.get("robustness") or {}
    out = {"clean": report["average"]["accuracy"]}
    for name, rows in (section.get("corruptions") or {}).items():
        out[name] = rows["average"]["accuracy"]
    return out


def robustness_heatmap(reports: dict[str, Any]) -> bytes:
    """A PNG of accuracy (%): one model's corruptions × tasks, or several models' (methods,
    pool members) × corruptions (average over the tasks). ``reports``: ``{label: EvalReport
    or its JSON}``."""
    from clipship.runtime.state import figure

    data = {k: r if isinstance(r, dict) else r.to_json() for k, r in reports.items()}
    if len(data) == 1:
        report = next(iter(data.values()))
        section = report["robustness"]["corruptions"]
        tasks = [t for t in next(iter(section.values())) if t != "average"]
        rows = ["clean", *section]
        columns = [*tasks, "average"]
        clean = [*(report[t]["accuracy"] for t in tasks), report["average"]["accuracy"]]
        grid = [[100 * a for a in clean]]
        for name in section:
            grid.append([100 * section[name][t]["accuracy"] for t in columns])
        title = f"accuracy (%) per corruption × task, severity {report['robustness']['severity']}"
    else:
        rows = list(data)
        columns = list(averages(next(iter(data.values()))))
        grid = [[100 * averages(r)[c] for c in columns] for r in data.values()]
        title = "average accuracy (%) per model × corruption"
    fig = figure(figsize=(1.6 + 0.75 * len(columns), 0.9 + 0.38 * len(rows)), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            colour = "black" if value > 60 else "white"
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6, color=colour)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def heatmap_path(report_path: Path) -> Path:
    """Where eval writes the heatmap beside its JSON report: ``<stem>.robustness.png``."""
    return report_path.with_name(f"{report_path.stem}.robustness.png")
