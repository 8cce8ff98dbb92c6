"""How long `clipship --help` takes (target: under 0.5 s), best of 5 runs in fresh processes.

python benchmarks/cli_startup.py
"""

from __future__ import annotations

import subprocess
import sys
import time

from clipship.machine import describe


def main() -> None:
    print(describe())
    times = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "clipship.cli", "--help"], check=True, capture_output=True
        )
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    torch_import = time.perf_counter() - start
    print(f"clipship --help: best {min(times):.3f}s, median {sorted(times)[2]:.3f}s")
    print(f"for scale, python -c 'import torch': {torch_import:.3f}s")


if __name__ == "__main__":
    main()
