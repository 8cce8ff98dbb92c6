"""scripts/install.sh picks torch's CPU build unless the machine has an NVIDIA GPU, and says what
it downloads. Run with DRY_RUN=1 (it prints the pip commands instead of running them), a stand-in
`nvidia-smi` on the PATH and a local index standing in for PyTorch's CPU index: no GPU and no
PyTorch index are needed to check the choice."""

import functools
import http.server
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from .test_pool import closed_port

ROOT = Path(__file__).resolve().parents[1]


def fake_nvidia_smi(folder: Path, gpus: bool) -> Path:
    """An `nvidia-smi` that lists one GPU, or fails as it does on a machine without a driver."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    body = "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'" if gpus else "exit 9"
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return folder


def install(tmp_path: Path, gpus: bool, index: str, **env: str) -> subprocess.CompletedProcess:
    path = f"{fake_nvidia_smi(tmp_path / 'bin', gpus)}{os.pathsep}{os.environ['PATH']}"
    variables = {"PATH": path, "DRY_RUN": "1", "VENV": str(tmp_path / "venv")}
    variables["TORCH_CPU_INDEX"] = index
    base = {k: v for k, v in os.environ.items() if k not in ("VARIANT", "TORCH_SPEC", "ORT_GPU")}
    return subprocess.run(
        ["sh", str(ROOT / "scripts/install.sh")],
        capture_output=True,
        text=True,
        env={**base, **variables, **env},
        timeout=60,
    )


@pytest.fixture(scope="module")
def cpu_index(tmp_path_factory):
    """A local stand-in for https://download.pytorch.org/whl/cpu (the probe asks for torch/)."""
    root = tmp_path_factory.mktemp("index")
    (root / "torch").mkdir()
    (root / "torch/index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def pip_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("+ ") and "pip" in line]


def test_without_a_gpu_torch_comes_from_the_cpu_index(tmp_path, cpu_index):
    result = install(tmp_path, gpus=False, index=cpu_index)
    assert result.returncode == 0, result.stderr
    assert f"install: torch 2.13.0 CPU build from {cpu_index} (about 190 MB)" in result.stdout
    torch_line = [line for line in pip_lines(result) if " torch==" in line]
    assert torch_line and torch_line[0].endswith(f"install torch==2.13.0 --index-url {cpu_index}")
    assert not any("onnxruntime-gpu" in line for line in pip_lines(result))


def test_with_a_gpu_the_cuda_build_and_onnxruntime_gpu(tmp_path, cpu_index):
    result = install(tmp_path, gpus=True, index=cpu_index)
    assert result.returncode == 0, result.stderr
    assert "CUDA build from PyPI" in result.stdout
    lines = pip_lines(result)
    assert any(line.endswith("install torch==2.13.0") for line in lines)
    assert any(line.endswith("uninstall -y onnxruntime") for line in lines)
    assert any(line.endswith("install onnxruntime-gpu==1.31.1") for line in lines)


def test_the_variant_and_torch_spec_override_the_guess(tmp_path, cpu_index):
    cpu = install(tmp_path, gpus=True, index=cpu_index, VARIANT="cpu")
    assert any(f"--index-url {cpu_index}" in line for line in pip_lines(cpu))
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    pinned = install(tmp_path, gpus=False, index=cpu_index, VARIANT="cuda", TORCH_SPEC=spec)
    assert any(line.endswith(f"install {spec}") for line in pip_lines(pinned))
    assert any("onnxruntime-gpu" in line for line in pip_lines(pinned))
    bad = install(tmp_path, gpus=False, index=cpu_index, VARIANT="rocm")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: VARIANT must be cpu, cuda or auto (got rocm)"


def test_an_unreachable_cpu_index_falls_back_in_one_line(tmp_path):
    closed = f"http://127.0.0.1:{closed_port()}"
    result = install(tmp_path, gpus=False, index=closed)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("install: http")]
    assert said == [
        f"install: {closed} is unreachable; torch 2.13.0 from the configured index "
        "(on Linux x86-64, PyPI's is the CUDA build)"
    ]
    assert any(line.endswith("install torch==2.13.0") for line in pip_lines(result))


def test_an_explicit_cpu_variant_never_falls_back_to_the_cuda_build(tmp_path):
    closed = f"http://127.0.0.1:{closed_port()}"
    result = install(tmp_path, gpus=False, index=closed, VARIANT="cpu")
    assert result.returncode == 0, result.stderr
    assert any(
        line.endswith(f"install torch==2.13.0 --index-url {closed}") for line in pip_lines(result)
    )
