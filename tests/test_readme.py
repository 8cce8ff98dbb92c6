"""The README's shell blocks run as written, in order, in one working folder, offline, on the smoke
mini-benchmark (`CLIPSHIP_MINIBENCH_BUDGET=smoke`; a newcomer's `make demo` built the full one,
which takes minutes). A block that cannot run here says why in the comment line above it, and
only for the reasons listed below."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- not run by the README test: (.+) -->")
REASONS = {
    "the set-up itself",
    "needs the Hub",
    "needs a GPU",
    "needs Docker",
    "needs your own image",
}


def blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """Every fenced block: (line, language, body, the reason it is not run or None)."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            start, language = i, fence.group(1)
            i += 1
            while not lines[i].startswith("```"):
                i += 1
            above = next((line for line in reversed(lines[:start]) if line.strip()), "")
            skip = SKIP.fullmatch(above.strip())
            body = "\n".join(lines[start + 1 : i])
            found.append((start + 1, language, body, skip.group(1) if skip else None))
        i += 1
    return found


def test_every_skipped_block_gives_an_accepted_reason():
    found = blocks((ROOT / "README.md").read_text())
    reasons = {reason for _, _, _, reason in found if reason}
    assert reasons <= REASONS, reasons - REASONS
    shell = [b for b in found if b[1] in ("bash", "sh")]
    assert sum(1 for b in shell if b[3] is None) >= 4, "the README's offline blocks run"


def test_the_readme_shell_blocks_run(tmp_path, smoke_minibench):
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))  # what `source .venv/bin/activate` finds
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CLIPSHIP_CACHE": str(smoke_minibench[1]),
        "CLIPSHIP_MINIBENCH_BUDGET": "smoke",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    ran = 0
    for line, language, body, reason in blocks((ROOT / "README.md").read_text()):
        if language not in ("bash", "sh") or reason:
            continue
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, f"README.md line {line}:\n{body}\n{result.stderr[-3000:]}"
        ran += 1
    assert (work / "my-sweep/best/README.md").is_file() and (
        work / "my-export/export.json"
    ).is_file()
    assert ran >= 4
