"""A merge as the CLI and ``clipship release`` ask for it: a pool and a method with its
parameters, or a recipe to replay; for a data-aware method, where each task's images are.
``check()`` validates the whole request before any file is read; ``run()`` checks, then
merges."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipship.errors import MethodError, RecipeError
from clipship.merge.engine import MergeResult, merge, merge_from_recipe, read_recipe
from clipship.merge.registry import Method, get_method
from clipship.outputs import refuse_link
from clipship.requests import Sources, TaskSpec, check_seed

DATA_OPTIONS = ("data_examples", "batch_size", "data_order", "merging_weights")


@dataclass(frozen=True)
class MergeRequest:
    sources: Sources
    out: Path
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    vision_only: bool = False
    max_shard_size: str | int = "5GB"
    device: str | None = None  # None: the recipe's device on a replay, else cpu
    recipe: Path | None = None
    allow_pickle: bool = False
    force: bool = False
    quiet: bool = True
    # Data-aware methods: where each task model's images are (its task's data), how many and
    # in what batches, a fixed order (JSON {task: [rows]}), AdaMerging's merging weights.
    tasks: TaskSpec = field(default_factory=TaskSpec)
    data_examples: int | None = None
    batch_size: int | None = None
    data_order: Path | None = None
    merging_weights: Path | None = None
    save_merging_weights: Path | None = None

    def check(self) -> None:
        """The method and its parameters, or a recipe without them."""
        check_seed(self.seed)
        if self.recipe is not None:
            if self.method or self.params or self.data_examples or self.batch_size:
                raise MethodError(
                    "`recipe` replays a merge: drop the method and its parameters",
                    option="recipe",
                )
            return
        if not self.method:
            raise MethodError(
                "no merge method: pass `method` NAME (see `clipship methods`)", option="method"
            )
        spec = get_method(self.method)
        if spec.data is None:
            given = [o for o in (*DATA_OPTIONS, "save_merging_weights") if getattr(self, o)]
            given += ["data_dir"] if self.tasks.data_dir else []
            given += ["taskfile"] if self.tasks.taskfile else []
            if given:
                raise MethodError(
                    f"{spec.name} reads no images: drop `{given[0]}`", option=given[0]
                )
        spec.resolve(self.method_params(spec))
        if self.save_merging_weights is not None:
            refuse_link(self.save_merging_weights)  # before the images are read, not after
        if not self.sources.pretrained:
            raise MethodError(
                "no pretrained model to merge onto: give `pretrained`", option="pretrained"
            )

    def method_params(self, spec: Method) -> dict[str, Any]:
        """The parameters, with ``data_examples`` and ``batch_size`` under the method's names."""
        params = dict(self.params)
        if self.data_examples is not None:
            if spec.data is None or spec.data.examples is None:
                raise MethodError(
                    f"{spec.name} has no number of examples to set", option="data_examples"
                )
            params[spec.data.examples] = self.data_examples
        if self.batch_size is not None and spec.data is not None:
            params["batch_size"] = self.batch_size
        return params

    def data_options(self, spec: Method, models: list[str]) -> Any:
        """Where a data-aware merge reads each task model's images (None for other methods)."""
        if spec.data is None:
            return None
        from clipship.merge.dataaware.plan import DataOptions

        rows = _read_order(self.data_order) if self.data_order is not None else None
        tasks: tuple = ()
        if self.merging_weights is None:
            names = self.tasks.names or ",".join(models)
            tasks = tuple(dataclasses.replace(self.tasks, names=names).select())
        return DataOptions(tasks, rows, self.merging_weights, self.save_merging_weights)

    def run(self) -> MergeResult:
        self.check()
        options = dict(force=self.force, quiet=self.quiet, allow_pickle=self.allow_pickle)
        if self.recipe is not None:
            recorded = read_recipe(self.recipe)
            spec = get_method(recorded["method"])
            models = [m["name"] for m in recorded["models"]]
            where = {"device": self.device} if self.device else {}
            return merge_from_recipe(
                self.recipe,
                self.out,
                self.sources.pretrained,
                self.sources.models,
                data=self.data_options(spec, models),
                **options,
                **where,
            )
        spec = get_method(self.method or "")
        return merge(
            self.sources.pretrained or "",
            self.sources.models,
            spec.name,
            self.out,
            self.method_params(spec),
            data=self.data_options(spec, list(self.sources.models)),
            seed=self.seed,
            vision_only=self.vision_only,
            max_shard_size=self.max_shard_size,
            device=self.device or "cpu",
            **options,
        )


def _read_order(path: Path) -> dict[str, list[int]]:
    """A fixed fetch order: ``{task: [row, ...]}`` as JSON."""
    from clipship.schemas import read_data_order

    return read_data_order(path, RecipeError)
