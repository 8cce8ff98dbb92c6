"""Images/s of clipship's eval input path + forward, next to FusionBench's per-image processor.

Both sides run the same ViT-B/32-shaped model (random weights: speed does not depend on them) at
batch 32 over the same JPEG-encoded images of mixed sizes, with the same number of DataLoader
workers, and are timed side by side in one run:

- clipship: workers decode, resize and crop to uint8; batches go to the device (pinned memory on
  GPU) and are normalised there with a lookup table; then the forward pass.
- FusionBench: workers call ``CLIPProcessor(images=[image])`` per image (float32 pixel values),
  batches go to the device, then the same forward pass.

    python benchmarks/eval_throughput.py [--device auto] [--images 512] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch

from clipship.machine import describe


class JpegImages(torch.utils.data.Dataset):
    def __init__(self, count: int, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.blobs = []
        for _ in range(count):
            h, w = rng.integers(200, 500, 2)
            pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).resize((w, h))  # smooth, photo-like content
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            self.blobs.append(buffer.getvalue())

    def __len__(self) -> int:
        return len(self.blobs)

    def image(self, index: int):
        from PIL import Image

        return Image.open(io.BytesIO(self.blobs[index]))


class Clipship(torch.utils.data.Dataset):
    def __init__(self, images: JpegImages, preprocess):
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.preprocess.to_uint8(self.images.image(i)))


class PerImageProcessor(torch.utils.data.Dataset):
    def __init__(self, images: JpegImages, processor):
        self.images, self.processor = images, processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images.image(i).convert("RGB")
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]


def run(loader, forward, prepare, device: str) -> float:
    start = time.perf_counter()
    count = 0
    for batch in loader:
        pixels = prepare(batch.to(device, non_blocking=True))
        forward(pixels)
        count += len(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args()
    print(describe())

    from synthetic import B32
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from clipship.machine import pick_device
    from clipship.runtime.data import Preprocess
    from clipship.runtime.model import PRECISIONS

    device = pick_device(args.device)
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**B32["vision_config"])).to(device).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    preprocess = Preprocess.from_config(processor.to_dict())
    table = preprocess.lookup_table().to(device)
    images = JpegImages(args.images)
    autocast = torch.autocast(
        device.split(":")[0], dtype=PRECISIONS[args.precision], enabled=args.precision != "fp32"
    )

    @torch.no_grad()
    def forward(pixels):
        with autocast:
            return model(pixel_values=pixels)[1]

    def loader(dataset):
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            num_workers=args.workers,
            pin_memory=device.startswith("cuda"),
        )

    forward(torch.zeros(args.batch_size, 3, 224, 224, device=device))  # warm-up
    ours = run(
        loader(Clipship(images, preprocess)),
        forward,
        lambda b: preprocess.normalize(b, table),
        device,
    )
    theirs = run(loader(PerImageProcessor(images, processor)), forward, lambda b: b, device)
    name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {name}; ViT-B/32, batch {args.batch_size}, {args.images} JPEGs, "
        f"{args.workers} workers, {args.precision}"
    )
    print(f"clipship (uint8 workers + on-device normalise): {ours:8.1f} images/s")
    print(f"FusionBench (CLIPProcessor per image):           {theirs:8.1f} images/s")
    print(f"ratio: {ours / theirs:.2f}×")


if __name__ == "__main__":
    main()
