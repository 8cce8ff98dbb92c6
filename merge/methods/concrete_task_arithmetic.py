"""Concrete Task Arithmetic: θ₀ + Σ_t τ_t · (λ · m̂) with one mask m over every parameter, shared
by the tasks, learned from the Concrete (relaxed Bernoulli) distribution by minimising the
entropy of the merged model's zero-shot predictions on each task's unlabeled test images
(``clipship.merge.dataaware.concrete``). FusionBench's packaged defaults
(``method/concrete_subspace/clip_concrete_task_arithmetic.yaml``); its defects D5 and D7 are
followed unless ``use_batch_size`` and ``final_mask: expected`` say otherwise.
"""

from __future__ import annotations

from clipship.merge.dataaware.concrete import FinalMask, MaskType
from clipship.merge.methods.regmean import unused
from clipship.merge.methods.weight_ensembling_moe import _optional_path
from clipship.merge.registry import DataUse, Method, Param, finite, parse_optional_int, positive


def _steps(values: dict) -> tuple[int, int]:
    """(batches per task, images per batch): FusionBench's loaders give one image (D5)."""
    size = values["batch_size"] if values["use_batch_size"] else 1
    adamerging = "max_adamerging_steps" in values
    steps = 0 if values.get("skip_training") else values["max_steps"]
    return (2 * steps + values["max_adamerging_steps"] if adamerging else steps), size


MASK = (
    Param("scaling_factor", float, 0.3, "λ: every task vector's scale (the start for AdaMerging)",
          check=finite),
    Param("lr", float, 1e-3, "Adam's learning rate for the mask logits", check=positive),
    Param("initial_logits", float, 0.0, "every mask logit's start", check=finite),
    Param("temperature", float, 0.5, "the Concrete distribution's temperature", check=positive),
    Param("eval_mask_type", str, "continuous", "the final mask: a relaxed or a 0/1 draw",
          choices=tuple(MaskType)),
    Param("final_mask", str, "sample",
          "sample: one more random draw (FusionBench, D7); expected: σ(logits), deterministic",
          choices=tuple(FinalMask)),
    Param("clamp_weights", bool, False, "clamp λ to [0, 1] in the merge"),
    Param("optimizer", str, "adam", "the mask's (and λ's) optimizer", choices=("adam",)),
    Param("batch_size", int, 16,
          "test images per task per step, read only with use_batch_size (FusionBench reads 1)",
          check=positive),
    Param("use_batch_size", bool, False,
          "read batch_size images per task per step (FusionBench's loaders give 1: D5)"),
    Param("mask_noise", str, None,
          "the uniforms behind every mask draw (safetensors: step<k>/<param>, final/<param>), "
          "instead of the seeded generator", parse=_optional_path),
    Param("max_examples", int, None,
          "use only the first N test images per task (clipship's; null: all, as FusionBench)",
          check=positive, parse=parse_optional_int),
)  # fmt: skip
KEYS = (
    "scaling_factor", "lr", "initial_logits", "temperature", "eval_mask_type", "final_mask",
    "clamp_weights", "mask_noise", "max_steps",
)  # fmt: skip
TA_KEYS = (*KEYS, "skip_training")

METHOD = Method(
    name="concrete_task_arithmetic",
    summary="Task arithmetic through a shared Concrete mask learned by test-time entropy.",
    paper="https://arxiv.org/abs/2312.06173",
    params=(
        *MASK,
        Param("max_steps", int, 2000, "mask steps (each one batch per task)", check=positive),
        Param(
            "skip_training",
            bool,
            False,
            "no mask steps: the final mask is drawn from the initial logits",
        ),
    ),
    merge=unused,
    data=DataUse(
        "test",
        "concrete_task_arithmetic",
        TA_KEYS,
        examples="max_examples",
        endless=True,
        heads=True,
        seeded=True,
        schedule=_steps,
    ),  # fmt: skip
)
