"""LoRA task models: a PEFT adapter on the pool's pretrained vision tower, read as the full task
encoder it makes, one tensor at a time (FusionBench merges them after ``merge_and_unload``).

A targeted weight W of a linear layer becomes W + s · (B @ A) — ``peft``'s ``merge_and_unload``
in its operation order, with s = ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``);
every other tensor is the pretrained one. Only what can be reproduced exactly is read: plain
LoRA on linear layers of the vision tower, one rank and one alpha. DoRA, rank or alpha patterns,
LoRA biases, ``modules_to_save`` and targets outside the vision tower are refused by name before
any work.

An L-LoRA adapter (FusionBench's ``linearized_adapter_model.safetensors``, Tang et al., ICLR 2024)
holds each LoRA layer's factors A, B and the point A₀, B₀ it was linearized around; FusionBench
evaluates each layer as its first-order Taylor expansion there (``LinearizedModelWraper``, a
``torch.func.jvp``). A LoRA layer is bilinear in (A, B), so that expansion is exactly the linear
layer W + s·(B·A₀ + B₀·A − B₀·A₀): clipship reads the task encoder with that weight, which is
the linearized forward itself (no approximation), and exports like any encoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from clipship.errors import CheckpointError, PoolMismatchError
from clipship.safetensors_io import Checkpoint, TensorInfo, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LINEARIZED_WEIGHTS = "linearized_adapter_model.safetensors"  # FusionBench's L-LoRA
PEFT_PREFIX = "base_model.model."
UNSUPPORTED = {  # adapter_config key → why it cannot be read as weights here
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA biases",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "modules_to_save (whole modules trained beside the adapter)",
    "layers_to_transform": "layers_to_transform",
}


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def is_linearized(folder: Path) -> bool:
    """An L-LoRA adapter: FusionBench's loader reads only its linearized weights."""
    return is_adapter(folder) and (folder / LINEARIZED_WEIGHTS).is_file()


class LoraCheckpoint:
    """The vision tensors of ``base`` with the adapter's updates merged in, read on demand.

    Looks like a :class:`Checkpoint` to the pool: ``tensors`` (the base's vision tensors),
    ``files`` (the adapter's, whose sha256 a recipe records), ``read``, ``close``."""

    def __init__(
        self,
        base: Checkpoint,
        vision_keys: dict[str, str],
        adapter: Checkpoint,
        updates: dict[str, tuple[str, ...]],
        scale: float,
        config: dict[str, Any] | None = None,
    ):
        self.base = base
        self.config = config or {}
        self.adapter = adapter
        self.tensors: dict[str, TensorInfo] = {s: base.tensors[s] for s in vision_keys.values()}
        # stored weight name → (lora_A, lora_B) names, plus (A₀, B₀) names for an L-LoRA
        self.updates = updates
        self.scale = scale
        self.linear = any(len(names) == 4 for names in updates.values())  # an L-LoRA

    @property
    def files(self) -> list[Path]:
        return self.adapter.files

    def read(
        self, name: str, start: int = 0, count: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The merged tensor, or its flat elements ``[start, start + count)``: only the rows
        of W those elements lie in are read and updated (merges read a tensor in slices)."""
        if name not in self.updates:
            return self.base.read(name, start, count, out=out)
        shape = self.tensors[name].shape
        width = shape[1]
        end = math.prod(shape) if count is None else start + count
        first, last = start // width, -(-end // width)  # the rows [first, last) of W
        rows = self.base.read(name, first * width, (last - first) * width).reshape(-1, width)
        # peft on CPU: B @ A in float32 for a half-precision weight, cast back, then added
        work = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
        a, b, *point = self.updates[name]
        a = self.adapter.read(a).to(work)
        b = self.adapter.read(b)[first:last].to(work)
        if point:  # L-LoRA: s·(B·A₀ + B₀·A − B₀·A₀), the LoRA layer's Taylor expansion at A₀, B₀
            a0 = self.adapter.read(point[0]).to(work)
            b0 = self.adapter.read(point[1])[first:last].to(work)
            update = b @ a0 + b0 @ (a - a0)
        else:
            update = b @ a
        rows += update.mul_(self.scale).to(rows.dtype)  # peft: weight += (B @ A) · scaling
        flat = rows.reshape(-1)[start - first * width : end - first * width]
        if out is not None:
            return out.copy_(flat)
        return flat.reshape(shape) if count is None else flat

    def close(self) -> None:
        self.adapter.close()  # the base checkpoint is the pool's pretrained model's


def adapter_config(folder: Path, source: str) -> dict[str, Any]:
    from clipship.schemas import read_json

    config = read_json(folder / ADAPTER_CONFIG, CheckpointError, "adapter config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: {ADAPTER_CONFIG} is not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{source}: a {kind} adapter; only LoRA adapters are task models")
    for key, what in UNSUPPORTED.items():
        value = config.get(key)
        if value not in (None, False, {}, [], "none"):
            raise CheckpointError(f"{source}: the adapter uses {what}, which clipship cannot read")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{source}: {ADAPTER_CONFIG}: {key}={value!r} is not positive")
    return config


def canonical(name: str) -> str:
    """A module path under the vision tower (``encoder.…`` on a ``CLIPVisionTransformer``, as
    FusionBench adapts it, or ``vision_model.encoder.…``) as its ``vision_model.*`` name."""
    return name if name.startswith("vision_model.") else f"vision_model.{name}"


def open_lora(source: str, folder: Path, base: Any) -> tuple[LoraCheckpoint, dict[str, str]]:
    """(the checkpoint, its vision key map) of the adapter in ``folder`` over ``base`` (the
    pool's pretrained :class:`clipship.pool.Model`)."""
    config = adapter_config(folder, source)
    check_base(config.get("base_model_name_or_path"), base, source)
    linear = is_linearized(folder)
    file = folder / (LINEARIZED_WEIGHTS if linear else ADAPTER_WEIGHTS)
    if not file.is_file():
        raise CheckpointError(f"{source}: no {ADAPTER_WEIGHTS} in {folder}")
    adapter = Checkpoint(read_header(file)[0])
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    pairs = linearized_factors(adapter, source) if linear else lora_factors(adapter, source)
    updates: dict[str, tuple[str, ...]] = {}
    for module, parts in sorted(pairs.items()):
        target = canonical(f"{module}.weight")
        if target not in base.vision_keys:
            raise CheckpointError(
                f"{source}: the adapter changes {module}, outside the vision tower of "
                f"{base.source}; only vision-tower adapters are task models"
            )
        if not {"A", "B"} <= set(parts):
            raise CheckpointError(f"{source}: {module} lacks lora_A or lora_B")
        a, b = adapter.tensors[parts["A"]].shape, adapter.tensors[parts["B"]].shape
        weight = base.info(target).shape
        if len(weight) != 2:
            raise CheckpointError(f"{source}: LoRA on {module}, not a linear layer")
        # CLIP's layers are nn.Linear, for which peft turns fan_in_fan_out off: so here
        out_dim, in_dim = weight
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            raise CheckpointError(
                f"{source}: {module}: lora_A {list(a)} and lora_B {list(b)} do not have the rank "
                f"r={r} its config says"
            )
        if (b[0], a[1]) != (out_dim, in_dim):
            raise CheckpointError(
                f"{source}: {module}: lora_B @ lora_A is {[b[0], a[1]]}, the weight is "
                f"{list(weight)}"
            )
        names = (parts["A"], parts["B"])
        if linear:
            a0, b0 = adapter.tensors[parts["A0"]].shape, adapter.tensors[parts["B0"]].shape
            if (a0, b0) != (a, b):
                raise CheckpointError(
                    f"{source}: {module}: the linearization point's factors are {list(a0)} and "
                    f"{list(b0)}, lora_A and lora_B are {list(a)} and {list(b)}"
                )
            names += (parts["A0"], parts["B0"])
        updates[base.vision_keys[target]] = names
    if not updates:
        raise CheckpointError(f"{source}: the adapter changes no weight")
    checkpoint = LoraCheckpoint(base.checkpoint, base.vision_keys, adapter, updates, scale, config)
    return checkpoint, dict(base.vision_keys)


def lora_factors(adapter: Checkpoint, source: str) -> dict[str, dict[str, str]]:
    """module → {"A": name, "B": name} of a peft adapter's tensors."""
    pairs: dict[str, dict[str, str]] = {}
    for name in adapter.tensors:
        module, _, part = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not part or not module:
            raise CheckpointError(f"{source}: {ADAPTER_WEIGHTS} holds {name}, not a LoRA factor")
        pairs.setdefault(module, {})[part.split(".")[0]] = name
    return pairs


def linearized_factors(adapter: Checkpoint, source: str) -> dict[str, dict[str, str]]:
    """module → {"A", "B", "A0", "B0": name} of an L-LoRA file. FusionBench writes each wrapped
    layer's trainable factors as ``<module>.model.lora_A.default.weight`` (then lora_B) and their
    linearization points as ``<module>.params0_values.<i>``, numbered in the same order."""
    found: dict[str, dict[str, Any]] = {}
    for name in adapter.tensors:
        stem = name.removeprefix(PEFT_PREFIX)
        module, sep, rest = stem.partition(".model.lora_")
        if sep and module:
            found.setdefault(module, {"points": []})[rest.split(".")[0]] = name
            continue
        module, sep, index = stem.rpartition(".params0_values.")
        if sep and module and index.isdigit():
            found.setdefault(module, {"points": []})["points"].append((int(index), name))
            continue
        raise CheckpointError(f"{source}: {LINEARIZED_WEIGHTS} holds {name}, not an L-LoRA factor")
    pairs: dict[str, dict[str, str]] = {}
    for module, parts in found.items():
        points = [n for _, n in sorted(parts.pop("points"))]
        if len(points) != 2 or set(parts) != {"A", "B"}:
            raise CheckpointError(
                f"{source}: {module}: an L-LoRA layer holds lora_A, lora_B and their two "
                f"linearization points; found {sorted(parts)} and {len(points)} point(s)"
            )
        pairs[module] = {**parts, "A0": points[0], "B0": points[1]}
    return pairs


def check_base(named: Any, base: Any, source: str) -> None:
    """The adapter was trained on the pool's pretrained model: the same hub id, or the same
    folder (peft records the path or id the base was loaded from)."""
    if not isinstance(named, str) or not named:
        return  # nothing recorded: the pool says which base
    same = named in (base.source, base.repo_id) or (
        Path(named).expanduser().is_dir()
        and Path(named).expanduser().resolve() == Path(base.folder).resolve()
    )
    if not same:
        raise PoolMismatchError(
            f"{source}: the adapter was made on {named}, not on the pool's pretrained model "
            f"({base.source})"
        )
