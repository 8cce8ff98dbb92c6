"""Hostile and broken input, one table: every case is one ``error:`` line on stderr, the stated
exit code, nothing left behind, and no token or unrelated local path in any output."""

import json
from pathlib import Path

import pytest
from PIL import Image

from .conftest import run_cli
from .test_eval import MNIST, PRETRAINED, REF

TOKEN = "hf_hostile_secret_token_42"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs the cases point at: a merged model, heads, an export, images, task files."""
    root = tmp_path_factory.mktemp("hostile")
    env = {"CLIPSHIP_CACHE": str(root / "cache"), "HF_TOKEN": TOKEN}
    run = lambda *args: run_cli(*args, env=env)  # noqa: E731
    images = root / "digits"
    images.mkdir()
    for i, u8 in enumerate(REF["images"].numpy()[:40]):
        Image.fromarray(u8).save(images / f"{i:02d}.png")
    folder = root / "folder"
    for i, (u8, label) in enumerate(zip(REF["images"].numpy(), REF["labels"].tolist())):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(u8).save(folder / str(label) / f"{i}.png")
    assert run("heads", PRETRAINED, "--tasks", "mnist", "--out", root / "heads").returncode == 0
    merged = run(
        "merge", "--pretrained", PRETRAINED, "--model", f"mnist={MNIST}",
        "--method", "task_arithmetic", "--out", root / "merged", "--quiet",
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    export = run(
        "export", root / "merged", "--heads", root / "heads", "--out", root / "export",
        "--validation-data", images, "--validation-size", "40",
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "a_file").write_text("not a folder")
    (root / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    for name, spec in {
        "no_placeholder": {"classnames": ["0", "1"], "templates": ["a photo."]},
        "empty_classes": {"classnames": [], "templates": ["{c}"]},
        "no_classes": {"templates": ["{c}"]},
        "twice": {"classnames": ["a", "a"], "templates": ["{c}"]},
        "with_data": {"classnames": [str(i) for i in range(10)], "data": str(folder)},
    }.items():
        (root / f"{name}.json").write_text(json.dumps({"tasks": {"digits": spec}}))
    datadir = root / "datadir"
    (datadir / "digits").mkdir(parents=True)
    return root


def bomb(path):
    """A PNG that claims 30000 × 30000 pixels (Pillow's decompression-bomb guard)."""
    Image.new("L", (30000, 30000)).save(path, optimize=False)


# fmt: off
CASES = {
    "eval --workers -1": (["eval", "{world}/merged", "--task", "d={world}/folder", "--workers", "-1"], 1, "--workers -1"),
    "eval huge batch": (["eval", "{world}/merged", "--task", "d={world}/folder", "--batch-size", "99999999999999999999"], 1, "--batch-size"),
    "eval corrupt parquet": (["eval", "{world}/merged", "--taskfile", "{world}/parquet_task.json"], 1, "bad.parquet"),
    "eval template without {c}": (["eval", "{world}/merged", "--taskfile", "{world}/no_placeholder.json"], 1, "has no {c} placeholder"),
    "eval classnames []": (["eval", "{world}/merged", "--taskfile", "{world}/empty_classes.json"], 1, "tasks.digits.classnames: must not be empty"),
    "eval no classnames": (["eval", "{world}/merged", "--taskfile", "{world}/no_classes.json"], 1, "tasks.digits.classnames: missing"),
    'eval a class twice': (['eval', '{world}/merged', '--taskfile', '{world}/twice.json'], 1, "class name 'a' is given twice"),
    "eval binary classnames": (["eval", "{world}/merged", "--task", "d={world}/folder", "--classnames", "{world}/binary.txt"], 1, "not a text file"),
    "eval taskfile data and --data-dir": (["eval", "{world}/merged", "--taskfile", "{world}/with_data.json", "--data-dir", "{world}/datadir"], 1, "use one"),
    "eval --out a folder": (["eval", "{world}/merged", "--task", "d={world}/folder", "--out", "{world}/heads"], 1, "is a folder"),
    "eval --out unwritable": (["eval", "{world}/merged", "--task", "d={world}/folder", "--out", "/proc/clipship/report.json"], 1, "cannot write"),
    "heads --out /proc": (["heads", "{pretrained}", "--tasks", "mnist", "--out", "/proc/x"], 1, "cannot write"),
    "export --out /proc": (["export", "{world}/merged", "--heads", "{world}/heads", "--out", "/proc/x", "--validation-data", "{world}/digits"], 1, "cannot write"),
    "export --out = the model": (["export", "{world}/merged", "--heads", "{world}/heads", "--out", "{world}/merged", "--force", "--validation-data", "{world}/digits"], 1, "would replace an input"),
    "export --precision ,": (["export", "{world}/merged", "--heads", "{world}/heads", "--out", "{tmp}/e", "--precision", ","], 1, "name at least one"),
    "export edited heads": (["export", "{world}/merged", "--heads", "{tmp}/heads", "--out", "{tmp}/e", "--validation-data", "{world}/digits"], 1, "changed since they were built"),
    "merge --out = a source": (["merge", "--pretrained", "{pretrained}", "--model", "a={world}/merged", "--method", "task_arithmetic", "--out", "{world}/merged", "--force"], 1, "would replace an input"),
    "eval --out = the task file": (["eval", "{world}/merged", "--taskfile", "{world}/with_data.json", "--out", "{world}/with_data.json", "--force"], 1, "would replace an input"),
    "merge --max-shard-size lots": (["merge", "--pretrained", "{pretrained}", "--model", "mnist={mnist}", "--method", "task_arithmetic", "--max-shard-size", "lots", "--out", "{tmp}/m"], 1, "--max-shard-size"),
    "predict --top-k 0": (["predict", "{world}/export", "{world}/digits/00.png", "--top-k", "0"], 1, "--top-k"),
    "predict --top-k -1": (["predict", "{world}/export", "{world}/digits/00.png", "--top-k", "-1"], 1, "--top-k"),
    "predict folder is a file": (["predict", "{world}/a_file", "{world}/digits/00.png"], 1, "not an export folder"),
    "predict decompression bomb": (["predict", "{world}/export", "{tmp}/bomb.png"], 1, "bomb.png"),
    "predict malformed export.json": (["predict", "{tmp}/export", "{world}/digits/00.png"], 1, "export.json"),
    "predict missing model.onnx": (["predict", "{tmp}/export", "{world}/digits/00.png"], 1, "model.onnx"),
    "predict corrupt model.onnx": (["predict", "{tmp}/export", "{world}/digits/00.png"], 1, "model.onnx"),
    "predict variant outside": (["predict", "{tmp}/export", "{world}/digits/00.png"], 1, "record_sha256 differs"),
    "card folder is a file": (["card", "{world}/a_file", "--license", "mit"], 1, "not a folder"),
    "card report of the wrong shape": (["card", "{tmp}/run", "--license", "mit"], 1, "eval_report.json"),
    "card NaN accuracy": (["card", "{tmp}/run", "--license", "mit"], 1, "NaN is not a finite number"),
    "card over a hand-written README": (["card", "{tmp}/run", "--license", "mit"], 1, "--force"),
    "finetune --lr nan": (["finetune", "{pretrained}", "--task", "d={world}/folder", "--lr", "nan", "--out", "{tmp}/f"], 1, "--lr"),
    "finetune --lr inf": (["finetune", "{pretrained}", "--task", "d={world}/folder", "--lr", "inf", "--out", "{tmp}/f"], 1, "--lr"),
    "finetune --weight-decay -5": (["finetune", "{pretrained}", "--task", "d={world}/folder", "--weight-decay", "-5", "--out", "{tmp}/f"], 1, "--weight-decay"),
}
# fmt: on


def prepare(case: str, world: Path, tmp: Path) -> None:
    """Inputs a case builds for itself in its own folder."""
    import shutil

    if case == "eval corrupt parquet":
        spec = {"classnames": [str(i) for i in range(10)], "data": str(world / "bad.parquet")}
        (world / "parquet_task.json").write_text(json.dumps({"tasks": {"digits": spec}}))
    elif case == "export edited heads":
        shutil.copytree(world / "heads", tmp / "heads")
        from safetensors.torch import load_file, save_file

        heads = load_file(str(tmp / "heads/text_heads.safetensors"))
        heads["mnist"][0, 0] += 0.5
        save_file(heads, str(tmp / "heads/text_heads.safetensors"), metadata={"format": "pt"})
    elif case == "predict decompression bomb":
        bomb(tmp / "bomb.png")
    elif case.startswith("predict ") and case != "predict folder is a file" and "top-k" not in case:
        shutil.copytree(world / "export", tmp / "export")
        if case == "predict malformed export.json":
            (tmp / "export/export.json").write_text("{not json")
        elif case == "predict missing model.onnx":
            (tmp / "export/model.onnx").unlink()
        elif case == "predict corrupt model.onnx":
            (tmp / "export/model.onnx").write_bytes(b"\x08\x01garbage")
        elif case == "predict variant outside":
            record = json.loads((tmp / "export/export.json").read_text())
            record["variants"]["fp32"] = "../../../etc/passwd"
            (tmp / "export/export.json").write_text(json.dumps(record))
    elif case.startswith("card ") and case != "card folder is a file":
        shutil.copytree(world / "merged", tmp / "run")
        if case == "card report of the wrong shape":
            (tmp / "run/eval_report.json").write_text(json.dumps({"mnist": [1, 2, 3]}))
        elif case == "card NaN accuracy":
            report = {
                "mnist": {"accuracy": float("nan"), "loss": 1.0},
                "average": {"accuracy": 0.5},
            }
            (tmp / "run/eval_report.json").write_text(json.dumps(report))
        elif case == "card over a hand-written README":
            (tmp / "run/README.md").write_text("# My model\n\nWritten by hand.\n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_one_clear_line(world, tmp_path, case):
    args, code, fragment = CASES[case]
    prepare(case, world, tmp_path)

    def inputs():  # the heads cache may gain an entry: it is keyed by content, not an output
        return sorted(p.relative_to(world) for p in world.rglob("*") if "cache" not in p.parts)

    before = inputs()
    where = {
        "world": world,
        "tmp": tmp_path,
        "pretrained": PRETRAINED,
        "mnist": MNIST,
    }
    argv = [a.format(**where) for a in args]
    env = {"CLIPSHIP_CACHE": str(world / "cache"), "HF_TOKEN": TOKEN}
    made_before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(*argv, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert fragment in lines[0], lines[0]
    output = result.stdout + result.stderr
    assert TOKEN not in output and str(Path.home()) + "/" not in output.replace(str(world), "")
    assert str(world / "cache") not in output
    # Nothing left behind: no new or temporary files among the inputs or in the case's folder.
    assert inputs() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == made_before
