"""A merge as the CLI and ``clipship release`` ask for it: a pool and a method with its
parameters, or a recipe to replay. ``check()`` validates the whole request before any file is
read; ``run()`` checks, then merges."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipship.errors import MethodError
from clipship.merge.engine import MergeResult, merge, merge_from_recipe
from clipship.merge.registry import get_method
from clipship.requests import Sources


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

    def check(self) -> None:
        """The method and its parameters, or a recipe without them."""
        if self.recipe is not None:
            if self.method or self.params:
                raise MethodError(
                    "`recipe` replays a merge: drop the method and its parameters",
                    option="recipe",
                )
            return
        if not self.method:
            raise MethodError(
                "no merge method: pass `method` NAME (see `clipship methods`)", option="method"
            )
        get_method(self.method).resolve(self.params)
        if not self.sources.pretrained:
            raise MethodError(
                "no pretrained model to merge onto: give `pretrained`", option="pretrained"
            )

    def run(self) -> MergeResult:
        self.check()
        options = dict(force=self.force, quiet=self.quiet, allow_pickle=self.allow_pickle)
        if self.recipe is not None:
            where = {"device": self.device} if self.device else {}
            return merge_from_recipe(
                self.recipe,
                self.out,
                self.sources.pretrained,
                self.sources.models,
                **options,
                **where,
            )
        return merge(
            self.sources.pretrained or "",
            self.sources.models,
            self.method or "",
            self.out,
            self.params,
            seed=self.seed,
            vision_only=self.vision_only,
            max_shard_size=self.max_shard_size,
            device=self.device or "cpu",
            **options,
        )
