"""Reliability round 2, one table per rule: nothing non-finite is written, gated or published; no
write leaves its folder whatever is planted there; every file read goes through its schema;
names are names; faults end in one line. Each case runs the real command line and asserts: one
``error:`` line with the stated fragment and exit code, nothing written outside the target
(a victim file and folder outside stay untouched), nothing non-finite in any file the case
wrote, and no token or home path printed. (Image bounds: tests/test_image_bounds.py; a faulty
Hub: tests/test_push_faults.py.)"""

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from .conftest import run_cli, write_model
from .test_eval import MNIST, PRETRAINED, REF

TOKEN = "hf_reliability_secret_token_7"
ROOT = Path(__file__).resolve().parents[1]


def clipship(*args, env=None, cwd=None, limit_bytes=None, timeout=300):
    """Run the CLI in a child process; ``limit_bytes`` caps the size of any file it writes
    (RLIMIT_FSIZE: a write beyond it fails with EFBIG, as on a full disk)."""

    def cap():
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "clipship", *map(str, args)],
        env=env or os.environ,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs: a merged model, its heads and export, a digits task with local images, models
    with NaN planted in each place clipship reads, a model whose config lies."""
    root = tmp_path_factory.mktemp("reliability")
    env = {"CLIPSHIP_CACHE": str(root / "cache"), "HF_TOKEN": TOKEN}
    folder = root / "digits"
    for i, (u8, label) in enumerate(zip(REF["images"].numpy(), REF["labels"].tolist())):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(u8).save(folder / str(label) / f"{i}.png")
    task = {"classnames": [str(i) for i in range(10)], "data": str(folder)}
    (root / "tasks.json").write_text(json.dumps({"tasks": {"digits": task}}))
    run = lambda *a: run_cli(*a, env=env)  # noqa: E731
    heads = run("heads", PRETRAINED, "--taskfile", root / "tasks.json", "--out", root / "heads")
    assert heads.returncode == 0, heads.stderr
    merged = run(
        "merge", "--pretrained", PRETRAINED, "--model", f"digits={MNIST}",
        "--method", "task_arithmetic", "--out", root / "merged", "--quiet",
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    export = run(
        "export", root / "merged", "--heads", root / "heads", "--out", root / "export",
        "--taskfile", root / "tasks.json", "--validation-size", "20",
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    weights = load_file(str(PRETRAINED / "model.safetensors"))
    for name, key in {
        "nan_text": next(k for k in weights if k.startswith("text_model.")),
        "nan_scale": "logit_scale",
        "nan_vision": "vision_model.post_layernorm.weight",
    }.items():
        broken = dict(weights)
        broken[key] = broken[key].clone().fill_(float("nan"))
        write_model(root / name, broken, PRETRAINED)
    far = load_file(str(MNIST / "model.safetensors"))  # a task vector of 2 in one tensor
    far["vision_model.post_layernorm.weight"] = weights["vision_model.post_layernorm.weight"] + 2
    write_model(root / "far", far, MNIST)
    write_model(root / "liar", weights, PRETRAINED)
    config = json.loads((root / "liar/config.json").read_text())
    config["vision_config"]["intermediate_size"] += 8
    (root / "liar/config.json").write_text(json.dumps(config))
    return root


def release_file(world: Path, where: Path, **changes) -> Path:
    """A fast release (the evalref fixture, the digits task, no export, no push) with
    ``changes`` merged in (a value of None removes the key)."""
    data = {
        "name": "reliability",
        "pool": {"pretrained": str(PRETRAINED), "models": {"digits": str(MNIST)}},
        "method": "task_arithmetic",
        "eval": {"taskfile": str(world / "tasks.json"), "baselines": False},
        "gates": {"min_average_accuracy": 0.0},
        "card": {"license": "mit"},
    }
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = where / "release.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- the checks every case makes ------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


def assert_finite_outputs(folder: Path, before: dict[str, bytes]) -> None:
    """Nothing non-finite in what a case wrote (files new or changed since ``before``): JSON
    without NaN/Infinity, safetensors finite."""
    from clipship.schemas import loads_json

    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink() or not path.is_file() or before.get(name) == path.read_bytes():
            continue
        if path.suffix == ".json":
            loads_json(path.read_text())  # raises on NaN / Infinity
        elif path.suffix == ".safetensors":
            for key, tensor in load_file(str(path)).items():
                if tensor.is_floating_point():
                    assert bool(torch.isfinite(tensor).all()), f"{path}: {key}"


def check(result, code: int, fragment: str, victims: dict[str, bytes], outside: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    if code:
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
        assert fragment in lines[0], lines[0]
    output = result.stdout + result.stderr
    assert TOKEN not in output
    assert str(Path.home()) + "/" not in output or str(Path.home()) == "/root"
    assert snapshot(outside) == victims, "a write left its folder"


@pytest.fixture
def victim(tmp_path):
    """A file and a folder outside every output, which links planted in outputs point at."""
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "file.txt").write_text("precious\n")
    (outside / "folder" / "keep.txt").write_text("keep me\n")
    return outside


# --- rule 1: nothing non-finite is written, gated or published ------------------------------

# fmt: off
NONFINITE = {
    "merge λ beyond float32": (["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--method", "task_arithmetic", "--lambda", "1e300", "--out", "{tmp}/m"], 1, "outside float32's range"),
    "merge λ NaN": (["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--method", "ties", "--lambda", "nan", "--out", "{tmp}/m"], 1, "not a finite number"),
    "merge overflow at 3e38": (["merge", "--pretrained", "{pre}", "--model", "digits={world}/far", "--method", "task_arithmetic", "--lambda", "3e38", "--out", "{tmp}/m"], 1, "merged tensor vision_model.post_layernorm.weight has NaN or Inf"),
    "merge weights 1e300": (["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--model", "d2={mnist}", "--method", "weighted_average", "--param", "weights=1e300,1", "--out", "{tmp}/m"], 1, "weights"),
    "merge slerp t inf": (["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--model", "d2={mnist}", "--method", "slerp", "--param", "t=inf", "--out", "{tmp}/m"], 1, "t="),
    "merge TSV alpha 1e39": (["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--method", "task_singular_vector", "--param", "alpha=1e39", "--out", "{tmp}/m"], 1, "alpha"),
    "merge steps beyond int": (["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--method", "wudi", "--param", "iter_num=99999999999999", "--out", "{tmp}/m"], 1, "iter_num"),
    "merge NaN text tower copied": (["merge", "--pretrained", "{world}/nan_text", "--model", "digits={mnist}", "--method", "task_arithmetic", "--out", "{tmp}/m"], 1, "of the pretrained model has NaN or Inf"),
    "merge NaN logit_scale copied": (["merge", "--pretrained", "{world}/nan_scale", "--model", "digits={mnist}", "--method", "task_arithmetic", "--out", "{tmp}/m"], 1, "logit_scale of the pretrained model"),
    "eval NaN weights": (["eval", "{world}/nan_vision", "--taskfile", "{world}/tasks.json", "--out", "{tmp}/r.json"], 1, "has NaN or Inf values"),
    "heads NaN text tower": (["heads", "{world}/nan_text", "--taskfile", "{world}/tasks.json", "--out", "{tmp}/h"], 1, "NaN or Inf"),
    "heads NaN logit_scale": (["heads", "{world}/nan_scale", "--taskfile", "{world}/tasks.json", "--out", "{tmp}/h"], 1, "logit_scale is nan"),
    "export --max-logit-diff nan": (["export", "{world}/merged", "--heads", "{world}/heads", "--out", "{tmp}/e", "--taskfile", "{world}/tasks.json", "--max-logit-diff", "nan"], 1, "--max-logit-diff"),
    "export --min-agreement-int8 inf": (["export", "{world}/merged", "--heads", "{world}/heads", "--out", "{tmp}/e", "--taskfile", "{world}/tasks.json", "--min-agreement-int8", "inf"], 1, "--min-agreement-int8"),
    "merge --seed beyond 64 bits": (["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--method", "dare", "--seed", "99999999999999999999999", "--out", "{tmp}/m"], 1, "--seed"),
    "eval --seed negative": (["eval", "{world}/merged", "--taskfile", "{world}/tasks.json", "--seed", "-1", "--out", "{tmp}/r.json"], 1, "--seed"),
    "finetune --lr 1e400": (["finetune", "{pre}", "--taskfile", "{world}/tasks.json", "--lr", "1e400", "--out", "{tmp}/f"], 1, "--lr"),
    "release scaling_factor 1e300": (["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"], 1, "outside float32's range"),
    "release gate NaN": (["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"], 1, "gates.min_average_accuracy"),
    "release export gate inf": (["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"], 1, "gates.export.max_logit_diff"),
    "release max_drop nan": (["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"], 1, "gates.max_drop"),
    "card NaN in eval report": (["card", "{tmp}/model", "--license", "mit"], 1, "eval_report.json"),
    "card Infinity in recipe": (["card", "{tmp}/model", "--license", "mit"], 1, "not a finite number"),
}
# fmt: on


def prepare_nonfinite(case: str, world: Path, tmp: Path) -> None:
    if case == "release scaling_factor 1e300":
        release_file(world, tmp, parameters={"scaling_factor": 1.0e300})
    elif case == "release gate NaN":
        release_file(world, tmp, gates={"min_average_accuracy": float("nan")})
    elif case == "release export gate inf":
        release_file(world, tmp, export={}, gates={"export": {"max_logit_diff": float("inf")}})
    elif case == "release max_drop nan":
        release_file(world, tmp, gates={"max_drop": float("nan")})
    elif case.startswith("card "):
        shutil.copytree(world / "merged", tmp / "model")
        if case == "card NaN in eval report":
            (tmp / "model/eval_report.json").write_text('{"digits": {"accuracy": NaN}}')
        else:
            recipe = (tmp / "model/clipship_recipe.json").read_text()
            (tmp / "model/clipship_recipe.json").write_text(
                recipe.replace('"seed": 0', '"seed": Infinity')
            )


@pytest.mark.parametrize("case", sorted(NONFINITE))
def test_nothing_nonfinite_is_written_or_gated(world, tmp_path, victim, case):
    args, code, fragment = NONFINITE[case]
    prepare_nonfinite(case, world, tmp_path)
    before, prepared = snapshot(victim), snapshot(tmp_path)
    where = {"world": world, "tmp": tmp_path, "pre": PRETRAINED, "mnist": MNIST}
    env = {"CLIPSHIP_CACHE": str(tmp_path / "cache"), "HF_TOKEN": TOKEN}
    result = run_cli(*[a.format(**where) for a in args], env=env)
    check(result, code, fragment, before, victim)
    for output in ("m", "e", "h", "f", "r.json", "run/release"):
        assert not (tmp_path / output).exists(), output
    assert_finite_outputs(tmp_path, prepared)


def test_release_gates_fail_on_a_nonfinite_value():
    """A gate whose value is not a number fails (a comparison with NaN is false both ways)."""
    from clipship.release import accuracy_gates
    from clipship.release_file import Gates
    from clipship.reports import EvalReport, TaskScore

    report = EvalReport({"digits": TaskScore(math.nan)}, {"accuracy": math.nan})
    gates = Gates(min_average_accuracy=0.0, min_accuracy={"digits": 0.0})
    results = accuracy_gates(gates, {"merged": report})
    assert len(results) == 2 and not any(g["passed"] for g in results)


def test_export_gate_fails_on_nan_logit_difference():
    from clipship.exporter.onnx_export import ExportValidationError, Gates, Variant, _gate

    row = {"max_abs_logit_diff": math.nan, "agreement_upper": 1.0, "top1_agreement": 1.0}
    row.update(disagreements=0, images=10)
    with pytest.raises(ExportValidationError, match="max"):
        _gate(Variant.FP32, {"digits": row, "batch_1_7_vs_32_max_diff": 0.0}, ["digits"], Gates())
    row["max_abs_logit_diff"] = 0.0
    with pytest.raises(ExportValidationError, match="batch 1 or 7"):
        _gate(
            Variant.FP32, {"digits": row, "batch_1_7_vs_32_max_diff": math.nan}, ["digits"], Gates()
        )


def test_json_outputs_refuse_nan_naming_the_key(tmp_path):
    from clipship.errors import NonFiniteError
    from clipship.outputs import write_json_atomic

    with pytest.raises(NonFiniteError, match=r"tasks\[1\]\.loss is nan"):
        write_json_atomic(tmp_path / "r.json", {"tasks": [{"loss": 1.0}, {"loss": math.nan}]})
    assert list(tmp_path.iterdir()) == []


# --- rule 2: no write leaves its folder -------------------------------------------------------

# Each case plants a link at a name the command writes (or at a folder on the way to it),
# pointing at the victim outside, then runs the command with --force where it takes one.
# fmt: off
LINKS = {
    "eval --out is a link": ("eval_out", ["eval", "{world}/merged", "--taskfile", "{world}/tasks.json", "--heads", "{world}/heads", "--out", "{tmp}/report.json", "--force"], 1, "symbolic link"),
    "merge --out is a link": ("merge_out", ["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--method", "task_arithmetic", "--out", "{tmp}/m", "--force"], 1, "symbolic link"),
    "heads --out is a link": ("heads_out", ["heads", "{pre}", "--taskfile", "{world}/tasks.json", "--out", "{tmp}/h", "--force"], 1, "symbolic link"),
    "export --out is a link": ("export_out", ["export", "{world}/merged", "--heads", "{world}/heads", "--out", "{tmp}/e", "--taskfile", "{world}/tasks.json", "--force"], 1, "symbolic link"),
    "card README.md is a link": ("card_readme", ["card", "{tmp}/model", "--license", "mit", "--force"], 1, "README.md is a symbolic link"),
    "card accuracy.png is a link": ("card_png", ["card", "{tmp}/model", "--license", "mit", "--force"], 1, "accuracy.png is a symbolic link"),
    "release stages/ is a link": ("run_stages", ["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"], 1, "stages is a symbolic link"),
    "release stages/merge is a link": ("run_merge", ["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"], 1, "merge is a symbolic link"),
    "release marker is a link": ("run_marker", ["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"], 1, ".clipship-release is a symbolic link"),
    "release release/ is a link": ("run_release", ["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"], 1, "release is a symbolic link"),
    "analyze png is a link": ("similarity_png", ["analyze", "similarity", "--pretrained", "{pre}", "--model", "digits={mnist}", "--model", "d2={world}/far", "--out", "{tmp}/sim"], 1, "task_vector_cos_similarity.png is a symbolic link"),
    "merge --save-merging-weights is a link": ("weights_out", ["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--method", "adamerging", "--taskfile", "{world}/tasks.json", "--param", "max_steps=1", "--data-examples", "4", "--batch-size", "4", "--save-merging-weights", "{tmp}/weights.safetensors", "--out", "{tmp}/m"], 1, "weights.safetensors is a symbolic link"),
    "analyze csv is a link": ("similarity_csv", ["analyze", "similarity", "--pretrained", "{pre}", "--model", "digits={mnist}", "--out", "{tmp}/sim", "--force"], 1, "symbolic link"),
    "finetune checkpoints are a link": ("finetune_ckpt", ["finetune", "{pre}", "--taskfile", "{world}/tasks.json", "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1", "--out", "{tmp}/f"], 1, "f.checkpoints is a symbolic link"),
}
# fmt: on


def plant(kind: str, world: Path, tmp: Path, victim: Path) -> None:
    link = lambda at, target: os.symlink(target, at)  # noqa: E731
    if kind == "eval_out":
        link(tmp / "report.json", victim / "file.txt")
    elif kind in ("merge_out", "heads_out", "export_out"):
        link(tmp / {"merge_out": "m", "heads_out": "h", "export_out": "e"}[kind], victim / "folder")
    elif kind.startswith("card_"):
        shutil.copytree(world / "merged", tmp / "model")
        (tmp / "model/eval_report.json").write_text(
            json.dumps({"digits": {"accuracy": 0.5}, "average": {"accuracy": 0.5}})
        )
        name = "README.md" if kind == "card_readme" else "accuracy.png"
        link(tmp / "model" / name, victim / "file.txt")
    elif kind.startswith("run_"):
        release_file(world, tmp)
        run = tmp / "run"
        run.mkdir()
        (run / ".clipship-release").write_text("made by clipship release\n")
        if kind == "run_stages":
            link(run / "stages", victim)
        elif kind == "run_merge":
            (run / "stages").mkdir()
            link(run / "stages/merge", victim / "folder")
        elif kind == "run_marker":
            (run / ".clipship-release").unlink()
            (run / "stages").mkdir()  # an earlier run's folder, so the marker is looked for
            link(run / ".clipship-release", victim / "file.txt")
        elif kind == "run_release":
            link(run / "release", victim / "folder")
    elif kind == "similarity_png":
        (tmp / "sim").mkdir()
        link(tmp / "sim" / "task_vector_cos_similarity.png", victim / "file.txt")
    elif kind == "weights_out":
        link(tmp / "weights.safetensors", victim / "file.txt")
    elif kind == "similarity_csv":
        (tmp / "sim").mkdir()
        link(tmp / "sim" / "task_vector_cos_similarity.csv", victim / "file.txt")
    elif kind == "finetune_ckpt":
        link(tmp / "f.checkpoints", victim / "folder")


@pytest.mark.parametrize("case", sorted(LINKS))
def test_no_write_follows_a_planted_link(world, tmp_path, victim, case):
    kind, args, code, fragment = LINKS[case]
    plant(kind, world, tmp_path, victim)
    before = snapshot(victim)
    where = {"world": world, "tmp": tmp_path, "pre": PRETRAINED, "mnist": MNIST}
    env = {"CLIPSHIP_CACHE": str(tmp_path / "cache"), "HF_TOKEN": TOKEN}
    result = run_cli(*[a.format(**where) for a in args], env=env)
    check(result, code, fragment, before, victim)
    leftovers = [p.name for p in tmp_path.rglob(".*tmp-*")]
    assert leftovers == [], leftovers


def test_minibench_tables_are_not_written_through_links(tmp_path, victim):
    from clipship.errors import OutputError
    from clipship.minibench.run import write_tables

    before = snapshot(victim)
    (tmp_path / "out").mkdir()
    os.symlink(victim / "file.txt", tmp_path / "out" / "results.png")
    with pytest.raises(OutputError, match="results.png is a symbolic link"):
        write_tables(tmp_path / "out", {"rows": {}})
    assert snapshot(victim) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.png"]


def test_temporaries_have_unpredictable_names(tmp_path, victim):
    """The old predictable temporary names (``.<name>.tmp-<pid>``) are not used: a link planted
    there is left alone, and so is what it points at."""
    from clipship.outputs import write_text_atomic

    before = snapshot(victim)
    os.symlink(victim / "file.txt", tmp_path / f".report.json.tmp-{os.getpid()}")
    write_text_atomic(tmp_path / "report.json", "{}\n")
    assert (tmp_path / "report.json").read_text() == "{}\n"
    assert snapshot(victim) == before


def test_heads_cache_entry_planted_as_a_link_is_neither_read_nor_followed(world, tmp_path, victim):
    from clipship.runtime.heads import build_heads
    from clipship.runtime.tasks import read_taskfile

    cache = tmp_path / "cache"
    tasks = read_taskfile(world / "tasks.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSHIP_CACHE", str(cache))
        heads, _ = build_heads(PRETRAINED, tasks)
        entry = next((cache / "heads").glob("*.safetensors"))
        entry.unlink()
        os.symlink(victim / "file.txt", entry)
        before = snapshot(victim)
        again, _ = build_heads(PRETRAINED, tasks)
    assert torch.equal(heads["digits"], again["digits"])
    assert snapshot(victim) == before and entry.is_symlink()


# --- rule 3: every file is read through its schema --------------------------------------------

BOMB = "\n".join(
    [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
)
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB + "\n"

# Release files: (YAML text or a change to the fast release, fragment). Checked before any stage.
# fmt: off
RELEASE_FILES = {
    "alias bomb": ("text", BOMB, "more than 100000 values"),
    "duplicate key": ("text", "method: ties\nmethod: task_arithmetic\npool: {minibench: smoke}\n", "method: the key is given twice"),
    "nesting": ("text", "pool: " + "[" * 200 + "]" * 200 + "\nmethod: ties\n", "nested deeper"),
    "two documents": ("text", "method: ties\n---\nmethod: ties\n", "not valid YAML"),
    "not a mapping": ("text", "- ties\n", "a release file is a mapping"),
    "binary": ("bytes", b"\xff\xfe\x00method", "not a text file"),
    "task list item": ("change", {"eval": {"taskfile": None, "tasks": ["digits", 3]}}, "eval.tasks[1]"),
    "unknown key at depth": ("change", {"export": {"precisionz": ["fp32"]}}, "export.precisionz: unknown key"),
    "wrong type": ("change", {"eval": {"batch_size": "32"}}, "eval.batch_size: expected a whole number"),
    "bool for a number": ("change", {"seed": True}, "seed: expected a whole number"),
    "precision unknown": ("change", {"export": {"precisions": ["fp64"]}}, "export.precisions[0]"),
    "gate task not evaluated": ("change", {"gates": {"min_accuracy": {"mnistt": 0.5}}}, "gates.min_accuracy.mnistt: not an evaluated task"),
    "gate task not in the task file": ("change", {"pool": {"models": {"digits": str(MNIST)}}, "eval": {"tasks": "all"}, "gates": {"min_accuracy": {"svhn": 0.1}}}, "gates.min_accuracy.svhn: not an evaluated task"),
    "pool with two kinds": ("change", {"pool": {"minibench": "smoke"}}, "pool: give exactly one of"),
    "repo id with ..": ("change", {"hub": {"repo_id": "alice/a..b"}}, "hub.repo_id"),
    "method parameter unknown": ("change", {"parameters": {"lambda": 0.3}}, "parameters: task_arithmetic has no parameter 'lambda'"),
}
# fmt: on


@pytest.mark.parametrize("case", sorted(RELEASE_FILES))
def test_release_file_problems_are_one_line_with_their_path(world, tmp_path, victim, case):
    how, value, fragment = RELEASE_FILES[case]
    path = tmp_path / "release.yaml"
    if how == "text":
        path.write_text(value)
    elif how == "bytes":
        path.write_bytes(value)
    else:
        release_file(world, tmp_path, **value)
    before = snapshot(victim)
    env = {"CLIPSHIP_CACHE": str(tmp_path / "cache"), "HF_TOKEN": TOKEN}
    result = run_cli("release", path, "--run-dir", tmp_path / "run", env=env)
    check(result, 1, fragment, before, victim)
    assert len(result.stderr) < 2000
    assert not (tmp_path / "run" / "stages").exists()  # refused before any stage ran


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS from /proc")
def test_an_alias_bomb_costs_no_more_memory_than_a_small_mistake(tmp_path):
    """The 1-GB-when-expanded YAML is refused at the memory of a two-line bad file."""
    from .test_image_bounds import clipship as measured

    (tmp_path / "bomb.yaml").write_text(BOMB)
    (tmp_path / "small.yaml").write_text("- ties\n")
    bomb, bomb_peak = measured(
        "release", tmp_path / "bomb.yaml", cache=tmp_path / "c", peak=tmp_path / "p"
    )
    small, small_peak = measured(
        "release", tmp_path / "small.yaml", cache=tmp_path / "c", peak=tmp_path / "p"
    )
    assert bomb.returncode == small.returncode == 1
    assert "more than 100000 values" in bomb.stderr
    assert bomb_peak <= small_peak + 20 * 1024, (bomb_peak, small_peak)  # KiB


def test_release_schema_validates_the_examples_and_names_deep_errors(tmp_path):
    import jsonschema

    result = run_cli("release", "--schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    examples = [ROOT / "examples/release.yaml"]
    for path in examples:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    data = yaml.safe_load((ROOT / "examples/release.yaml").read_text())
    data["gates"]["export"]["min_agreement_int8"] = 1.5
    with pytest.raises(jsonschema.ValidationError) as error:
        jsonschema.validate(data, schema)
    assert list(error.value.absolute_path) == ["gates", "export", "min_agreement_int8"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    result = run_cli("release", tmp_path / "r.yaml", "--run-dir", tmp_path / "run")
    assert result.returncode == 1
    assert "gates.export.min_agreement_int8" in result.stderr
    committed = ROOT / "examples/release.schema.json"
    assert json.loads(committed.read_text()) == schema, "regenerate: clipship release --schema"


# Other file formats: (files to prepare, command, fragment).
# fmt: off
FILES = {
    "pool yaml duplicate key": (["merge", "--pool", "{tmp}/pool.yaml", "--method", "task_arithmetic", "--out", "{tmp}/m"], "digits: the key is given twice"),
    "pool yaml model mapping without source": (["merge", "--pool", "{tmp}/pool.yaml", "--method", "task_arithmetic", "--out", "{tmp}/m"], "models.digits"),
    "pool yaml alias bomb": (["merge", "--pool", "{tmp}/pool.yaml", "--method", "task_arithmetic", "--out", "{tmp}/m"], "more than 100000 values"),
    "recipe files null": (["merge", "--recipe", "{tmp}/recipe.json", "--pretrained", "{pre}", "--model", "digits={mnist}", "--out", "{tmp}/m"], "pretrained.files"),
    "recipe sha256 missing": (["merge", "--recipe", "{tmp}/recipe.json", "--pretrained", "{pre}", "--model", "digits={mnist}", "--out", "{tmp}/m"], "models[0].files"),
    "recipe duplicate key": (["merge", "--recipe", "{tmp}/recipe.json", "--pretrained", "{pre}", "--model", "digits={mnist}", "--out", "{tmp}/m"], "given twice"),
    "recipe seed as text": (["merge", "--recipe", "{tmp}/recipe.json", "--pretrained", "{pre}", "--model", "digits={mnist}", "--out", "{tmp}/m"], "seed: expected a whole number"),
    "task file classnames a string": (["eval", "{world}/merged", "--taskfile", "{tmp}/tasks.json"], "tasks.digits.classnames: expected a list"),
    "task file templates wrong": (["eval", "{world}/merged", "--taskfile", "{tmp}/tasks.json"], "tasks.digits.templates[0]: expected a text"),
    "task file unknown key": (["eval", "{world}/merged", "--taskfile", "{tmp}/tasks.json"], "tasks.digits.clasnames: unknown key"),
    "heads json edited classnames": (["eval", "{world}/merged", "--taskfile", "{world}/tasks.json", "--heads", "{tmp}/heads"], "record_sha256 differs"),
    "heads json without record hash": (["export", "{world}/merged", "--heads", "{tmp}/heads", "--out", "{tmp}/e", "--taskfile", "{world}/tasks.json"], "no record_sha256"),
    "export.json edited label": (["predict", "{tmp}/export", "{world}/digits/0/3.png"], "record_sha256 differs"),
    "export.json wrong type (rehashed)": (["predict", "{tmp}/export", "{world}/digits/0/3.png"], "preprocessing.crop"),
    "export.json variant outside (rehashed)": (["predict", "{tmp}/export", "{world}/digits/0/3.png"], "is not a file in the folder"),
    "config.json lies": (["merge", "--pretrained", "{pre}", "--model", "digits={world}/liar", "--method", "task_arithmetic", "--out", "{tmp}/m"], "intermediate_size"),
    "data order negative row": (["merge", "--pretrained", "{pre}", "--model", "digits={mnist}", "--method", "regmean", "--taskfile", "{world}/tasks.json", "--data-order", "{tmp}/order.json", "--out", "{tmp}/m"], "rows.digits[0]"),
}
# fmt: on


def prepare_file(case: str, world: Path, tmp: Path) -> None:
    from clipship.schemas import record_sha256

    recipe = json.loads((world / "merged/clipship_recipe.json").read_text())
    if case == "pool yaml duplicate key":
        (tmp / "pool.yaml").write_text(
            f"models:\n  _pretrained_: {PRETRAINED}\n  digits: {MNIST}\n  digits: {MNIST}\n"
        )
    elif case == "pool yaml model mapping without source":
        (tmp / "pool.yaml").write_text(
            f"models:\n  _pretrained_: {PRETRAINED}\n  digits: {{revision: main}}\n"
        )
    elif case == "pool yaml alias bomb":
        (tmp / "pool.yaml").write_text(BOMB + f"models:\n  _pretrained_: {PRETRAINED}\n")
    elif case.startswith("recipe"):
        text = json.dumps(recipe)
        if case == "recipe files null":
            recipe["pretrained"]["files"] = None
            text = json.dumps(recipe)
        elif case == "recipe sha256 missing":
            recipe["models"][0]["files"] = {}
            text = json.dumps(recipe)
        elif case == "recipe duplicate key":
            text = text.replace('"seed": 0', '"seed": 0, "seed": 1')
        elif case == "recipe seed as text":
            recipe["seed"] = "0"
            text = json.dumps(recipe)
        (tmp / "recipe.json").write_text(text)
    elif case.startswith("task file"):
        spec = json.loads((world / "tasks.json").read_text())
        entry = spec["tasks"]["digits"]
        if case == "task file classnames a string":
            entry["classnames"] = "0123456789"
        elif case == "task file templates wrong":
            entry["templates"] = [None]
        else:
            entry["clasnames"] = entry.pop("classnames")
        (tmp / "tasks.json").write_text(json.dumps(spec))
    elif case.startswith("heads json"):
        shutil.copytree(world / "heads", tmp / "heads")
        meta = json.loads((tmp / "heads/text_heads.json").read_text())
        if case == "heads json edited classnames":
            meta["tasks"]["digits"]["classnames"][0] = "zero (edited)"
        else:
            del meta["record_sha256"]
        (tmp / "heads/text_heads.json").write_text(json.dumps(meta))
    elif case.startswith("export.json"):
        shutil.copytree(world / "export", tmp / "export")
        record = json.loads((tmp / "export/export.json").read_text())
        if case == "export.json edited label":
            record["classnames"]["digits"][0] = "seven"
        else:
            if case == "export.json wrong type (rehashed)":
                record["preprocessing"]["crop"] = [224, "224"]
            else:
                record["variants"]["fp32"] = "../../../etc/passwd"
                record["sha256"]["../../../etc/passwd"] = "0" * 64
            record["record_sha256"] = record_sha256(record)
        (tmp / "export/export.json").write_text(json.dumps(record))
    elif case == "data order negative row":
        (tmp / "order.json").write_text(json.dumps({"digits": [-1, 2]}))


@pytest.mark.parametrize("case", sorted(FILES))
def test_every_file_format_is_read_through_its_schema(world, tmp_path, victim, case):
    args, fragment = FILES[case]
    prepare_file(case, world, tmp_path)
    before = snapshot(victim)
    made = sorted(p.name for p in tmp_path.iterdir())
    where = {"world": world, "tmp": tmp_path, "pre": PRETRAINED, "mnist": MNIST}
    env = {"CLIPSHIP_CACHE": str(tmp_path / "cache"), "HF_TOKEN": TOKEN}
    result = run_cli(*[a.format(**where) for a in args], env=env)
    check(result, 1, fragment, before, victim)
    assert len(result.stderr) < 2000
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [
        m for m in made if m != "cache"
    ]


# --- rule 5: faults -------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_nothing(world, tmp_path):
    """A write that fails for lack of space (EFBIG here, as ENOSPC on a full disk) is one line;
    the temporary folder is removed and no output appears."""
    env = {**os.environ, "CLIPSHIP_CACHE": str(tmp_path / "cache")}
    result = clipship(
        "merge", "--pretrained", PRETRAINED, "--model", f"digits={MNIST}", "--method",
        "task_arithmetic", "--out", tmp_path / "m", env=env, limit_bytes=200_000,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: cannot write") and "m" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []


def test_an_unwritable_run_dir_is_one_line(world, tmp_path):
    path = release_file(world, tmp_path)
    result = run_cli("release", path, "--run-dir", "/proc/clipship-run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "cannot write" in lines[0], result.stderr


def test_a_failed_stage_leaves_no_earlier_release_in_place(world, tmp_path):
    run = tmp_path / "run"
    first = run_cli("release", release_file(world, tmp_path), "--run-dir", run)
    assert first.returncode == 0, first.stderr
    assert (run / "release/model.safetensors").is_file()
    # The same release from a pool whose text tower is NaN: the merge stage fails.
    broken = release_file(world, tmp_path, pool={"pretrained": str(world / "nan_text")})
    second = run_cli("release", broken, "--run-dir", run)
    assert second.returncode == 1 and "NaN" in second.stderr
    assert not (run / "release").exists()


def test_release_json_summary_is_printed_when_the_push_fails(world, hub, tmp_path):
    """The Hub refuses the token: the summary still comes out, with status push_failed, and
    the exit code says it failed."""
    env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    path = release_file(world, tmp_path, hub={"repo_id": "alice/r"})
    result = run_cli("release", path, "--run-dir", tmp_path / "run", "--json", env=env)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "push_failed" and "401" in summary["failed"][0]
    assert result.stderr.strip().splitlines()[-1].startswith("error: push: ")
    assert TOKEN not in result.stdout + result.stderr


def test_heads_cache_evicts_bad_entries_and_works_read_only(world, tmp_path):
    from clipship.runtime.heads import build_heads
    from clipship.runtime.tasks import read_taskfile

    tasks = read_taskfile(world / "tasks.json")
    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSHIP_CACHE", str(cache))
        reference, _ = build_heads(PRETRAINED, tasks)
        entry = next((cache / "heads").glob("*.safetensors"))
        entry.write_bytes(entry.read_bytes()[:100])  # truncated
        again, _ = build_heads(PRETRAINED, tasks)
        assert torch.equal(again["digits"], reference["digits"])
        assert load_file(str(entry))["head"].shape == reference["digits"].shape  # rewritten
        replaced = {"head": torch.zeros_like(reference["digits"])}  # a valid file, other values
        from safetensors import safe_open

        with safe_open(str(entry), "pt") as f:
            metadata = f.metadata()
        save_file(replaced, str(entry), metadata=metadata)
        again, _ = build_heads(PRETRAINED, tasks)
        assert torch.equal(again["digits"], reference["digits"])  # not the replaced values
        patch.setenv("CLIPSHIP_CACHE", "/proc/clipship-cache")  # cannot be written
        again, _ = build_heads(PRETRAINED, tasks)
        assert torch.equal(again["digits"], reference["digits"])


def test_heads_cache_key_covers_the_text_config(world, tmp_path):
    from clipship.runtime.heads import build_heads
    from clipship.runtime.tasks import read_taskfile

    tasks = read_taskfile(world / "tasks.json")
    other = tmp_path / "pre"
    shutil.copytree(PRETRAINED, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["layer_norm_eps"] = 0.1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSHIP_CACHE", str(tmp_path / "cache"))
        first, _ = build_heads(PRETRAINED, tasks)
        second, _ = build_heads(other, tasks)
    assert len(list((tmp_path / "cache/heads").glob("*.safetensors"))) == 2
    assert not torch.equal(first["digits"], second["digits"])


# --- rule 6: names are names ----------------------------------------------------------------

# fmt: off
NAMES = {
    "--model name with a newline": ["merge", "--pretrained", "{pre}", "--model", "dig\nits={mnist}", "--method", "task_arithmetic", "--out", "{tmp}/m"],
    "--model name with ..": ["merge", "--pretrained", "{pre}", "--model", "..={mnist}", "--method", "task_arithmetic", "--out", "{tmp}/m"],
    "--model name with /": ["merge", "--pretrained", "{pre}", "--model", "a/b={mnist}", "--method", "task_arithmetic", "--out", "{tmp}/m"],
    "--tasks with a bidi override": ["eval", "{world}/merged", "--tasks", "mnist,\u202edigits"],
    "--task name with a zero-width space": ["eval", "{world}/merged", "--task", "dig\u200bits={world}/digits"],
    "--task name with a path": ["eval", "{world}/merged", "--task", "../x={world}/digits"],
    "revision with ..": ["merge", "--pretrained", "{pre}", "--model", "digits=owner/name@a/../b", "--method", "task_arithmetic", "--out", "{tmp}/m"],
    "revision with a newline": ["merge", "--pretrained", "{pre}", "--model", "digits=owner/name@main\nx", "--method", "task_arithmetic", "--out", "{tmp}/m"],
    "push --tag with a newline": ["push", "{world}/merged", "--repo-id", "alice/x", "--tag", "v1\nv2", "--dry-run"],
    "push --revision with ..": ["push", "{world}/merged", "--repo-id", "alice/x", "--revision", "..", "--dry-run"],
    "release --tag with a control character": ["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run", "--tag", "v\x07"],
    "release hub.tag with a bidi character": ["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"],
    "task file task name with /": ["eval", "{world}/merged", "--taskfile", "{tmp}/tasks.json"],
    "card --name with a newline": ["card", "{world}/merged", "--license", "mit", "--name", "my\nmodel"],
    "release card.name with a bidi character": ["release", "{tmp}/release.yaml", "--run-dir", "{tmp}/run"],
    "pool yaml model name with ..": ["merge", "--pool", "{tmp}/pool.yaml", "--method", "task_arithmetic", "--out", "{tmp}/m"],
}
# fmt: on


@pytest.mark.parametrize("case", sorted(NAMES))
def test_names_are_names(world, tmp_path, victim, case):
    args = NAMES[case]
    if case.startswith("release"):
        changes = {}
        if "hub.tag" in case:
            changes["hub"] = {"repo_id": "alice/x", "tag": "v1\u202e"}
        if "card.name" in case:
            changes["card"] = {"license": "mit", "name": "evil\u202eeman"}
        release_file(world, tmp_path, **changes)
    elif case.startswith("task file"):
        spec = json.loads((world / "tasks.json").read_text())
        (tmp_path / "tasks.json").write_text(
            json.dumps({"tasks": {"a/b": spec["tasks"]["digits"]}})
        )
    elif case.startswith("pool yaml"):
        (tmp_path / "pool.yaml").write_text(
            f"models:\n  _pretrained_: {PRETRAINED}\n  '..': {MNIST}\n"
        )
    before = snapshot(victim)
    where = {"world": world, "tmp": tmp_path, "pre": PRETRAINED, "mnist": MNIST}
    env = {"CLIPSHIP_CACHE": str(tmp_path / "cache"), "HF_TOKEN": TOKEN}
    result = run_cli(*[a.format(**where) for a in args], env=env)
    check(result, 1, "", before, victim)
    line = result.stderr.strip()
    assert any(word in line for word in ("name", "revision", "tag", "line of text")), line
    assert "\n" not in line and "\u202e" not in line and "\u200b" not in line and "\x07" not in line
    assert not (tmp_path / "m").exists() and not (tmp_path / "run" / "stages").exists()
