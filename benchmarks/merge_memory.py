"""Wall time and peak RSS of `clipship merge` on N ViT-B/32-shaped task encoders (or L/14).

Builds a seeded pool in a temporary folder (a full CLIPModel as `_pretrained_` plus N
CLIPVisionModel task encoders, random weights of the real shapes), then runs `clipship merge`
once per method, each in its own process, and prints wall seconds and the process's peak RSS
next to one encoder's fp32 size. Targets for 8 × B/32 on a 2-core box: peak RSS ≤ 1.5× one
encoder for both methods; wall ≤ 6 s (task_arithmetic) and ≤ 15 s (ties).

    python benchmarks/merge_memory.py [--models 8] [--large] [--methods task_arithmetic,ties]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clipship.machine import describe


def weight_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(
        v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    )


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--large", action="store_true", help="ViT-L/14 shapes instead of B/32")
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the pool here")
    args = parser.parse_args()
    print(describe())

    size = "l14" if args.large else "b32"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipship-bench-"))
    try:
        pool_yaml = work / "pool.yaml"
        if not pool_yaml.exists():
            # In a child: a process's peak RSS counts what its parent held when it forked
            # (Linux carries the high-water mark across exec), so this one stays torch-free.
            t = time.perf_counter()
            build = (
                "import sys; from pathlib import Path; "
                "from clipship.synthetic import build_pool, write_pool_yaml; "
                "work = Path(sys.argv[1]); "
                "pool = build_pool(work, sys.argv[2], int(sys.argv[3]), seed=0); "
                "write_pool_yaml(work / 'pool.yaml', *pool)"
            )
            subprocess.run(
                [sys.executable, "-c", build, str(work), size, str(args.models)], check=True
            )
            print(f"built {args.models} × {size} pool in {time.perf_counter() - t:.1f}s at {work}")
        encoder = weight_bytes(work / "task_a" / "model.safetensors")
        print(f"one encoder (fp32): {encoder / 2**30:.3f} GiB; cores: {os.cpu_count()}")
        print(f"{'method':18s} {'wall s':>8s} {'peak RSS GiB':>13s} {'RSS / encoder':>14s}")
        for method in args.methods.split(","):
            out = work / f"merged-{method}"
            cmd = [
                sys.executable,
                "-m",
                "clipship.cli",
                "merge",
                "--pool",
                str(pool_yaml),
                "--method",
                method,
                "--out",
                str(out),
                "--force",
                "--quiet",
            ]
            wall, rss = run(cmd)
            print(f"{method:18s} {wall:8.2f} {rss / 2**30:13.3f} {rss / encoder:13.2f}×")
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
