"""What a push reads: the release folder walked through directory descriptors, and the checks a
folder must pass before anything of it is published.

The folder is walked once, and every file found is opened then and held open until the push
ends: hashes, the recipe read for the commit message, the checks and the upload all read from
those descriptors, never from a path again, so a file or sub-folder swapped for a link mid-push
cannot make the push read or send anything from outside the folder. Links are followed only where
they stay inside the folder and point at nothing hidden, or, in a Hugging Face cache snapshot, at
a file of that repo's own ``blobs/``; a followed link is opened one name at a time from an open
folder, refusing any link met on the way. ``check_publishable``: every floating-point tensor of a
``*.safetensors`` file finite, every ``*.json`` file plain JSON (no NaN, Infinity or overflowing
number).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from clipship.errors import ClipshipError, PushError

CHUNK = 1 << 22  # bytes read at a time when hashing or checking tensors (4 MiB)
FD_HEADROOM = 64  # descriptors left free for the client's sockets once the folder is open
SHA256 = re.compile(r"[0-9a-f]{64}")


# --- the folder -------------------------------------------------------------------------------

# POSIX flags (the walk needs POSIX; getattr keeps the module importable for check_repo_id)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW
_ENTRY = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW  # a FIFO must not block


class _Descriptor:
    """One open descriptor, closed by ``close()`` or once nothing refers to it any more (so a
    descriptor number is never used after it may have been given to another file)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def open(self) -> bool:
        return self._finalizer.alive

    @property
    def fd(self) -> int:
        if not self._finalizer.alive:
            raise ValueError("the folder's files were closed")
        return self._fd

    def close(self) -> None:
        self._finalizer()


@dataclass(frozen=True)
class LocalFile:
    """A file the push uploads, held open from the folder walk until the push ends."""

    path: str  # in the repo, POSIX
    size: int
    handle: _Descriptor = field(repr=False, compare=False)  # the file: every read uses it
    parent: _Descriptor = field(repr=False, compare=False)  # the folder whose entry named it
    name: str  # that entry (the link, for a file reached through one)
    entry: tuple[int, int]  # the entry's (device, inode) when walked
    sha256: str | None = None  # known without reading: a Hub cache blob is named by it


class ReleaseFiles(list[LocalFile]):
    """What ``release_files`` finds: the files, in order, and every descriptor the walk opened;
    ``close()`` (or leaving a ``with`` block) closes them all."""

    def __init__(self, files: Iterable[LocalFile], descriptors: list[_Descriptor]):
        super().__init__(files)
        self._descriptors = descriptors

    def close(self) -> None:
        for descriptor in self._descriptors:
            descriptor.close()

    def __enter__(self) -> ReleaseFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def release_files(folder: Path | str) -> ReleaseFiles:
    """The files a push uploads: every file under ``folder`` outside hidden files and folders,
    each opened now and held open (``with release_files(folder) as files: ...``).

    Symbolic links (to files or folders) are followed only where they stay inside ``folder`` and
    point at nothing hidden, or, for a Hugging Face cache snapshot
    (``<cache>/models--<owner>--<name>/snapshots/<rev>/``), at a file directly in that repo's
    ``blobs/`` folder: a link anywhere else would publish a file the folder does not hold, so it
    is refused before anything is sent, naming the link. A followed link is opened one name at a
    time from an open folder without following links, so one swapped in meanwhile is refused. A
    link back up the tree is walked once. Hard links cannot be told from ordinary files and are
    uploaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipshipError(f"{folder}: not a folder")
    walk = _Walk(folder)
    try:
        walk.visit(walk.root_fd, (), "", frozenset({_identity(os.fstat(walk.root_fd.fd))}))
        if walk.blobs_fd is not None:
            walk.blobs_fd.close()  # its files are open; it is not needed any more
        walk.reserve(max(d.fd for d in walk.opened if d.open) + FD_HEADROOM)
    except BaseException:
        ReleaseFiles((), walk.opened).close()
        raise
    files = ReleaseFiles(walk.files, walk.opened)
    if not files:
        files.close()
        raise ClipshipError(f"{folder}: nothing to push (no files)")
    return files


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


class _Walk:
    """One walk of a folder (see ``release_files``): the descriptors it opened and the files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.opened: list[_Descriptor] = []
        self.files: list[LocalFile] = []
        try:
            self.root = folder.resolve(strict=True)
        except (OSError, RuntimeError):
            raise PushError(f"{folder}: cannot resolve the folder") from None
        try:
            self.root_fd = self.hold(self.open_name(str(self.root), _DIRECTORY, None))
            same = _identity(os.fstat(self.root_fd.fd)) == _identity(os.stat(self.root))
        except OSError as e:
            raise PushError(f"{folder}: cannot read the folder ({e.strerror})") from None
        if not same:
            raise PushError(f"{folder}: changed while pushing; nothing was pushed")
        self.cache_blobs, self.blobs_fd = self._cache_blobs()

    def _cache_blobs(self) -> tuple[Path | None, _Descriptor | None]:
        """``blobs/`` of the cache repo when the folder is one of its snapshots, open: found from
        the repo folder without following links, and only when that repo's ``snapshots/<rev>``
        is the very folder walked."""
        snapshots, repo = self.root.parent, self.root.parent.parent
        if snapshots.name != "snapshots" or not repo.name.startswith(
            ("models--", "datasets--", "spaces--")
        ):
            return None, None
        try:
            repo_fd = os.open(repo, _DIRECTORY)
        except OSError:
            return None, None
        try:
            snapshot = _open_path(repo_fd, ("snapshots", self.root.name), _DIRECTORY)
            same = _identity(os.fstat(snapshot)) == _identity(os.fstat(self.root_fd.fd))
            os.close(snapshot)
            if not same:
                return None, None
            return repo / "blobs", self.hold(os.open("blobs", _DIRECTORY, dir_fd=repo_fd))
        except OSError:
            return None, None
        finally:
            os.close(repo_fd)

    def hold(self, fd: int) -> _Descriptor:
        descriptor = _Descriptor(fd)
        self.opened.append(descriptor)
        return descriptor

    def open_name(self, name: str, flags: int, dir_fd: int | None) -> int:
        """``os.open``, raising the limit on open files when the folder needs more of them."""
        while True:
            try:
                return os.open(name, flags, dir_fd=dir_fd)
            except OSError as e:
                if e.errno != errno.EMFILE:
                    raise
                if not _raise_open_files_limit():
                    raise PushError(self._too_many()) from None

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` descriptors in all (the folder's and the client's)."""
        import resource

        while (soft := resource.getrlimit(resource.RLIMIT_NOFILE)[0]) < needed:
            if soft == resource.RLIM_INFINITY or not _raise_open_files_limit():
                raise PushError(self._too_many())

    def _too_many(self) -> str:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (
            f"{self.folder.name}: holds more files than this process may keep open at once "
            f"(limit {soft}, with {FD_HEADROOM} left for the network); raise it (`ulimit -n`) "
            "or push fewer files"
        )

    def allowed(self, real: Path) -> bool:
        if real.is_relative_to(self.root):
            return not any(p.startswith(".") for p in real.relative_to(self.root).parts)
        return self.cache_blobs is not None and real.parent == self.cache_blobs

    def visit(self, directory: _Descriptor, parts: tuple[str, ...], rel: str, seen: frozenset):
        """Every entry of ``directory`` (at ``parts`` under the folder, really: links resolved),
        shown as ``rel``; ``seen`` holds the folders above it, so a link up the tree ends."""
        try:
            names = sorted(entry.name for entry in os.scandir(directory.fd))
        except OSError as e:
            raise PushError(f"{rel or './'}: cannot read the folder ({e.strerror})") from None
        for name in names:
            if name.startswith("."):
                continue
            shown = f"{rel}{name}"
            try:
                entry = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
            except OSError:
                raise PushError(f"{shown}: changed while pushing; nothing was pushed") from None
            if stat.S_ISLNK(entry.st_mode):
                target, real, sha256 = self.follow(parts, name, shown)
            elif stat.S_ISDIR(entry.st_mode) or stat.S_ISREG(entry.st_mode):
                target, real, sha256 = (
                    self.open_under(directory, (name,), shown),
                    (*parts, name),
                    None,
                )
                if _identity(os.fstat(target.fd)) != _identity(entry):
                    raise PushError(f"{shown}: changed while pushing; nothing was pushed")
            else:
                continue  # a socket, pipe or device: not a file to publish
            info = os.fstat(target.fd)
            if stat.S_ISDIR(info.st_mode) and real is not None:
                if _identity(info) in seen:
                    target.close()  # a link back up the tree: walked once already
                else:
                    self.visit(target, real, f"{shown}/", seen | {_identity(info)})
            elif stat.S_ISREG(info.st_mode):
                file = LocalFile(
                    shown, info.st_size, target, directory, name, _identity(entry), sha256
                )
                self.files.append(file)
            elif stat.S_ISDIR(info.st_mode):  # a folder inside blobs/ is no cache blob
                raise PushError(f"{shown}: a link to outside the folder; refusing to upload it")
            else:
                target.close()

    def follow(
        self, parts: tuple[str, ...], name: str, shown: str
    ) -> tuple[_Descriptor, tuple[str, ...] | None, str | None]:
        """Open what the link ``name`` (in the folder at ``parts``) points to, where the policy
        allows: (descriptor, its place under the folder or None for a blob, its sha256 when a
        blob's name tells it). The decision reads the links by path; the opening then goes one
        name at a time from the folder (or blobs/) descriptor, so what is opened lies there."""
        link = self.root.joinpath(*parts, name)
        try:
            real = link.resolve(strict=True)
        except FileNotFoundError:
            if not self.allowed(link.resolve()):
                raise PushError(
                    f"{shown}: a link to outside the folder; refusing to upload it"
                ) from None
            raise PushError(f"{shown}: a broken link; refusing to push the folder") from None
        except (OSError, RuntimeError):  # a loop of links, or unreadable
            raise PushError(f"{shown}: a link that cannot be resolved (a loop?)") from None
        if not self.allowed(real):
            hidden = real.is_relative_to(self.root)
            where = "a hidden file" if hidden else "outside the folder"
            raise PushError(f"{shown}: a link to {where}; refusing to upload it")
        if real.is_relative_to(self.root):
            inside = real.relative_to(self.root).parts
            return self.open_under(self.root_fd, inside or (".",), shown), inside, None
        assert self.blobs_fd is not None  # allowed() let only a blob through
        target = self.open_under(self.blobs_fd, (real.name,), shown)
        return target, None, real.name if SHA256.fullmatch(real.name) else None

    def open_under(self, base: _Descriptor, parts: tuple[str, ...], shown: str) -> _Descriptor:
        try:
            fd = _open_path(base.fd, parts, _ENTRY, self.open_name)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                raise PushError(f"{shown}: cannot be read ({e.strerror})") from None
            raise PushError(
                f"{shown}: changed while pushing (a link or a missing name on its way); "
                "nothing was pushed"
            ) from None
        return self.hold(fd)


def _open_path(base: int, parts: tuple[str, ...], flags: int, opener=None) -> int:
    """Open ``base``/``parts`` one name at a time, following no link: one met on the way (a
    folder swapped for a link since it was checked) fails with ``OSError``."""
    opener = opener or (lambda name, how, dir_fd: os.open(name, how, dir_fd=dir_fd))
    fd = base
    try:
        for i, part in enumerate(parts):
            opened = opener(part, flags if i == len(parts) - 1 else _DIRECTORY, fd)
            if fd != base:
                os.close(fd)
            fd = opened
    except BaseException:
        if fd != base:
            os.close(fd)
        raise
    return fd


def _raise_open_files_limit() -> bool:
    """Raise the soft limit on open files towards the hard one; False when it cannot grow."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(4 * soft, 1 << 16)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return False
    return True


def open_checked(local: LocalFile) -> BinaryIO:
    """A reader, from its start, of the file the folder walk opened: refused when the folder's
    entry for it now names another file (one swapped in since). The bytes come from the walk's
    descriptor, never from the path again."""
    try:
        now = os.stat(local.name, dir_fd=local.parent.fd, follow_symlinks=False)
        same = _identity(now) == local.entry
    except OSError:
        same = False
    if not same:
        raise PushError(f"{local.path}: changed while pushing; nothing was pushed")
    handle = os.fdopen(os.dup(local.handle.fd), "rb")
    handle.seek(0)  # the duplicate shares the walk descriptor's offset
    return handle


def read_chunks(local: LocalFile, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The bytes of ``local`` from ``start`` to ``end`` (its end now), ``CHUNK`` at a time, read
    at their offsets from its descriptor."""
    fd = local.handle.fd
    end = os.fstat(fd).st_size if end is None else end
    while start < end:
        want, data = min(CHUNK, end - start), b""
        while len(data) < want:  # a short read happens only at the end of the file
            more = os.pread(fd, want - len(data), start + len(data))
            if not more:
                raise PushError(f"{local.path}: changed while pushing; nothing was pushed")
            data += more
        start += want
        yield data


def file_sha256(local: LocalFile) -> str:
    if local.sha256:
        return local.sha256
    digest = hashlib.sha256()
    for chunk in read_chunks(local):
        digest.update(chunk)
    return digest.hexdigest()


def git_sha1(local: LocalFile) -> str:
    size = os.fstat(local.handle.fd).st_size
    digest = hashlib.sha1(b"blob %d\0" % size)
    for chunk in read_chunks(local, 0, size):
        digest.update(chunk)
    return digest.hexdigest()


# --- what may be published ----------------------------------------------------------------------

# NaN and infinity in each floating-point dtype of the safetensors format: the values whose bits,
# read as this little-endian unsigned type, have every bit of the mask set.
_NON_FINITE = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000),
    "F32": ("<u4", 0x7F80_0000),
    "C64": ("<u4", 0x7F80_0000),  # two F32 each
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),  # the "fn" kind: no infinity, NaN is S.1111.111
    "F8_E8M0": ("u1", 0xFF),  # exponent only: 0xFF is NaN
}
_NEVER_NON_FINITE = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}
_NEVER_NON_FINITE |= {"F4", "F6_E2M3", "F6_E3M2"}  # micro-floats have no NaN or infinity
_MAX_HEADER = 100 * 1024 * 1024  # as clipship.safetensors_io, which needs torch


def check_publishable(files: Iterable[LocalFile]) -> None:
    """Refuse, before anything is sent, a ``*.safetensors`` file with NaN or infinity in a
    floating-point tensor (read ``CHUNK`` bytes at a time), or a ``*.json`` file that is not
    plain JSON (NaN, Infinity, or a number too large for a float), naming the file and the
    tensor or key."""
    for local in files:
        if local.path.lower().endswith(".safetensors"):
            _check_safetensors(local)
        elif local.path.lower().endswith(".json"):
            _check_json(local)


def _check_safetensors(local: LocalFile) -> None:
    import numpy as np

    def corrupt(why: str) -> PushError:
        return PushError(
            f"{local.path}: not a valid safetensors file ({why}); refusing to publish it"
        )

    size = os.fstat(local.handle.fd).st_size
    if size < 8:
        raise corrupt("too short")
    (length,) = struct.unpack("<Q", b"".join(read_chunks(local, 0, 8)))
    if length > min(_MAX_HEADER, size - 8):
        raise corrupt("corrupt header length")
    try:
        header = json.loads(b"".join(read_chunks(local, 8, 8 + length)))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise corrupt("the header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    data = 8 + length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (begin, end) = entry["dtype"], entry["data_offsets"]
            valid = isinstance(dtype, str) and all(type(x) is int for x in (begin, end))
            valid = valid and 0 <= begin <= end
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid or data + end > size:
            raise corrupt(f"tensor {name!r} has a corrupt entry")
        if dtype in _NEVER_NON_FINITE:
            continue
        if dtype not in _NON_FINITE:
            raise corrupt(f"tensor {name!r} has the unknown dtype {dtype!r}")
        bits, mask = _NON_FINITE[dtype]
        if (end - begin) % np.dtype(bits).itemsize:
            raise corrupt(f"tensor {name!r} has a corrupt entry")
        for chunk in read_chunks(local, data + begin, data + end):
            words = np.frombuffer(chunk, dtype=bits)
            if np.any((words & mask) == mask):
                raise PushError(
                    f"{local.path}: tensor {name!r} holds NaN or infinity; refusing to publish it"
                )


def _check_json(local: LocalFile) -> None:
    from clipship.outputs import first_nonfinite

    try:
        # NaN, Infinity and numbers too large for a float (1e999) all parse as non-finite floats
        found = first_nonfinite(json.loads(b"".join(read_chunks(local))))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise PushError(f"{local.path}: not valid JSON ({why}); refusing to publish it") from None
    if found is not None:
        where, value = found
        raise PushError(
            f"{local.path}: {where or 'the value'} is {value}, not a finite number; refusing to "
            "publish it"
        )
