"""A mixture's routing map: the mean routing weight of each task's images per layer and expert,
as eval reports it (``routing_weights`` in each task row), drawn as one heatmap per task."""

from __future__ import annotations

import io
from typing import Any


def routing_maps(report: dict[str, Any]) -> dict[str, list[list[float]]]:
    """``{task: [layer][expert]}`` from an eval report's rows (empty for a plain model)."""
    return {
        name: row["routing_weights"]
        for name, row in report.items()
        if isinstance(row, dict) and isinstance(row.get("routing_weights"), list)
    }


def routing_heatmap(report: dict[str, Any]) -> bytes | None:
    """A PNG: one panel per task, layers down, experts across, one colour scale; None when the
    report has no routing (a plain model)."""
    from clipship.runtime.state import figure

    maps = routing_maps(report)
    if not maps:
        return None
    experts = (report.get("model_info") or {}).get("experts")
    width = len(next(iter(maps.values()))[0])
    experts = experts if isinstance(experts, list) and len(experts) == width else list(range(width))
    values = [w for grid in maps.values() for row in grid for w in row]
    low, high = min(values), max(values)
    fig = figure(
        figsize=(0.8 + (1.0 + 0.35 * width) * len(maps), 3.6), dpi=110, layout="constrained"
    )
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    image = None
    for ax, (task, grid) in zip(axes, maps.items()):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=high)
        ax.set_title(task, fontsize=8)
        ax.set_xticks(range(width), [str(e) for e in experts], rotation=90, fontsize=6)
        ax.set_yticks(range(len(grid)), [str(i) for i in range(len(grid))], fontsize=6)
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="mean routing weight")
    fig.suptitle("routing weight per layer × expert, by the images' task", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def heatmap_path(report_path):
    """Where eval writes the heatmap beside its JSON report: ``<stem>.routing.png``."""
    return report_path.with_name(f"{report_path.stem}.routing.png")
