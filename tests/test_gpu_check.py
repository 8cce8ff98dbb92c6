"""`make gpu-check` is ready before a GPU is lent: its dry run says what it would run and exits
0 at once, and every part runs on the CPU in CUDA's place, so a first GPU run can fail only on
GPU-specific problems."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_the_dry_run_lists_the_parts_and_exits_0():
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    for part in ("eval:", "merge:", "export:", "wemoe:"):
        assert part in run.stdout
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--parts", "nope"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown part 'nope'")


@pytest.mark.slow
def test_every_part_runs_with_the_cpu_in_cudas_place(tmp_path):
    env = {"CLIPSHIP_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(results["parts"]) == ["eval", "merge", "export", "wemoe"]
    parts = {name: part["result"] for name, part in results["parts"].items()}
    assert parts["eval"]["fixture_passed"] and parts["eval"]["throughput"]
    for method in ("task_singular_vector", "iso_cts", "wudi", "regmean"):
        assert parts["merge"][method]["passed"]
    assert parts["export"]["onnx_fp32"]["same_predictions"]
    assert parts["export"]["tensorrt_fp16"].startswith("skipped")
    assert parts["wemoe"]["passed"]
    assert (tmp_path / "out" / "gpu_check.md").read_text().startswith("# clipship GPU check")
