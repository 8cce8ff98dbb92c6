"""How long `clipship --help` (target: under 0.5 s) and `clipship methods` (torch, but not
transformers) take, best of 5 runs in fresh processes, beside `import torch` alone.

python benchmarks/cli_startup.py
"""

from __future__ import annotations

import subprocess
import sys
import time

from clipship.machine import describe


def best_of_five(*args: str) -> tuple[float, float]:
    """(best, median) seconds of ``python -m clipship.cli ARGS`` in fresh processes."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "clipship.cli", *args], check=True, capture_output=True
        )
        times.append(time.perf_counter() - start)
    return min(times), sorted(times)[2]


def main() -> None:
    print(describe())
    for args in (["--help"], ["methods"]):
        best, median = best_of_five(*args)
        print(f"clipship {' '.join(args)}: best {best:.3f}s, median {median:.3f}s")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    print(f"for scale, python -c 'import torch': {time.perf_counter() - start:.3f}s")


if __name__ == "__main__":
    main()
