"""File digests shared by the stages (torch-free): sha256 as the Hub's LFS and our recipes use
it, and git's blob sha1 as the Hub reports regular files."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

CHUNK = 1 << 23


def file_sha256(path: Path | str) -> str:
    """sha256 of a file; a Hub cache blob is named by it already, so that is read for free."""
    resolved = Path(path).resolve()
    if re.fullmatch(r"[0-9a-f]{64}", resolved.name) and resolved.parent.name == "blobs":
        return resolved.name
    return _hexdigest(hashlib.sha256(), resolved)


def tree_sha256(folder: Path | str, skip_hidden: bool = False) -> dict[str, str]:
    """Every file under ``folder`` (POSIX path relative to it, sorted) → its sha256; with
    ``skip_hidden``, files in or under names starting with a dot are left out."""
    folder = Path(folder)
    digests = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if skip_hidden and any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            digests[relative.as_posix()] = file_sha256(path)
    return digests


def git_sha1(path: Path | str) -> str:
    """git's blob id of a file: sha1 of ``blob <size>\\0`` and the content."""
    path = Path(path)
    return _hexdigest(hashlib.sha1(b"blob %d\0" % path.stat().st_size), path)


def _hexdigest(digest: Any, path: Path) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
