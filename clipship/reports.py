"""Typed eval reports, read from the file layout the eval stage writes (FusionBench's shape).

One reader for every consumer (the CLI's tables, release's gates, the model card), so the
layout is parsed and checked in one place:

>>> report = EvalReport.from_json({"mnist": {"accuracy": 0.9, "loss": 0.3},
...                                "average": {"accuracy": 0.9, "loss": 0.3}})
>>> report.accuracies()
{'mnist': 0.9}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipship.errors import ClipshipError

META_KEYS = ("average", "average_seen", "average_unseen", "model_info", "robustness")


@dataclass(frozen=True)
class TaskScore:
    """One task's row: accuracy (a fraction) and whatever else the evaluation recorded (loss,
    loss_batch_mean, samples, skipped, dataset, images_per_second), kept as written."""

    accuracy: float
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> str | None:
        """The hub test set the images came from; None for local data."""
        return self.fields.get("dataset")

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, **self.fields}


@dataclass(frozen=True)
class EvalReport:
    """One model on its tasks: ``{task: row, "average": {...}, "model_info": {...}}``. Release's
    ``individual`` rows (each fine-tuned model on its own task) have no average."""

    tasks: dict[str, TaskScore]
    average: dict[str, float] | None = None
    model_info: dict[str, Any] | None = None
    average_seen: dict[str, float] | None = None  # generalization: tasks a task model was
    average_unseen: dict[str, float] | None = None  # tuned on, and the others (rows "unseen")
    # {"severity": k, "corruptions": {name: {task: row, "average": {...}}}} (eval --corruption)
    robustness: dict[str, Any] | None = None

    def accuracies(self) -> dict[str, float]:
        return {name: score.accuracy for name, score in self.tasks.items()}

    def datasets(self) -> dict[str, str | None]:
        return {name: score.dataset for name, score in self.tasks.items()}

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: score.to_json() for name, score in self.tasks.items()}
        if self.average is not None:
            data["average"] = self.average
        for key in ("average_seen", "average_unseen"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.robustness is not None:
            data["robustness"] = self.robustness
        if self.model_info is not None:
            data["model_info"] = self.model_info
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "eval report") -> EvalReport:
        """Checked: every task row has an accuracy in [0, 1]; one error line names ``where``."""
        if not isinstance(data, dict):
            raise ClipshipError(f"{where}: not an eval report")
        tasks = {}
        for name, row in data.items():
            if name in META_KEYS:
                continue
            accuracy = row.get("accuracy") if isinstance(row, dict) else None
            if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)):
                raise ClipshipError(f"{where}: {name} has no accuracy (not an eval report)")
            if not 0 <= accuracy <= 1:  # NaN fails this too
                raise ClipshipError(
                    f"{where}: {name}: {accuracy} is not a finite accuracy in [0, 1]"
                )
            tasks[name] = TaskScore(accuracy, {k: v for k, v in row.items() if k != "accuracy"})
        return cls(
            tasks,
            data.get("average"),
            data.get("model_info"),
            data.get("average_seen"),
            data.get("average_unseen"),
            data.get("robustness"),
        )


def is_single(data: Any) -> bool:
    """One model's report (it has an average), as opposed to one per pool member or stage."""
    return isinstance(data, dict) and "average" in data


def read_eval_reports(data: Any, where: str = "eval report") -> dict[str, EvalReport]:
    """``{label: report}`` from any eval file: one model's report (labelled ``merged``), one
    per pool member (``clipship eval --pool``), or release's pretrained, merged, individual."""
    if is_single(data):
        return {"merged": EvalReport.from_json(data, where)}
    if not isinstance(data, dict) or not data:
        raise ClipshipError(f"{where}: not an eval report")
    reports = {}
    for label, single in data.items():
        if label != "individual" and not is_single(single):
            raise ClipshipError(f"{where}: not an eval report")
        reports[label] = EvalReport.from_json(single, where)
    return reports


@dataclass(frozen=True)
class ExportReport:
    """``export_report.json``: per variant (fp32, fp16, int8), one validation row per task
    (``max_abs_logit_diff``, ``top1_agreement``, ``disagreements``, ``images``, bounds, …)
    beside the variant's other entries; the rest of the file kept as written."""

    variants: dict[str, dict[str, Any]]
    fields: dict[str, Any] = field(default_factory=dict)

    def task_rows(self, variant: str) -> dict[str, dict[str, Any]]:
        """{task: validation row} of one variant (its non-task entries left out)."""
        return {t: r for t, r in self.variants[variant].items() if isinstance(r, dict)}

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per variant: the worst task's Δlogit and agreement, and the disagreeing images."""
        out = {}
        for variant in self.variants:
            rows = self.task_rows(variant).values()
            out[variant] = {
                "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
                "min_top1_agreement": min(r["top1_agreement"] for r in rows),
                "disagreements": sum(r["disagreements"] for r in rows),
                "images": sum(r["images"] for r in rows),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {**self.fields, "variants": self.variants}

    @classmethod
    def from_json(cls, data: Any, where: str = "export report") -> ExportReport:
        if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
            raise ClipshipError(f"{where}: not an export report")
        fields = {k: v for k, v in data.items() if k != "variants"}
        return cls(data["variants"], fields)
