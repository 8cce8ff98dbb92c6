"""`clipship minibench build`: a complete, real, CPU-sized pool of the eight-task kind.

Four (five with Debian's Fashion-MNIST) real image tasks, a tiny CLIP with the real CLIP BPE
tokenizer pretrained contrastively on a small labelled slice of each task (so zero-shot accuracy
is above chance but far from solved, like ``openai/clip-vit-base-patch32`` on the eight tasks),
and one task encoder per task fine-tuned with ``clipship finetune``. The output is what the real
benchmark looks like on disk: ``pretrained/`` (CLIPModel + tokenizer + processor), one
CLIPVisionModel folder per task, parquet test/train data with ``image``/``label`` columns, a
FusionBench-shaped ``pool.yaml`` and a ``tasks.json`` that ``clipship eval --taskfile`` reads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipship.errors import ClipshipError
from clipship.hashing import file_sha256
from clipship.minibench import sources
from clipship.outputs import atomic_folder, library_versions
from clipship.progress import Bars
from clipship.requests import Sources, check_seed
from clipship.runtime.heads import cache_dir
from clipship.runtime.state import borrows_process_state
from clipship.runtime.tasks import Task

RECIPE_VERSION = 3  # bump whenever the build changes what it produces
IMAGE_SIZE = 32
CONTEXT = 32


@dataclass(frozen=True)
class Budget:
    """How much data and training a build uses."""

    name: str
    train_cap: int | None  # images per task for fine-tuning (None: all)
    test_cap: int | None
    pretrain_per_class: int
    pretrain_steps: int
    finetune_steps: int
    finetune_lr: float = 1e-4


BUDGETS = {
    "smoke": Budget("smoke", 300, 150, 12, 150, 150, 1e-4),
    "full": Budget("full", None, None, 30, 800, 1000, 2e-4),
}
# The 3-class texture task sees fewer labelled images in pretraining, so that, as on the real
# benchmark, every task has room between zero-shot and fine-tuned accuracy.
PRETRAIN_SHARE = {"textures": 0.6}

VISION = {
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "projection_dim": 64,
    "hidden_act": "quick_gelu",
}
TEXT = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": CONTEXT,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "projection_dim": 64,
    "hidden_act": "quick_gelu",
}


def task_definitions() -> dict[str, dict[str, Any]]:
    text = resources.files("clipship.minibench").joinpath("tasks.json").read_text("utf-8")
    return json.loads(text)["tasks"]


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(index) * test_fraction))
        test.append(index[:cut])
        train.append(index[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def texture_patches(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """32×32 patches (stride 16) of each texture: left half → train, right half → test."""
    out: dict[str, list] = {"train": [[], []], "test": [[], []]}
    for label, (_, photo) in enumerate(sorted(sources.skimage_textures().items())):
        for split, (lo, hi) in (("train", (0, 256)), ("test", (256, 512))):
            for top in range(0, photo.shape[0] - 32 + 1, 16):
                for left in range(lo, hi - 32 + 1, 16):
                    out[split][0].append(photo[top : top + 32, left : left + 32])
                    out[split][1].append(label)
    return {k: (np.stack(v[0]), np.array(v[1])) for k, v in out.items()}


def load_task_data(seed: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Every available task as {split: (uint8 images [N, H, W], labels)}."""
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    sets = {
        "mnist": sources.mnist_5k(),
        "animals": sources.animal_mnist(),
        "digits": sources.sklearn_digits(),
    }
    fashion = sources.fashion_mnist()
    if fashion is not None:
        sets["fashion"] = fashion
    for name, (images, labels) in sets.items():
        train, test = stratified_split(labels, 0.3 if name == "digits" else 0.2, seed)
        data[name] = {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
    data["textures"] = texture_patches(seed)
    return data


def cap(
    images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` images, keeping every class (a seeded stratified subset)."""
    if limit is None or len(labels) <= limit:
        return images, labels
    keep, _ = stratified_split(labels, 1 - limit / len(labels), seed)
    return images[keep], labels[keep]


def write_parquet(
    path: Path, images: np.ndarray, labels: np.ndarray, classnames: list[str]
) -> None:
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    from clipship.runtime.state import quiet_datasets

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=classnames)})
    rows = {"image": [Image.fromarray(x) for x in images], "label": labels.tolist()}
    with quiet_datasets():
        Dataset.from_dict(rows, features=features).to_parquet(str(path))


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's stand-in character for every byte, in CLIP's vocabulary order: the printable
    bytes as themselves first, then the others mapped to chr(256 + n) in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def write_tokenizer(folder: Path) -> None:
    """The CLIP BPE tokenizer (49,408 ids) built from open_clip's merges file."""
    from transformers import CLIPTokenizer

    lines = sources.clip_bpe()
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=CONTEXT)
    tokenizer.save_pretrained(folder)


@borrows_process_state
def pretrain(
    folder: Path, tasks: list[Task], data: dict, budget: Budget, seed: int, log, tick=None
) -> None:
    """A tiny CLIPModel trained with a CLIP loss on (image, prompt) pairs of a labelled slice."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from clipship.runtime.data import Preprocess

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=64)
    model = CLIPModel(config)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    preprocess = Preprocess.from_config(processor.to_dict())
    table = preprocess.lookup_table()
    from PIL import Image

    pixels, targets = [], []
    classes: list[tuple[str, str]] = []  # one entry per (task, class)
    for task in tasks:
        images, labels = data[task.name]["train"]
        per_class = max(1, round(budget.pretrain_per_class * PRETRAIN_SHARE.get(task.name, 1.0)))
        images, labels = cap(images, labels, per_class * len(task.classnames), seed)
        batch = torch.stack(
            [torch.from_numpy(preprocess.to_uint8(Image.fromarray(x))) for x in images]
        )
        pixels.append(preprocess.normalize(batch, table))
        targets += [len(classes) + int(y) for y in labels]
        classes += [(task.name, c) for c in task.classnames]
    pixels_all, target = torch.cat(pixels), torch.tensor(targets)
    templates = {t.name: t.templates for t in tasks}
    captions = [(i, t.replace("{c}", c)) for i, (n, c) in enumerate(classes) for t in templates[n]]
    caption_class = torch.tensor([i for i, _ in captions])
    by_class = [torch.nonzero(caption_class == i).flatten() for i in range(len(classes))]
    tokens = tokenizer([text for _, text in captions], padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model.train()
    for step in range(budget.pretrain_steps):
        index = torch.randint(len(target), (128,), generator=gen)
        cls = target[index]
        # Every distinct prompt is encoded once per step; each image takes one of its class's.
        pick = torch.randint(1 << 30, (len(cls),), generator=gen).tolist()
        chosen = torch.stack(
            [by_class[c][p % len(by_class[c])] for c, p in zip(cls.tolist(), pick)]
        )
        image = model.visual_projection(model.vision_model(pixel_values=pixels_all[index])[1])
        text = model.text_projection(model.text_model(**tokens)[1])[chosen]
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        same = (cls[:, None] == cls[None, :]).float()  # pairs of one class are all positives
        loss = (
            torch.sum(-same / same.sum(1, keepdim=True) * logits.log_softmax(1), 1).mean()
            + torch.sum(-same / same.sum(0, keepdim=True) * logits.log_softmax(0), 0).mean()
        ) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if tick is not None:
            tick()
        if (step + 1) % 100 == 0:
            value = float(loss.detach())
            log(f"pretraining step {step + 1}/{budget.pretrain_steps}, loss {value:.3f}")
    model.eval()
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)


def build_key(budget: Budget, seed: int) -> str:
    spec = {
        "recipe": RECIPE_VERSION,
        "budget": budget.__dict__,
        "pretrain_share": PRETRAIN_SHARE,
        "seed": seed,
        "vision": VISION,
        "text": TEXT,
        "tasks": task_definitions(),
        "wheels": {k: w.sha256 for k, w in sources.WHEELS.items()},
        "fashion": sources.fashion_mnist.__defaults__[0].is_dir(),  # type: ignore[index]
        "versions": {k: v for k, v in library_versions().items() if k in ("torch", "transformers")},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ClipshipError(f"`budget` {budget}: choose {' or '.join(BUDGETS)}", option="budget")
    return budget


def pool_sources(budget: str, seed: int = 0, quiet: bool = True) -> Sources:
    """The mini-benchmark as a pool (built, or reused from the cache), with its task file."""
    from clipship.pool import read_pool_yaml

    folder = build(None, budget, seed, quiet=quiet)
    pretrained, models = read_pool_yaml(folder / "pool.yaml")
    return Sources(pretrained, models, folder / "tasks.json")


def build(
    out: Path | None = None,
    budget: str = "full",
    seed: int = 0,
    force: bool = False,
    quiet: bool = True,
) -> Path:
    """Build (or reuse from the cache) the mini-benchmark pool; returns its folder."""
    from clipship.eval.finetune import finetune

    plan = BUDGETS[check_budget(budget)]
    check_seed(seed)
    key = build_key(plan, seed)
    cached = cache_dir() / "minibench" / f"{budget}-seed{seed}-{key[:12]}"

    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)  # stdout: results only

    if not (cached / "build.json").is_file() or force:
        started = time.perf_counter()
        defs = task_definitions()
        log(f"building the {budget} mini-benchmark (seed {seed}) in {cached}")
        data = load_task_data(seed)
        with atomic_folder(cached, force=True) as tmp:
            tasks = []
            for name, split in data.items():
                spec = defs[name]
                (tmp / "data" / name).mkdir(parents=True)
                for part, limit in (("train", plan.train_cap), ("test", plan.test_cap)):
                    images, labels = cap(*split[part], limit, seed)
                    write_parquet(
                        tmp / "data" / name / f"{part}-00000-of-00001.parquet",
                        images,
                        labels,
                        spec["classnames"],
                    )
                tasks.append(
                    Task(
                        name,
                        tuple(spec["classnames"]),
                        tuple(spec["templates"]),
                        None,
                        str(tmp / "data" / name),
                    )
                )
            log(f"data: {', '.join(f'{t.name}' for t in tasks)}")
            write_tokenizer(tmp / "pretrained")
            total = plan.pretrain_steps + len(tasks) * plan.finetune_steps
            with Bars(quiet, "remaining") as bars:
                steps = bars.add("building", total)

                def tick() -> None:
                    bars.advance(steps)

                pretrain(tmp / "pretrained", tasks, data, plan, seed, log, tick)
                for task in tasks:
                    log(f"fine-tuning the {task.name} encoder ({plan.finetune_steps} steps)")
                    finetune(
                        str(tmp / "pretrained"),
                        task,
                        tmp / task.name,
                        steps=plan.finetune_steps,
                        batch_size=32,
                        lr=plan.finetune_lr,
                        seed=seed,
                        device="cpu",
                        checkpoint_every=0,
                        quiet=True,
                        on_step=lambda _: tick(),
                    )
            write_pool_files(tmp, tasks)
            (tmp / "build.json").write_text(
                json.dumps(
                    {
                        "key": key,
                        "budget": plan.__dict__,
                        "seed": seed,
                        "seconds": round(time.perf_counter() - started, 1),
                        "versions": library_versions(),
                        "sha256": weight_hashes(tmp),
                    },
                    indent=2,
                )
                + "\n"
            )
        log(f"built in {time.perf_counter() - started:.0f}s")
    if out is None or Path(out).resolve() == cached.resolve():
        return cached
    with atomic_folder(Path(out), force) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
    return Path(out)


def write_pool_files(folder: Path, tasks: list[Task]) -> None:
    lines = [
        "_target_: fusion_bench.modelpool.CLIPVisionModelPool",
        "_recursive_: false",
        "processor: pretrained",
        "models:",
        "  _pretrained_: pretrained",
    ]
    lines += [f"  {t.name}: {t.name}" for t in tasks]
    (folder / "pool.yaml").write_text("\n".join(lines) + "\n")
    spec = {
        "tasks": {
            t.name: {
                "classnames": list(t.classnames),
                "templates": list(t.templates),
                "data": f"data/{t.name}",
            }
            for t in tasks
        }
    }
    (folder / "tasks.json").write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n")


def weight_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("model.safetensors"))
    }


def pool_tasks(folder: Path) -> list[Task]:
    from clipship.runtime.tasks import read_taskfile

    return read_taskfile(Path(folder) / "tasks.json")
