"""`clipship push`: a release folder to a Hugging Face Hub model repo, in one commit or none.

Every call goes through one ``HfApi(endpoint=..., token=...)``: the endpoint is read from
``--endpoint`` / ``HF_ENDPOINT`` when the command runs (``huggingface_hub``'s module-level helpers
read it once, at import). The remote tree is compared with the folder first (git-sha1 for regular
files, sha256 for LFS ones), so pushing the same folder twice makes no second commit. The token
comes from ``--token``, ``HF_TOKEN`` or the saved login and is never printed or written: error
lines are built here from the HTTP status, and any echo of the token is masked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipship.errors import ClipshipError, PushError
from clipship.hashing import file_sha256, git_sha1

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class LocalFile:
    path: str  # in the repo, POSIX
    file: Path  # where it was found
    size: int
    real: Path  # what it is (links resolved), checked to lie inside the folder
    identity: tuple[int, int]  # (device, inode) when checked: the file uploaded must be this one


def release_files(folder: Path) -> list[LocalFile]:
    """The files a push uploads: every file under ``folder`` outside hidden files and folders.

    Symbolic links (to files or folders) are followed only where they stay inside ``folder`` and
    point at nothing hidden, or, for a Hugging Face cache snapshot
    (``<cache>/models--<owner>--<name>/snapshots/<rev>/``), at a file directly in that repo's
    ``blobs/`` folder: a link anywhere else would publish a file the folder does not hold, so it
    is refused before anything is sent, naming the link. Hard links cannot be told from
    ordinary files and are uploaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipshipError(f"{folder}: not a folder")
    try:
        root = folder.resolve(strict=True)
    except (OSError, RuntimeError):
        raise PushError(f"{folder}: cannot resolve the folder") from None
    blobs = root.parent.parent / "blobs"
    cache_blobs = (
        blobs
        if root.parent.name == "snapshots"
        and root.parent.parent.name.startswith(("models--", "datasets--", "spaces--"))
        and blobs.is_dir()
        and not blobs.is_symlink()
        else None
    )
    files: list[LocalFile] = []

    def allowed(real: Path) -> bool:
        if real.is_relative_to(root):
            return not any(p.startswith(".") for p in real.relative_to(root).parts)
        return cache_blobs is not None and real.parent == cache_blobs

    def visit(directory: Path, rel: str, seen: frozenset[Path]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            raise PushError(f"{rel or './'}: cannot read the folder ({e.strerror})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path, name = Path(entry.path), f"{rel}{entry.name}"
            try:
                real = path.resolve(strict=True)
            except FileNotFoundError:
                if entry.is_symlink() and not allowed(path.resolve()):
                    raise PushError(
                        f"{name}: a link to outside the folder; refusing to upload it"
                    ) from None
                raise PushError(f"{name}: a broken link; refusing to push the folder") from None
            except (OSError, RuntimeError):  # a loop of links, or unreadable
                raise PushError(f"{name}: a link that cannot be resolved (a loop?)") from None
            if entry.is_symlink() and not allowed(real):
                hidden = real.is_relative_to(root)
                where = "a hidden file" if hidden else "outside the folder"
                raise PushError(f"{name}: a link to {where}; refusing to upload it")
            if real.is_dir():
                if real not in seen:  # a link back up the tree is visited once
                    visit(path, f"{name}/", seen | {real})
            elif real.is_file():
                stat = real.stat()
                files.append(LocalFile(name, path, stat.st_size, real, (stat.st_dev, stat.st_ino)))

    visit(folder, "", frozenset({root}))
    if not files:
        raise ClipshipError(f"{folder}: nothing to push (no files)")
    return files


def open_checked(local: LocalFile):
    """Open the file the folder walk checked, refusing one swapped in since (a link, another
    file): the upload reads from this handle, not from the path again."""
    try:
        fd = os.open(local.real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise PushError(f"{local.path}: changed while pushing; nothing was pushed") from None
    handle = os.fdopen(fd, "rb")
    stat = os.fstat(handle.fileno())
    if (stat.st_dev, stat.st_ino) != local.identity:
        handle.close()
        raise PushError(f"{local.path}: changed while pushing; nothing was pushed")
    return handle


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def check_repo_id(repo_id: Any, where: str = "`repo_id`") -> str:
    """``owner/name`` with the Hub's characters (letters, digits, '.', '_', '-')."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ClipshipError(f"{where}: {repo_id!r} is not a repo id (owner/name)", option="repo_id")
    return repo_id


def public_url(text: str) -> str:
    """``text`` with URL credentials (``user:password@``) and ``token=`` query values masked."""
    text = re.sub(r"(?<=://)[^/\s]*@", "***@", text)
    return re.sub(r"(?i)((?:access_)?token=)[^&\s]+", r"\1***", text)


def _unchanged(local: LocalFile, remote: Any) -> bool:
    if remote is None or remote.size != local.size:
        return False
    if getattr(remote, "lfs", None):
        return remote.lfs.sha256 == file_sha256(local.real)
    return remote.blob_id == git_sha1(local.real)


def resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()  # HF_TOKEN, then the saved login
    if not token:
        raise PushError(
            "no Hugging Face token: pass `token`, set HF_TOKEN or run `hf auth login`",
            option="token",
        )
    return token


def commit_message(folder: Path) -> tuple[str, str]:
    """A summary line from the merge recipe (when there is one) and a description."""
    recipe_file = Path(folder) / "clipship_recipe.json"
    if not recipe_file.is_file():
        return f"clipship: upload {Path(folder).name}", ""
    recipe = json.loads(recipe_file.read_text())
    params = ", ".join(f"{k}={v}" for k, v in recipe.get("parameters", {}).items())
    summary = f"clipship: {recipe['method']} merge of {len(recipe['models'])} task encoders" + (
        f" ({params})" if params else ""
    )
    from clipship.cards.card import public_source

    sources = [f"- {m['name']}: {public_source(m)}" for m in recipe["models"]]
    base = public_source(recipe["pretrained"])
    return summary, "\n".join([f"Base model: {base}", "Task encoders:", *sources])


class _Hub:
    """Translates the client's exceptions into one clear line (and masks the token)."""

    def __init__(self, endpoint: str, repo_id: str):
        self.endpoint, self.repo_id = endpoint, repo_id
        self.token: str | None = None

    def __enter__(self) -> _Hub:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or isinstance(error, ClipshipError) or not isinstance(error, Exception):
            return False  # ours already, or Ctrl-C / exit
        raise PushError(self._mask(self._explain(error))) from None

    def _mask(self, text: str) -> str:
        """Hide URL credentials and the token: wherever it appears, or, for a token too short
        to be a real one (< 8 characters), where it stands as a whole word."""
        text = public_url(text)
        if self.token and len(self.token) >= 8:
            text = text.replace(self.token, "***")
        elif self.token:
            text = re.sub(rf"(?<![\w-]){re.escape(self.token)}(?![\w-])", "***", text)
        return text

    def _explain(self, error: BaseException) -> str:
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(error, HfHubHTTPError) and status is not None:
            if status == 401 and not isinstance(error, RepositoryNotFoundError):
                return (
                    f"the Hub at {self.endpoint} rejected the token (401 Unauthorized): "
                    "check `token` / HF_TOKEN"
                )
            if status == 412:
                return (
                    f"{self.repo_id} changed while this push ran (412): nothing was pushed; "
                    "run it again"
                )
            if status == 403:
                return (
                    f"not allowed to write to {self.repo_id} (403 Forbidden): it belongs to "
                    "another user or organization, or the token cannot write"
                )
            if isinstance(error, RepositoryNotFoundError) or status == 404:
                return f"{self.repo_id}: not found on {self.endpoint} ({status})"
            server = (response.headers.get("X-Error-Message") or "").strip()
            return f"the Hub at {self.endpoint} answered {status}" + (
                f": {server}" if server else ""
            )
        module = type(error).__module__
        if isinstance(error, OSError) or module.startswith(("httpx", "httpcore")):
            return f"cannot reach the Hub at {self.endpoint}: {type(error).__name__}: {error}"
        return f"push failed: {type(error).__name__}: {error}"


@dataclass(frozen=True)
class PushResult:
    """What a push did (or, with ``dry_run``, would upload): the JSON ``clipship push --json``
    prints. ``committed`` is false when the repo already had every file."""

    repo_id: str
    endpoint: str
    revision: str
    files: list[dict[str, Any]]  # [{path, size}] of the folder
    bytes: int
    dry_run: bool
    committed: bool = False
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    commit: str | None = None
    tag: str | None = None
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.dry_run:  # nothing was contacted: only what would be uploaded
            for key in ("committed", "uploaded", "deleted", "commit", "tag", "url"):
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PushResult:
        return cls(**data)


def push(
    folder: Path | str,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    tag: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    message: str | None = None,
    prune: bool = False,
) -> PushResult:
    """Upload ``folder`` to ``repo_id`` in one commit (none if nothing changed)."""
    folder = Path(folder)
    files = release_files(folder)
    check_repo_id(repo_id)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    branch = revision or "main"
    summary = PushResult(
        repo_id,
        public_url(endpoint),
        branch,
        [{"path": f.path, "size": f.size} for f in files],
        sum(f.size for f in files),
        dry_run,
    )
    if dry_run:
        return summary
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from clipship import __version__

    hub = _Hub(public_url(endpoint), repo_id)
    with hub:
        hub.token = token = resolve_token(token)
        api = HfApi(
            endpoint=endpoint, token=token, library_name="clipship", library_version=__version__
        )
        me = api.whoami()
        owner = repo_id.split("/")[0]
        if owner not in {me.get("name"), *(o.get("name") for o in me.get("orgs", []))}:
            raise PushError(
                f"not allowed to write to {repo_id}: it belongs to {owner}, and the token is "
                f"{me.get('name')}'s (not a member of {owner})"
            )
        # None keeps the namespace's default visibility; an existing repo is never re-published.
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise PushError(
                f"{repo_id} already exists and is public: `private` does not change an existing "
                "repo (change its visibility in its settings, or push without `private`)",
                option="private",
            )
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.repo_info(repo_id, revision=branch).sha
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(repo_id, revision=head, recursive=True)
            if hasattr(entry, "blob_id")
        }
        changed = [f for f in files if not _unchanged(f, remote.get(f.path))]
        local = {f.path for f in files}
        stale = sorted(p for p in remote if prune and p not in local and p != ".gitattributes")
        tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags} if tag else {}
        if tag in tags and (changed or stale or tags[tag] != head):
            raise PushError(
                f"tag {tag} already exists on {repo_id} at {tags[tag][:12]}; the push would make "
                "a new commit (nothing was pushed)"
            )
        commit = head
        if changed or stale:
            title, description = commit_message(folder)
            with contextlib.ExitStack() as files_open:
                operations = [
                    CommitOperationAdd(f.path, files_open.enter_context(open_checked(f)))
                    for f in changed
                ]
                operations += [CommitOperationDelete(p) for p in stale]
                info = api.create_commit(
                    repo_id,
                    operations,
                    commit_message=message or title,
                    commit_description=description,
                    revision=branch,
                    parent_commit=head,  # a commit that landed since the comparison fails this
                )
            commit = info.oid
        if tag and tag not in tags:
            api.create_tag(repo_id, tag=tag, revision=commit)
    suffix = "" if branch == "main" else f"/tree/{branch}"
    return dataclasses.replace(
        summary,
        committed=commit != head,
        uploaded=[f.path for f in changed],
        deleted=stale,
        commit=commit,
        tag=tag,
        url=f"{public_url(endpoint)}/{repo_id}{suffix}",
    )
