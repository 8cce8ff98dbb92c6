"""The table of merge methods: name → parameters, defaults, paper, and the functions that merge.

Each file in ``clipship/merge/methods/`` defines one ``METHOD = Method(...)``; they are collected
here by name, so adding a method is adding a file. A method sees one piece of a tensor at a time
(``TensorInputs``; the whole tensor with ``per_tensor``) and may declare a ``prepass`` over the
whole pool for a global statistic.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from clipship.errors import MethodError


@dataclass
class TensorInputs:
    """The same flat piece of one tensor from every pool member, in float32: what a method merges.

    ``offset`` is the piece's first element in the flattened tensor, ``shape`` the whole tensor's.
    Element-wise methods (given their pre-pass statistics) merge pieces alone; a method with
    ``per_tensor`` gets each tensor whole (``offset`` 0), for SVDs, norms and per-row rules.
    """

    name: str
    pretrained: torch.Tensor  # [n]
    finetuned: torch.Tensor  # [N, n], one row per task in pool order
    tasks: list[str]
    seed: int = 0
    offset: int = 0
    shape: tuple[int, ...] = ()
    vectors: list[torch.Tensor] | None = None  # the task vectors, computed on first use
    device: str = "cpu"  # where a per-tensor method computes (``merge(device=...)``)

    def task_vector_matrix(self) -> torch.Tensor:
        """The task vectors as one new [N, n] tensor (same bits as ``task_vectors``)."""
        if self.vectors is not None:
            return torch.stack([v.reshape(-1) for v in self.vectors])
        return self.finetuned - self.pretrained

    def release(self) -> None:
        """Drop the task models' values: a method done with them frees memory before a long
        computation (``pretrained`` stays, for the result)."""
        self.finetuned = torch.empty(0)
        self.vectors = None

    @property
    def task_vectors(self) -> list[torch.Tensor]:
        """τ_t = θ_t − θ_pre for each task, in pool order."""
        if self.vectors is None:
            self.vectors = list(self.finetuned - self.pretrained)
        return self.vectors


# A pass over the pool: called with a label for the progress bar, yields every float tensor.
Stream = Callable[[str], Iterator[TensorInputs]]


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, int, str, bool, or list (of floats)
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # returns an error message
    parse: Callable[[Any], Any] | None = None  # for values beyond ``kind`` (lists of names, …)
    required: bool = False  # no default fits every pool (weighted_average's weights)


@dataclass(frozen=True)
class DataUse:
    """How a data-aware method sees images: ``function`` of ``clipship.merge.dataaware``,
    called as ``function(pool, data, preprocess, [heads,] **{key: value for key in keys},
    device=, quiet=)``. Each task model reads its own task's ``split``, one pass in batches
    (``examples`` names the parameter that caps the images, ``shuffle`` whether the rows are a
    seeded permutation) or, ``endless``, ``max_steps`` batches of an endless shuffled loader;
    ``heads`` when it needs the tasks' zero-shot heads; ``seeded`` when it draws from the
    merge's seed; ``mixture`` when the result is a mixture of experts, not one tower."""

    split: str
    function: str
    keys: tuple[str, ...]
    examples: str | None = None
    shuffle: bool = True
    endless: bool = False
    heads: bool = False
    seeded: bool = False  # the function takes the merge's seed (its own draws: routers)
    mixture: bool = False  # it returns a mixture (``MixtureResult``), written as such
    # (batches per task, batch size) of an endless loader from the values; default
    # (max_steps, batch_size)
    schedule: Callable[[dict[str, Any]], tuple[int, int]] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    paper: str
    params: tuple[Param, ...]
    merge: Callable[..., torch.Tensor]  # merge(inputs, **params, **stats) -> merged tensor
    prepass: Callable[..., dict] | None = None  # prepass(stream, numel, tasks, **params) -> stats
    min_models: int = 1
    exact_models: int | None = None  # SLERP takes exactly two task models, pruning one
    check_pool: Callable[[dict, int], str | None] | None = None  # (values, n_models) -> problem
    # A statistic tallied during the merge pass itself (TIES's majority sign). With ``settle``,
    # merge() returns (tensor, tally, depends); settle(tallies) gives the final statistics, and
    # the pieces that depended on the provisional value are merged again if it changed.
    settle: Callable[[list], dict] | None = None
    # merge() sees whole tensors rather than pieces (SVD-, norm- and row-based methods).
    per_tensor: bool = False
    # A data-aware method computes the merged tower from images first; merge() then only hands
    # each tensor of it to the writer (``clipship.merge.dataaware``).
    data: DataUse | None = None
    # θ_pre + λ·M with M independent of the parameter ``scale`` (λ): ``direction`` gives M (as
    # ``merge`` would return it, without λ; ``merge`` is ``scaled(direction)``), so a sweep over
    # λ combines the pool once (``clipship sweep``). ``scalable(values)`` says whether the other
    # values keep that form (DARE over simple averaging has no λ).
    scale: str | None = None
    direction: Callable[..., Any] | None = None
    scalable: Callable[[dict], bool] | None = None

    def cheap(self, values: dict[str, Any]) -> bool:
        """Whether every λ comes from one pass over the pool at these other values."""
        return self.direction is not None and (self.scalable is None or self.scalable(values))

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise MethodError(f"{self.name} has no parameter {name!r} (parameters: {known})")

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, every value parsed and checked."""
        values = {p.name: p.default for p in self.params}
        for name, raw in given.items():
            values[name] = parse_value(self.param(name), raw)
        for p in self.params:
            problem = p.check(values[p.name]) if p.check and values[p.name] is not None else None
            if problem:
                raise MethodError(f"{self.name}: {p.name}={values[p.name]!r} {problem}")
        return values


def combine(
    pretrained: torch.Tensor,
    direction: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ_pre + M·λ: every scaled method's last step, so a sweep's points carry its bits. M·λ is
    rounded first, then θ_pre added (into ``out`` when given: the same bits, no allocation)."""
    scaled = direction * scale if out is None else torch.mul(direction, scale, out=out)
    return scaled.add_(pretrained)


def scaled(direction: Callable[..., Any], scale: str = "scaling_factor") -> Callable[..., Any]:
    """A method's ``merge`` from its ``direction``: θ_pre + λ·M, λ the parameter ``scale``.
    A direction that also returns a tally (TIES) returns ``(M, tally, depends)``."""

    def merge(inputs: TensorInputs, **values: Any) -> Any:
        factor = values.pop(scale)
        out = direction(inputs, **values)
        if isinstance(out, tuple):
            return (combine(inputs.pretrained, out[0], factor), *out[1:])
        return combine(inputs.pretrained, out, factor)

    return merge


# Merges compute in float32: a parameter beyond its range becomes Inf there, and every merged
# entry it touches Inf or NaN, so such a value cannot give a finite merge and is refused before
# any work. Values inside it that still overflow are caught where each merged tensor is written.
FLOAT32_MAX = 3.4028234663852886e38
INT_MAX = 2**31 - 1  # steps, examples, batch sizes: beyond this a run would never end


def finite(value: float) -> str | None:
    return None if math.isfinite(value) else "is not a finite number"


def _number(value: float, where: str, raw: Any) -> float:
    """A parameter's float: finite and inside float32's range, else one line."""
    if not math.isfinite(value):
        raise MethodError(f"{where}={raw!r} is not a finite number")
    if abs(value) > FLOAT32_MAX:
        raise MethodError(
            f"{where}={raw!r} is outside float32's range (±3.4e38): merges compute in float32, "
            "where it is Inf and cannot give a finite merge"
        )
    return value


def unit_interval(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


def parse_value(param: Param, raw: Any) -> Any:
    where = f"parameter {param.name}"
    try:
        if param.parse is not None:
            return param.parse(raw)
        if param.kind is list:
            items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
            if any(isinstance(x, bool) for x in items):
                raise ValueError
            return [_number(float(x), where, raw) for x in items]
        if param.kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if param.kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return _number(float(raw), where, raw)
        if param.kind is int:
            value = _parse_int(raw)
            if abs(value) > INT_MAX:
                raise MethodError(f"{where}={raw!r} is larger than {INT_MAX}")
            return value
        value = str(raw)
        if param.choices and value not in param.choices:
            raise MethodError(f"{where}={value!r}: choose one of {', '.join(param.choices)}")
        return value
    except (ValueError, TypeError):
        raise MethodError(f"{where}={raw!r} is not a valid {param.kind.__name__}") from None


def _is_null(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "null", "none"))


def positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def parse_names(raw: Any) -> list[str] | None:
    """Tensor names (or patterns): a list, or one comma-separated string; null is None."""
    if _is_null(raw):
        return None
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    if not all(isinstance(x, str) and x.strip() for x in items):
        raise ValueError
    return [x.strip() for x in items]


def _parse_int(raw: Any) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError
    return int(str(raw)) if not isinstance(raw, (int, float)) else int(raw)


def parse_optional_int(raw: Any) -> int | None:
    """A whole number, or null."""
    if _is_null(raw):
        return None
    value = _parse_int(raw)
    if abs(value) > INT_MAX:
        raise ValueError
    return value


def parse_number_or_list(raw: Any) -> float | list[float]:
    """One float, or one float per task (a list, or a comma-separated string)."""
    many = isinstance(raw, (list, tuple)) or (isinstance(raw, str) and "," in raw)
    items = (raw if isinstance(raw, (list, tuple)) else raw.split(",")) if many else [raw]
    if any(isinstance(x, bool) for x in items):
        raise ValueError
    values = [float(x) for x in items]
    if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in values):
        raise ValueError
    return values if many else values[0]


def parse_null_bool_or_number(raw: Any) -> bool | float | None:
    """null, a boolean, or a finite number (FusionBench's ``Optional[Union[bool, float]]``)."""
    if _is_null(raw):
        return None
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "on"):
        return True
    if text in ("false", "no", "off"):
        return False
    value = float(text)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ValueError
    return value


_METHODS: dict[str, Method] = {}


def method_table() -> dict[str, Method]:
    """Every registered method by name (discovered from ``clipship.merge.methods``)."""
    if not _METHODS:
        package = importlib.import_module("clipship.merge.methods")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            method = getattr(module, "METHOD", None)
            if method is not None:
                _METHODS[method.name] = method
    return dict(_METHODS)


def get_method(name: str) -> Method:
    table = method_table()
    if name not in table:
        raise MethodError(f"unknown merge method {name!r} (known: {', '.join(sorted(table))})")
    return table[name]


def method_rows() -> list[dict[str, Any]]:
    """``clipship methods --json``: each method's name, summary, paper and parameters."""
    return [
        {
            "name": m.name,
            "summary": m.summary,
            "paper": m.paper,
            "reads": m.data.split if m.data else None,  # the split a data-aware method reads
            # swept from one pass over the pool (``clipship sweep``)
            "cheap_to_sweep": [m.scale] if m.direction is not None else [],
            "params": {
                p.name: {
                    "default": p.default,
                    "help": p.help,
                    **({"choices": list(p.choices)} if p.choices else {}),
                }
                for p in m.params
            },
        }
        for m in method_table().values()
    ]
