"""``make demo``: the whole merge stage offline, on a small seeded pool built on the spot."""

from __future__ import annotations

import shutil
from pathlib import Path

from clipship.outputs import check_target


def run_demo(out: Path, force: bool = False) -> None:
    from clipship.merge import merge
    from clipship.synthetic import build_pool, write_pool_yaml

    out = Path(out)
    check_target(out, force)
    if out.exists():
        shutil.rmtree(out)
    print(f"building a seeded pool of 4 tiny CLIP task encoders in {out}/pool ...")
    pretrained, models = build_pool(out / "pool", "tiny", 4, seed=0)
    pool_yaml = write_pool_yaml(out / "pool" / "pool.yaml", pretrained, models)
    result = merge(
        str(pretrained),
        {k: str(v) for k, v in models.items()},
        "ties",
        out / "merged",
        {"scaling_factor": 0.3, "threshold": 20},
        quiet=False,
    )

    import torch
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(result.out)
    pixels = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=pixels)
    embeds = getattr(embeds, "pooler_output", embeds)
    print()
    print(f"pool:    {pool_yaml}  (FusionBench modelpool YAML)")
    print(f"merged:  {result.out}/  ({', '.join(result.files)}; ties, λ=0.3, threshold=20 %)")
    print(f"check:   loaded with CLIPModel, image embedding of shape {list(embeds.shape)}")
    print(
        "next:    clipship merge --pool "
        f"{pool_yaml} --method task_arithmetic --lambda 0.3 --out {out}/ta"
    )
    load = f"from transformers import CLIPModel; CLIPModel.from_pretrained('{result.out}')"
    print(f'         python -c "{load}"')
