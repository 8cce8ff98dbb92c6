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
        """The tasks whose own test images validate the graph, read as ``eval`` reads them (the
        hub test sets, ``data_dir`` copies, a task file's or a custom task's own data); none
        when ``validation_data`` serves every task. With no task named, the eight tasks."""
        if self.validation_data is not None:
            return []
        return self.tasks.or_all().select()

    def exported(self) -> list[str] | None:
        """The heads to export: the tasks named (a task pool's, custom tasks included); every
        head in the folder when none is."""
        spec = self.tasks
        if spec.taskpool is not None or spec.custom:
            return [task.name for task in spec.select()]
        return spec.names_only()

    def run(self) -> dict[str, Any]:
        self.check()
        return export(
            self.model,
            self.heads,
            self.out,
            pretrained=self.pretrained,
            tasks=self.exported(),
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
