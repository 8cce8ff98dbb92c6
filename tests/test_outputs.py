"""Atomic result folders: all or nothing, with the modes a plain mkdir / open would give."""

import os
import stat

import pytest

from clipship.errors import OutputExistsError
from clipship.outputs import atomic_folder


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_modes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            fd = os.open(tmp / "sub" / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            assert _mode(tmp) == 0o700  # mkdtemp's, until the folder is complete
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert _mode(out) == _mode(out / "sub") == 0o777 & ~umask
    assert _mode(out / "sub" / "weights.bin") == 0o666 & ~umask


def test_a_failure_leaves_nothing_and_an_existing_folder_needs_force(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "first").write_text("1")
    with pytest.raises(OutputExistsError):
        with atomic_folder(tmp_path / "out"):
            pass
    with atomic_folder(tmp_path / "out", force=True) as tmp:
        (tmp / "second").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["second"]


def test_cached_heads_are_readable_by_others(tmp_path, monkeypatch):
    from clipship.runtime.heads import build_heads
    from clipship.runtime.tasks import Task

    from .test_eval import PRETRAINED

    monkeypatch.setenv("CLIPSHIP_CACHE", str(tmp_path))
    previous = os.umask(0o022)
    try:
        build_heads(str(PRETRAINED), [Task("digits", ("zero", "one"), ("a photo of {c}.",))])
    finally:
        os.umask(previous)
    (cached,) = (tmp_path / "heads").iterdir()
    assert _mode(cached) == 0o644
