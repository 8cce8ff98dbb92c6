"""The CLIP runtime every stage uses: a zero-shot model (a vision tower, the pretrained
projection and logit scale) loaded from a merged folder, an encoder or a hub id, its embeddings
and its logits against text heads, with FusionBench's operation order."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipship.errors import NonFiniteWeightsError, PoolMismatchError
from clipship.lora import canonical
from clipship.memory import own_module
from clipship.pool import load_model, resolve_folder
from clipship.requests import Choice, choice
from clipship.runtime.state import quiet_transformers
from clipship.runtime.tasks import Task

if TYPE_CHECKING:
    from clipship.pool import Model


class Routing(Choice):
    """How a mixture routes an evaluation batch: each image on its own (clipship's default,
    a prediction never depends on its batch neighbours), or FusionBench's evaluation, which
    averages the routing weights over the batch."""

    PER_SAMPLE = "per_sample"
    BATCH = "batch"


class Precision(Choice):
    """Compute precision of evaluation and fine-tuning (fp16 and bf16 through autocast)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


PRECISIONS = {
    Precision.FP32: torch.float32,
    Precision.FP16: torch.float16,
    Precision.BF16: torch.bfloat16,
}


def hub_dataset(task: Task) -> str | None:
    """The hub id of the test set ``task`` was read from; None for local data (``load_dataset``
    also takes a local folder as ``path``: that is no hub dataset, and no path is published)."""
    path = (task.dataset or {}).get("path")
    if task.data or not isinstance(path, str) or Path(path).expanduser().exists():
        return None
    return path if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) else None


class ZeroShotModel(torch.nn.Module):
    """The evaluated vision tower plus the pretrained projection, logit scale and text heads."""

    def __init__(self, vision: Any, projection: torch.nn.Module, logit_scale: torch.Tensor):
        super().__init__()
        self.vision, self.projection = vision, projection
        self.register_buffer("scale", logit_scale.detach().exp().float())

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision(pixel_values=pixel_values)[1]
        embeds = self.projection(pooled).float()
        return embeds / embeds.norm(p=2, dim=-1, keepdim=True)

    def logits(self, embeds: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        # FusionBench's operation order, (head @ imgᵀ)·scale then transpose: bit-equal logits.
        return (head @ embeds.T * self.scale).T


def load_zero_shot(
    model: str, pretrained: str | None, device: str
) -> tuple[ZeroShotModel, Path, dict]:
    """(model on device, pretrained folder, model_info) for a merged folder, encoder or hub id."""
    from transformers import CLIPVisionModel

    from clipship.lora import is_adapter

    folder = resolve_folder(model)[0]
    if is_adapter(folder):
        return _load_adapter(model, folder, pretrained, device)
    checked = load_model("model", model)  # headers only: refuses folders without a vision tower
    checked.checkpoint.close()
    if pretrained is None:
        if not checked.has_text_tower:
            raise PoolMismatchError(
                f"{model} is a vision-only model: pass `pretrained` with the CLIPModel "
                "it was fine-tuned from",
                option="pretrained",
            )
        pretrained_folder = checked.folder
    else:
        pretrained_folder = resolve_folder(pretrained)[0]
    with quiet_transformers():
        clip = clip_class(pretrained_folder).from_pretrained(pretrained_folder)
        if is_mixture(checked.config):  # a WEMoE mixture: its own vision tower, per-sample routing
            mixture = clip
            if checked.folder != pretrained_folder:
                mixture = clip_class(checked.folder).from_pretrained(checked.folder)
            vision = mixture.vision_model
        else:
            vision = CLIPVisionModel.from_pretrained(checked.folder)
    return _finish(model, checked, clip, vision, pretrained_folder, device)


def _load_adapter(
    model: str, folder: Path, pretrained: str | None, device: str
) -> tuple[ZeroShotModel, Path, dict]:
    """A LoRA or L-LoRA adapter folder over its base: ``pretrained``, else the base its config
    names (as ``peft`` loads one). The vision tower is the encoder the adapter makes (for an
    L-LoRA, its linearized forward, exactly: ``clipship.lora``)."""
    from clipship.lora import adapter_config
    from clipship.pool import PRETRAINED

    base_source = pretrained or adapter_config(folder, model).get("base_model_name_or_path")
    if not isinstance(base_source, str) or not base_source:
        raise PoolMismatchError(
            f"{model} is an adapter that names no base model: pass `pretrained` with the CLIP "
            "model it adapts",
            option="pretrained",
        )
    base = load_model(PRETRAINED, base_source)
    member = load_model("model", model, base=base)
    try:
        if not base.has_text_tower:
            raise PoolMismatchError(
                f"{base_source} (the adapter's base) is a vision-only model: pass `pretrained` "
                "with the CLIPModel it was fine-tuned from",
                option="pretrained",
            )
        vision = load_vision(member)
    finally:
        member.checkpoint.close()
        base.checkpoint.close()
    with quiet_transformers():
        clip = clip_class(base.folder).from_pretrained(base.folder)
    return _finish(model, member, clip, vision, base.folder, device)


def _finish(
    model: str, checked: Any, clip: Any, vision: Any, pretrained_folder: Path, device: str
) -> tuple[ZeroShotModel, Path, dict]:
    zero_shot = ZeroShotModel(vision, clip.visual_projection, clip.logit_scale).to(device).eval()
    own_module(zero_shot)  # out of the files' mappings (clipship.memory)
    for name, parameter in zero_shot.named_parameters():  # NaN in, NaN metrics out: refuse
        if not bool(torch.isfinite(parameter).all()):
            raise NonFiniteWeightsError(f"{model}: {name} has NaN or Inf values")
    # Parameters plus a mixture's stored task vectors (float buffers); not position_ids or masks.
    n = sum(t.numel() for t in vision.state_dict().values() if t.is_floating_point())
    info = {"trainable_params": n, "all_params": n, "trainable_percentage": 1.0}
    if is_mixture(checked.config):
        info["routing"] = str(Routing.PER_SAMPLE)  # each image through its own routing weights
        info["experts"] = list(checked.config["wemoe"]["experts"])
    merged_from = task_models(checked.folder)
    if merged_from is not None:
        info["task_models"] = merged_from
    return zero_shot, pretrained_folder, info


def load_vision(model: Model, device: str = "cpu") -> Any:
    """The vision tower of a pool member as a float32 ``CLIPVisionModel`` in eval mode, its
    tensors read one at a time into the model's own (aligned) memory: one copy of the tower,
    where ``from_pretrained`` also maps the whole file, text tower included."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with quiet_transformers(), _no_init():  # every parameter is read below
        config = CLIPVisionConfig.from_dict(dict(model.vision_config))
        vision = CLIPVisionModel._from_config(config).float()
    params = dict(vision.named_parameters())
    names = {canonical(name): name for name in params}
    absent = sorted(set(names) - set(model.vision_keys))  # extra stored buffers are ignored
    if absent:
        raise PoolMismatchError(f"{model.source}: no vision tensor {absent[0]} in its checkpoint")
    for name, param in params.items():
        stored = tuple(model.info(canonical(name)).shape)
        if stored != tuple(param.shape):
            raise PoolMismatchError(
                f"{model.source}: {canonical(name)} is {list(stored)}, its config makes "
                f"{list(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(model.read(canonical(name)))
    return vision.to(device).eval()


def _no_init() -> Any:
    """transformers' switch that skips the random initialisation of a model whose parameters
    are all loaded next (seconds of a B/32's; buffers such as position ids are still made)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # a transformers without it: initialise, then overwrite
        return contextlib.nullcontext()
    return no_init_weights()


def task_models(folder: Path) -> list[str] | None:
    """The task models a merged folder was made from (its recipe's ``models``), or None."""
    from clipship.errors import RecipeError
    from clipship.schemas import Recipe, parse, read_json

    path = folder / "clipship_recipe.json"
    if not path.is_file():
        return None
    recipe = read_json(path, RecipeError, "recipe file")
    return [m.name for m in parse(Recipe, recipe, str(path), RecipeError).models]


def mixture_layers(zero_shot: ZeroShotModel) -> list[Any]:
    """A mixture's MLPs in layer order (empty for a plain encoder)."""
    from clipship.runtime.modeling_clipship_wemoe import WEMoEMLP

    return [m for m in zero_shot.vision.modules() if isinstance(m, WEMoEMLP)]


def set_routing(zero_shot: ZeroShotModel, info: dict[str, Any], routing: str) -> list[Any]:
    """Route a mixture per sample or per batch (``info["routing"]`` says which); a plain
    encoder takes only per_sample. Returns the mixture's MLPs."""
    routing = choice(Routing, routing, "routing")
    layers = mixture_layers(zero_shot)
    if routing != Routing.PER_SAMPLE and not layers:
        raise PoolMismatchError(
            f"`routing` {routing} applies to mixtures (weight_ensembling_moe); this model has "
            "no router",
            option="routing",
        )
    for layer in layers:
        layer.batch_reduce = routing == Routing.BATCH
    if layers:
        info["routing"] = str(routing)
    return layers


def is_mixture(config: dict) -> bool:
    """A weight-ensembling mixture folder (``clipship.merge.mixture``)."""
    return config.get("model_type") == "clipship_wemoe"


def check_mixture(config: dict, where: Any) -> dict:
    """A mixture config's ``wemoe`` section, refused unless this clipship wrote its layout."""
    from clipship.runtime.modeling_clipship_wemoe import FORMAT

    spec = config.get("wemoe")
    written = spec.get("format") if isinstance(spec, dict) else None
    if written != FORMAT:  # another clipship's layout: its tensors would load wrongly
        raise PoolMismatchError(
            f"{where}: mixture format {written!r} is not {FORMAT!r} (written by another "
            "clipship version); merge it again with this one"
        )
    return spec


def clip_class(folder: Path) -> Any:
    """The class that loads ``folder``'s full CLIP model: ``CLIPModel``, or a mixture's."""
    import json

    from transformers import CLIPModel

    config = json.loads((Path(folder) / "config.json").read_text())
    if is_mixture(config):
        from clipship.runtime.modeling_clipship_wemoe import CLIPWEMoEModel

        check_mixture(config, folder)

        return CLIPWEMoEModel
    return CLIPModel
