"""An export as the CLI and ``clipship release`` ask for it, with the defaults of both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipship.errors import ClipshipError
from clipship.exporter.onnx_export import Gates, check_settings, export
from clipship.exporter.quantize import DEFAULT_SCHEME
from clipship.requests import EXPORT_MAX_BATCH, VALIDATION_SIZE, TaskSpec


@dataclass(frozen=True)
class ExportRequest:
    """``tasks`` names what to export (all the heads when it names none) and where each task's
    validation images are (a task file, a data folder); ``validation_data`` serves every task."""

    model: str
    heads: Path
    out: Path
    tasks: TaskSpec = TaskSpec()
    pretrained: str | None = None
    precisions: tuple[str, ...] = ("fp32",)
    validation_data: Path | None = None
    validation_size: int = VALIDATION_SIZE
    int8_scheme: str = DEFAULT_SCHEME
    gates: Gates = field(default_factory=Gates)
    tensorrt: bool = False
    max_batch: int = EXPORT_MAX_BATCH
    onnx: bool = True
    force: bool = False

    def check(self) -> None:
        if not self.onnx:
            raise ClipshipError(
                "nothing to export: `onnx` is the format clipship writes", option="onnx"
            )
        check_settings(
            self.precisions, self.validation_size, self.int8_scheme, self.tensorrt, self.max_batch
        )

    def validation_tasks(self) -> list:
        """The tasks whose own test images validate the graph (none: ``validation_data``)."""
        spec = self.tasks
        if spec.taskfile is None and spec.data_dir is None:
            return []
        if spec.taskfile is None and not spec.names:
            spec = TaskSpec("all", data_dir=spec.data_dir)
        return spec.select()

    def run(self) -> dict[str, Any]:
        self.check()
        return export(
            self.model,
            self.heads,
            self.out,
            pretrained=self.pretrained,
            tasks=self.tasks.names_only(),
            precisions=list(self.precisions),
            validation_tasks=self.validation_tasks(),
            validation_data=self.validation_data,
            validation_size=self.validation_size,
            gates=self.gates,
            force=self.force,
            tensorrt=self.tensorrt,
            max_batch=self.max_batch,
            int8_scheme=self.int8_scheme,
        )
