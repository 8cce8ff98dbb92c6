"""The eval stage's requests, as the CLI and ``clipship release`` make them: evaluate a model
(or every model of a pool), build text heads, fine-tune one task encoder. Each checks its
settings and resolves its tasks before any model loads, then makes one library call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clipship.errors import SourceNotFoundError
from clipship.eval.evaluate import check_options, distributed_rank, evaluate, evaluate_pool
from clipship.eval.robustness import corruptions
from clipship.outputs import check_target, refuse_link, write_bytes_atomic, write_json_atomic
from clipship.reports import EvalReport
from clipship.requests import EVAL_BATCH_SIZE, Sources, TaskSpec, check_seed


@dataclass(frozen=True)
class EvalOutcome:
    """One report (a model) or one per pool member; ``primary`` is false on the non-zero ranks
    of a torchrun launch, where rank 0 reports for everyone."""

    reports: EvalReport | dict[str, EvalReport]
    primary: bool = True

    def to_json(self) -> dict[str, Any]:
        if isinstance(self.reports, EvalReport):
            return self.reports.to_json()
        return {name: report.to_json() for name, report in self.reports.items()}


@dataclass(frozen=True)
class EvalRequest:
    tasks: TaskSpec
    model: str | None = None
    pretrained: str | None = None
    pool: Sources | None = None
    heads: Path | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = EVAL_BATCH_SIZE
    limit: int | None = None
    workers: int | None = None
    seed: int = 0
    skip_bad_images: bool = False
    routing: str = "per_sample"
    corruption: str | None = None  # NAME[,NAME] or "all": also evaluated under corruptions
    severity: int | None = None
    out: Path | None = None
    force: bool = False
    quiet: bool = True

    def check_settings(self) -> None:
        check_options(self.precision, self.batch_size, self.limit, self.workers, self.routing)
        check_seed(self.seed)
        corruptions(self.corruption, self.severity)

    def check(self) -> list:
        """The settings, the model or pool, and the tasks (returned)."""
        self.check_settings()
        if self.pool is not None and (self.model or self.pretrained):
            raise SourceNotFoundError("give either MODEL or `pool`, not both", option="pool")
        if self.pool is None and not self.model:
            raise SourceNotFoundError(
                "no model: give MODEL (a folder or hub id) or `pool` POOL.yaml", option="model"
            )
        if self.out is not None:
            sources = self.pool.members().values() if self.pool else ()
            inputs = (self.model, self.pretrained, *sources, self.heads, self.tasks.taskfile)
            inputs += (self.tasks.taskpool, self.tasks.classnames, self.tasks.templates)
            check_target(self.out, self.force, inputs=inputs, kind="file")
        return self.tasks.select()

    def run(self) -> EvalOutcome:
        tasks = self.check()
        options = dict(
            heads=self.heads,
            device=self.device,
            precision=self.precision,
            batch_size=self.batch_size,
            limit=self.limit,
            workers=self.workers,
            seed=self.seed,
            skip_bad_images=self.skip_bad_images,
            quiet=self.quiet,
            routing=self.routing,
            corruptions=corruptions(self.corruption, self.severity),
            severity=self.severity,
        )
        if self.pool is not None:
            pretrained = self.pool.pretrained or ""
            reports: Any = evaluate_pool(pretrained, self.pool.models, tasks, **options)
        else:
            reports = evaluate(self.model or "", tasks, pretrained=self.pretrained, **options)
        outcome = EvalOutcome(reports, primary=distributed_rank()[0] == 0)
        if self.out is not None and outcome.primary:
            report = outcome.to_json()
            if isinstance(outcome.reports, EvalReport):  # a mixture's routing map beside it
                from clipship.eval.routing import heatmap_path, routing_heatmap

                png = routing_heatmap(report)
                if png is not None:
                    refuse_link(heatmap_path(self.out))
                    write_bytes_atomic(heatmap_path(self.out), png)
            if self.corruption:  # accuracy per corruption (and task, or pool member)
                from clipship.eval.robustness import heatmap_path, robustness_heatmap

                reports = outcome.reports
                single = isinstance(reports, EvalReport)
                png = robustness_heatmap({"model": reports} if single else reports)
                refuse_link(heatmap_path(self.out))
                write_bytes_atomic(heatmap_path(self.out), png)
            write_json_atomic(self.out, report)
        return outcome


@dataclass(frozen=True)
class HeadsRequest:
    """Zero-shot text heads of a pretrained CLIPModel, written to ``out``."""

    model: str
    out: Path
    tasks: TaskSpec
    device: str = "auto"
    use_cache: bool = True
    force: bool = False

    def run(self) -> dict[str, list[int]]:
        """{task: [classes, embedding size]}."""
        from clipship.machine import pick_device
        from clipship.runtime.heads import build_heads, save_heads

        check_target(self.out, self.force, inputs=(self.model,))
        chosen = self.tasks.or_all().select()
        table, meta = build_heads(
            self.model, chosen, device=pick_device(self.device), use_cache=self.use_cache
        )
        save_heads(self.out, table, meta, self.force)
        return {name: list(head.shape) for name, head in table.items()}


@dataclass(frozen=True)
class FinetuneRequest:
    """One task encoder from a pretrained CLIPModel; see ``clipship.eval.finetune``."""

    pretrained: str
    out: Path
    tasks: TaskSpec
    options: dict[str, Any] = field(default_factory=dict)  # finetune()'s keyword arguments

    def run(self) -> dict[str, Any]:
        from clipship.eval.finetune import finetune

        return finetune(self.pretrained, self.tasks.single(), self.out, **self.options)


@dataclass(frozen=True)
class SweepRequest:
    """``clipship sweep``: a grid over a merge method's parameters, each point merged and
    evaluated, the best on the selection split merged into ``out/best``
    (``clipship.eval.sweep``). ``check()`` refuses bad input before any model loads."""

    sources: Sources
    out: Path
    tasks: TaskSpec
    method: str | None = None
    grid: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    select_on: str = "validation"
    allow_test_selection: bool = False
    val_fraction: float | None = None
    report_test: bool = False
    seed: int = 0
    vision_only: bool = False
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = EVAL_BATCH_SIZE
    limit: int | None = None
    workers: int | None = None
    allow_pickle: bool = False
    force: bool = False
    quiet: bool = True

    def check(self) -> Any:
        """The sweep, every point resolved and every setting checked."""
        from clipship.errors import MethodError, SweepError
        from clipship.eval.sweep import (
            TEST,
            VALIDATION,
            Sweep,
            check_fraction,
            grid_points,
            parse_grid,
        )
        from clipship.merge.registry import get_method

        check_options(self.precision, self.batch_size, self.limit, self.workers)
        check_seed(self.seed)
        if self.select_on not in (VALIDATION, TEST):
            raise SweepError(
                f"`select_on` {self.select_on!r}: choose validation or test", option="select_on"
            )
        if self.select_on == TEST and not self.allow_test_selection:
            raise SweepError(
                "`select_on` test chooses the parameters on the test data, which makes the "
                "reported accuracy optimistic: pass `allow_test_selection` to do it anyway "
                "(every output says so)",
                option="allow_test_selection",
            )
        check_fraction(self.val_fraction)
        if self.val_fraction is not None and self.select_on == TEST:
            raise SweepError("`val_fraction` needs `select_on` validation", option="val_fraction")
        if not self.method:
            raise MethodError(
                "no merge method: pass `method` NAME (see `clipship methods`)", option="method"
            )
        spec = get_method(self.method)
        grid = parse_grid(list(self.grid), spec)
        both = sorted(set(grid) & set(self.params))
        if both:
            raise SweepError(f"{both[0]} is both swept (`grid`) and fixed", option="grid")
        for point in grid_points(grid):
            spec.resolve({**self.params, **point})
        if not self.sources.pretrained:
            raise MethodError(
                "no pretrained model to merge onto: give `pretrained`", option="pretrained"
            )
        tasks = self.tasks
        if not (tasks.names or tasks.taskpool or tasks.custom):  # each task model's own task
            tasks = replace(tasks, names=",".join(self.sources.models))
        tasks = tasks.select()
        resolved = {"method", "grid", "tasks"}  # the request's as given; the sweep's resolved
        settings = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(Sweep)
            if f.name not in resolved and hasattr(self, f.name)
        }
        return Sweep(
            self.sources.pretrained, self.sources.models, spec.name, grid, dict(self.params),
            tasks, **settings,
        )  # fmt: skip

    def run(self) -> Any:
        return self.check().run()
