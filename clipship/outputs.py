"""Writing results atomically and only where they belong, and the library versions recorded in
every artefact.

Every command builds its output in a temporary folder (or file) beside the target and renames it
into place only when everything succeeded, so a failure never leaves a half-written output
behind. Temporaries get unpredictable names (``mkstemp``/``mkdtemp``: created with ``O_EXCL``,
so nothing planted there is followed), and no output is written through a symbolic link: a link
at an output's name, or at a folder between a run folder and what is written in it, is refused
with one line (remove it) rather than followed or silently replaced. JSON is written strictly:
a NaN or Inf anywhere is an error naming its key, never a bare ``NaN`` in a file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import platform
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from clipship.errors import ClipshipError, NonFiniteError, OutputError, OutputExistsError

# Write failures that are about the place, not the data: reported as one line naming the output.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def refuse_link(path: Path | str) -> None:
    """An output name that is a symbolic link is refused: writing would follow it out of its
    folder (or silently drop what someone put there)."""
    if os.path.islink(path):
        raise OutputError(
            f"{path} is a symbolic link; refusing to write through it (remove the link)"
        )


def check_beneath(root: Path | str, path: Path | str) -> None:
    """Every existing folder from ``root`` (exclusive) down to ``path`` (inclusive) is a real
    folder or file, not a link: what is written at ``path`` stays under ``root``. Called where
    the write happens, not once up front."""
    root, path = Path(root), Path(path)
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        refuse_link(current)
        if not current.exists():
            return


def check_target(out: Path, force: bool, inputs: tuple = (), kind: str = "folder") -> None:
    """Before any work: ``out`` may be written (it does not exist, or ``force``), its folder is
    writable, and replacing it would not delete one of ``inputs`` (paths or hub ids)."""
    out = Path(out)
    refuse_link(out)
    if kind == "file" and out.is_dir():
        raise OutputError(f"{out} is a folder (give a file name)")
    if out.exists() and not force:
        raise OutputExistsError(
            f"{out} already exists (pass `force` to replace it)", path=out, option="force"
        )
    if out.exists() and not out.is_symlink():  # replacing a link deletes nothing it points to
        for item in inputs:
            source = Path(os.path.expanduser(str(item))) if item is not None else None
            if source is not None and source.exists():
                # The same file or folder (device and inode), or one inside what out replaces.
                if any(_same(ancestor, out) for ancestor in [source, *source.resolve().parents]):
                    raise OutputError(f"`out` {out} would replace an input ({item})", option="out")
    _probe(out)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _probe(out: Path) -> None:
    """Fail now, not after the work, if nothing can be written where ``out`` goes."""
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".clipship-probe-", dir=parent)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror}") from None
    os.close(fd)
    os.unlink(name)


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool = False, root: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``out`` in one rename.

    Temporary folders are named ``.<out>.tmp-<host>-<pid>-*`` (``.old-`` while replacing): one
    left by a process of this host that no longer runs (killed with SIGKILL, a power cut) is
    removed here; other hosts' (a shared volume, another container) are left alone. With
    ``root``, no folder between ``root`` and ``out`` may be a link (checked again before the
    rename). A disk that fills up or turns read-only is one ``OutputError`` line."""
    out = Path(out)
    if root is not None:
        check_beneath(root, out)
    check_target(out, force)
    owner = f"{_host()}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{owner}-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror}") from None
    try:
        try:
            yield tmp
        except OSError as e:
            if isinstance(e, ClipshipError) or e.errno not in WRITE_ERRNOS:
                raise
            raise OutputError(f"cannot write {out}: {e.strerror}") from None
        usual_modes(tmp)
        if root is not None:
            check_beneath(root, out)
        if out.exists() or out.is_symlink():
            check_target(out, force)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{owner}-", dir=out.parent))
            with _signals_held():  # no SIGTERM between the two renames
                os.replace(out, old / out.name)
                os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname()) or "host"


_CRITICAL = {"depth": 0, "pending": None}


@contextlib.contextmanager
def _signals_held():
    """A few steps that must not be split by SIGTERM (the CLI's handler calls :func:`deliver`,
    which waits until the section ends)."""
    _CRITICAL["depth"] += 1
    try:
        yield
    finally:
        _CRITICAL["depth"] -= 1
        pending, _CRITICAL["pending"] = _CRITICAL["pending"], None
        if pending is not None:
            raise pending


def unwind_on_sigterm() -> None:
    """SIGTERM raises ``Terminated`` (at the end of a critical section), so temporary folders
    are removed on the way out; a handler someone else installed is left alone."""
    import signal

    from clipship.errors import Terminated

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: deliver(Terminated()))


def deliver(error: BaseException) -> None:
    """Raise ``error`` (from a signal handler) now, or at the end of a critical section."""
    if _CRITICAL["depth"]:
        _CRITICAL["pending"] = error
        return
    raise error


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``out``'s temporary siblings left by dead processes of this host; returns what
    was removed."""
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{Path(out).name}.{kind}-{_host()}-"
        for path in Path(out).parent.glob(f"{glob.escape(prefix)}*-*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process (or not ours to ask): leave its folder alone
    return True


def usual_modes(path: Path) -> None:
    """Give a file, or a folder and what is in it, the modes a plain open / mkdir would (the
    umask's): mkdtemp makes 0700 folders and the safetensors writer 0600 files, which would keep
    a shared cache, a CI artefact or a container volume from other users."""
    umask = os.umask(0)
    os.umask(umask)
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~umask)
        return
    os.chmod(path, 0o777 & ~umask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("clipship", "torch", "transformers", "safetensors", "huggingface_hub"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling (``mkstemp``: an unpredictable name, created
    exclusively) and one rename; a link at ``path`` is refused, never followed."""
    path = Path(path)
    refuse_link(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        usual_modes(tmp)
        refuse_link(path)  # again, at the moment of use
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def json_text(data: Any, where: str, **options: Any) -> str:
    """``data`` as JSON text (``indent=2`` unless given, a final newline), refusing NaN and
    Inf: one ``NonFiniteError`` naming the first key path that holds one."""
    options.setdefault("indent", 2)
    try:
        return json.dumps(data, allow_nan=False, **options) + "\n"
    except ValueError:
        path = first_nonfinite(data)
        if path is None:
            raise
        key, value = path
        raise NonFiniteError(
            f"{where}: {key or 'the value'} is {value}; refusing to write a non-finite number"
        ) from None


def first_nonfinite(data: Any, prefix: str = "") -> tuple[str, float] | None:
    """The first (key path, value) in nested dicts and lists whose number is NaN or Inf."""
    if isinstance(data, float) and not math.isfinite(data):
        return prefix, data
    if isinstance(data, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in data.items()]
    elif isinstance(data, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(data)]
    else:
        return None
    for where, value in items:
        found = first_nonfinite(value, where)
        if found is not None:
            return found
    return None


def write_json_atomic(path: Path, data: Any, **options: Any) -> None:
    """``json_text`` written with ``write_text_atomic``."""
    write_text_atomic(path, json_text(data, Path(path).name, **options))


def remove_output(path: Path) -> None:
    """Remove a file, a folder or a link at ``path`` without following a link."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def human_size(size: int) -> str:
    """1536 → '1.5 KB' (decimal units, as the Hub shows them)."""
    value = float(size)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
