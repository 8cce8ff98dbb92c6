"""Every CLIP task FusionBench 0.2.33 ships, by every name its CLIPTemplateFactory accepts, with its
prompts byte for byte; the TALL14/TALL20 suites; FusionBench's own task and model pool files."""

import hashlib
import json
import os
from pathlib import Path

import PIL.Image
import pytest

from clipship.errors import ClipshipError, TaskError
from clipship.pool import read_pool_yaml
from clipship.runtime.tasks import (
    aliases,
    builtin_tasks,
    get_tasks,
    read_taskpool_yaml,
    suites,
)

from .conftest import DATA

TABLE = json.loads((DATA / "fusionbench_prompts.json").read_text())
TALL20_ADDED = [
    "oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100",
    "cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2",
]  # fmt: skip
OTHERS = ["tiny-imagenet", "imagenet", "emnist_mnist", "cub-200-2011", "mango-leaf-disease"]


def prompts_sha256(task) -> str:
    texts = [p for c in task.classnames for p in task.prompts(c)]
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def test_every_task_renders_fusionbenchs_prompts_byte_for_byte():
    ours = builtin_tasks()
    assert set(ours) == set(TABLE["tasks"]) and len(ours) == 25
    assert set(TALL20_ADDED + OTHERS) <= set(ours)
    for name, expected in TABLE["tasks"].items():
        task = ours[name]
        assert (len(task.classnames), len(task.templates)) == (
            expected["classes"],
            expected["templates"],
        ), name
        assert prompts_sha256(task) == expected["prompts_sha256"], name


def test_every_fusionbench_name_and_alias_resolves():
    assert aliases() == TABLE["aliases"]
    for alias, name in aliases().items():
        (task,) = get_tasks([alias])
        assert task.classnames == builtin_tasks()[name].classnames
        # a hub id becomes the task's own name (names reach file names); a plain alias stays
        assert task.name == (name if "/" in alias else alias)
    with pytest.raises(TaskError, match="unknown task 'stl11'"):
        get_tasks("stl10,stl11")


def test_suites_are_fusionbenchs_tall14_and_tall20():
    lists = suites()
    assert lists["all"] == lists["tall14"][:8] == lists["tall20"][:8]
    assert lists["tall14"] == lists["all"] + TALL20_ADDED[:6]
    assert lists["tall20"] == lists["all"] + TALL20_ADDED
    assert [t.name for t in get_tasks("tall20")] == lists["tall20"]


def test_fusionbenchs_task_and_model_pool_files_read_as_they_are():
    folder = DATA / "fusionbench_pools"  # copied from fusion_bench_config 0.2.33, unchanged
    for size in (14, 20):
        names = read_taskpool_yaml(folder / f"clip-vit-classification_TALL{size}.yaml")
        assert names == suites()[f"tall{size}"]
        pretrained, models = read_pool_yaml(folder / f"clip-vit-base-patch32_TALL{size}.yaml")
        assert pretrained == "openai/clip-vit-base-patch32" and list(models) == names
        assert models["pcam"] == "tanganke/clip-vit-base-patch32_pcam"
    # the robustness pool names its models through FusionBench's model config group
    path = folder / "clip-vit-base-patch32_robustness_corrupted.yaml"
    pretrained, models = read_pool_yaml(path)
    assert pretrained == "openai/clip-vit-base-patch32"
    assert models == {
        t: f"tanganke/clip-vit-base-patch32_{t}"
        for t in ("stanford-cars", "eurosat", "resisc45", "gtsrb")
    }


def test_the_model_group_rule_is_every_entry_of_fusionbenchs_group(tmp_path):
    """``tests/data/fusionbench_model_group.json``: each one-model file of FusionBench's
    ``model/clip-vit`` group (scripts/fusionbench_tasks.py); the rule reproduces every one."""
    from clipship.pool import model_group

    entries = json.loads((DATA / "fusionbench_model_group.json").read_text())
    assert len(entries) > 60
    for name, content in entries.items():
        assert model_group([{"/model/clip-vit@models": [name]}], tmp_path) == content, name
    with pytest.raises(ClipshipError, match="not one model of FusionBench's clip-vit group"):
        model_group([{"/model/clip-vit@models": ["clip-vit-base-patch32_TALL14"]}], tmp_path)


@pytest.mark.skipif(
    not os.environ.get("CLIPSHIP_FUSIONBENCH"),
    reason="CLIPSHIP_FUSIONBENCH names an installed fusion_bench's folder (for the live check)",
)
def test_the_registry_is_what_the_generator_makes_from_fusionbench(tmp_path):
    """With FusionBench at hand, its modules' lambdas render exactly the committed table."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    before = (
        (root / "clipship/runtime/tasks.json").read_bytes(),
        (DATA / "fusionbench_prompts.json").read_bytes(),
        (DATA / "fusionbench_model_group.json").read_bytes(),
    )
    done = subprocess.run(
        [sys.executable, str(root / "scripts/fusionbench_tasks.py"), "--fusionbench",
         os.environ["CLIPSHIP_FUSIONBENCH"]],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    after = (
        (root / "clipship/runtime/tasks.json").read_bytes(),
        (DATA / "fusionbench_prompts.json").read_bytes(),
        (DATA / "fusionbench_model_group.json").read_bytes(),
    )
    assert after == before


def write_parquet_copies(root: Path, names: list[str], images: int = 3) -> None:
    """A tiny parquet copy of each task's test split: seeded random 32×32 images, labels spread
    over the task's classes (FusionBench's hub layout: test-00000-of-00001.parquet)."""
    import numpy as np
    from datasets import Dataset, Features, Image, Value

    rng = np.random.default_rng(0)
    table = builtin_tasks()
    for name in names:
        classes = len(table[name].classnames)
        pixels = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
        rows = {
            "image": [PIL.Image.fromarray(p) for p in pixels],
            "label": [(i * 7) % classes for i in range(images)],
        }
        features = Features({"image": Image(), "label": Value("int64")})
        (root / name).mkdir(parents=True)
        Dataset.from_dict(rows, features=features).to_parquet(
            str(root / name / "test-00000-of-00001.parquet")
        )


def test_eval_runs_tall20_on_local_copies(tmp_path):
    from .conftest import run_cli

    write_parquet_copies(tmp_path / "data", suites()["tall20"])
    out = tmp_path / "report.json"
    result = run_cli(
        "eval", DATA / "evalref/fixture/pretrained", "--tasks", "tall20",
        "--data-dir", tmp_path / "data", "--out", out, "--json",
        env={"CLIPSHIP_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [n for n in report if n not in ("average", "model_info")] == suites()["tall20"]
    for name in suites()["tall20"]:
        assert report[name]["samples"] == 3 and 0 <= report[name]["accuracy"] <= 1


def test_unseen_is_marked_only_when_every_task_model_is_named_after_a_task():
    from clipship.runtime.tasks import named_after_tasks

    assert named_after_tasks(["mnist", "stanford_cars"], ["svhn"])
    assert named_after_tasks(["digits"], ["digits", "textures"])  # a task file's
    assert not named_after_tasks(["mnist", "run2"], ["mnist", "svhn"])
    assert not named_after_tasks([], ["mnist"])
