"""`clipship push`: a release folder to a Hugging Face Hub model repo, in one commit or none.

The folder is read through descriptors opened in one walk and checked before the Hub is
contacted, in a dry run too (``clipship.cards.folder``: no link out of the folder, every tensor
finite, every JSON file plain JSON).

Every call goes through one ``HfApi(endpoint=..., token=...)``: the endpoint is read from
``--endpoint`` / ``HF_ENDPOINT`` when the command runs (``huggingface_hub``'s module-level helpers
read it once, at import). While a push runs, every request the client makes gets a connect timeout
of 10 s and a read (and write) timeout of 60 s, ``CLIPSHIP_HUB_TIMEOUT=<seconds>`` setting the
read timeout (and capping the connect one); the client factory in force before is back when the
push returns. Idempotent calls (whoami, repo info, listings, creating the repo or the branch,
tagging) are tried up to 4 times on a connection error, a timeout, 408, 429 or 5xx, waiting for
``Retry-After`` (seconds, at most 60) or 1, 2, 4 s, all waits of a push together at most 3 min;
a request the client already retried itself (listing pages, preupload) is not tried again. The
commit is not idempotent: when its answer is lost, the branch head is read again; the commit is
tried again only if the head has not moved, reported as pushed if the new head's history carries
this push's ``clipship-push-id`` line (written in the commit description), as not landed if
someone else's commit is there, and as UNKNOWN if the Hub cannot be asked.

The remote tree is compared with the folder first (git-sha1 for regular files, sha256 for LFS
ones), so pushing the same folder twice makes no second commit. The token comes from ``--token``,
``HF_TOKEN`` or the saved login and is never printed or written: error lines are built here from
the HTTP status, and any echo of the token is masked.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clipship.cards.folder import (  # noqa: F401 (release_files, open_checked: public)
    LocalFile,
    ReleaseFiles,
    check_publishable,
    file_sha256,
    git_sha1,
    open_checked,
    read_chunks,
    release_files,
)
from clipship.errors import ClipshipError, PushError

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_VARIABLE = "CLIPSHIP_HUB_TIMEOUT"
CONNECT_TIMEOUT = 10.0  # seconds to open a connection
READ_TIMEOUT = 60.0  # seconds a request may go without a byte read (or written)
TRIES = 4  # of an idempotent call, or of a commit that provably did not land
BACKOFF = 1.0  # seconds before the second try, doubled before each later one
RETRY_AFTER_CAP = 60  # seconds: a longer Retry-After (or rate-limit reset) is cut to this
TOTAL_WAIT = 180.0  # seconds: all waits between tries of one push together
ERROR_ANSWERS = 12  # error answers to one request before the push gives up on it
PUSH_ID = "clipship-push-id"


# --- the Hub ------------------------------------------------------------------------------------

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
        return remote.lfs.sha256 == file_sha256(local)
    return remote.blob_id == git_sha1(local)


def resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()  # HF_TOKEN, then the saved login
    if not token:
        raise PushError(
            "no Hugging Face token: pass `token`, set HF_TOKEN or run `hf auth login`",
            option="token",
        )
    return token


def hub_timeout() -> dict[str, float]:
    """The timeouts every request of a push gets, in seconds, as httpx names them: 10 s to
    connect, 60 s without progress reading or writing; ``CLIPSHIP_HUB_TIMEOUT`` sets the latter
    (and the former, where it is shorter)."""
    connect, read = CONNECT_TIMEOUT, READ_TIMEOUT
    if raw := os.environ.get(TIMEOUT_VARIABLE, "").strip():
        try:
            read = float(raw)
        except ValueError:
            read = math.nan
        if not (math.isfinite(read) and read > 0):
            raise ClipshipError(f"{TIMEOUT_VARIABLE}={raw!r}: not a number of seconds above 0")
        connect = min(connect, read)
    return _timeouts(connect, read)


def _timeouts(connect: float, read: float) -> dict[str, float]:
    return {"connect": connect, "read": read, "write": read, "pool": connect}


def commit_message(files: Iterable[LocalFile], name: str) -> tuple[str, str]:
    """A summary line from the merge recipe among ``files`` (when there is one) and a
    description; ``name`` is the folder's, for a push without a recipe."""
    recipe_file = next((f for f in files if f.path == "clipship_recipe.json"), None)
    if recipe_file is None:
        return f"clipship: upload {name}", ""
    recipe = json.loads(b"".join(read_chunks(recipe_file)))
    params = ", ".join(f"{k}={v}" for k, v in recipe.get("parameters", {}).items())
    summary = f"clipship: {recipe['method']} merge of {len(recipe['models'])} task encoders" + (
        f" ({params})" if params else ""
    )
    from clipship.cards.card import public_source

    sources = [f"- {m['name']}: {public_source(m)}" for m in recipe["models"]]
    base = public_source(recipe["pretrained"])
    return summary, "\n".join([f"Base model: {base}", "Task encoders:", *sources])


_TRANSIENT = ("TimeoutException", "NetworkError", "RemoteProtocolError")  # httpx's, as the client's


def _status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _httpx_kind(error: BaseException, *names: str) -> bool:
    """Whether ``error`` is one of httpx's ``names`` (by name: huggingface_hub 1.x uses
    ``httpx``, 2.x ``httpx2``)."""
    return type(error).__module__.startswith("httpx") and any(
        kind.__name__ in names for kind in type(error).__mro__
    )


def _transient(error: BaseException) -> bool:
    """A failure another try may not meet: no connection, no answer in time, 408, 429, 5xx."""
    status = _status(error)
    if status is not None:
        return status in (408, 429) or status >= 500
    return _httpx_kind(error, *_TRANSIENT)


def _request_of(error: BaseException) -> tuple[str, str] | None:
    """(method, URL) of the request that failed, where the error tells it."""
    try:
        request = error.response.request if _status(error) is not None else error.request
        return request.method, str(request.url)
    except (AttributeError, RuntimeError):
        return None


def _retry_after(error: BaseException) -> float | None:
    value = getattr(getattr(error, "response", None), "headers", {}).get("Retry-After", "")
    return float(min(int(value), RETRY_AFTER_CAP)) if value.strip().isdigit() else None


class _Hub:
    """Talking to the Hub for one push. Inside ``with``: every request the client makes has a
    timeout and a Retry-After of at most ``RETRY_AFTER_CAP`` (a client factory installed for the
    push; the one before is back afterwards, so pushes from several threads of one process at
    once are not supported), ``call`` retries idempotent calls, and any other exception becomes
    one clear line with the token masked."""

    def __init__(self, endpoint: str, repo_id: str, timeout: dict[str, float] | None = None):
        self.endpoint, self.repo_id = endpoint, repo_id
        self.token: str | None = None
        self.timeout = timeout or _timeouts(CONNECT_TIMEOUT, READ_TIMEOUT)
        self.wait_left = TOTAL_WAIT
        self.tries: collections.Counter = collections.Counter()  # per request, in one call
        self.error_answers: collections.Counter = collections.Counter()  # per request, in all
        self._restore: list[Callable[[], None]] = []

    def __enter__(self) -> _Hub:
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import _http

        # huggingface_hub has no getter for the factory in force: this is where it keeps it.
        previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory

        def factory():
            client = previous()
            hooks = client.event_hooks
            client.event_hooks = {
                "request": [*hooks.get("request", []), self._on_request],
                "response": [*hooks.get("response", []), self._on_response],
            }
            return client

        set_client_factory(factory)  # closes the shared client: the next request makes ours
        self._restore.append(lambda: set_client_factory(previous))
        # The client logs each of its own retries; the one line this push ends with says enough.
        quiet = logging.getLogger("huggingface_hub")
        self._restore.append(lambda level=quiet.level: quiet.setLevel(level))
        quiet.setLevel(logging.ERROR)
        return self

    def __exit__(self, kind, error, tb) -> bool:
        while self._restore:
            self._restore.pop()()
        if error is None or isinstance(error, ClipshipError) or not isinstance(error, Exception):
            return False  # ours already, or Ctrl-C / exit
        raise PushError(self._mask(self._explain(error))) from None

    def _on_request(self, request: Any) -> None:
        # httpx reads the timeout from here when it sends; a call's own explicit one is kept
        asked = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: asked.get(key) if asked.get(key) is not None else self.timeout[key]
            for key in ("connect", "read", "write", "pool")
        }
        self.tries[request.method, str(request.url)] += 1

    def _on_response(self, response: Any) -> None:
        headers = response.headers
        value = headers.get("Retry-After", "").strip()
        if value.isdigit() and int(value) > RETRY_AFTER_CAP:  # the client's own retries wait it
            headers["Retry-After"] = str(RETRY_AFTER_CAP)
        if "RateLimit" in headers:  # '"api";r=0;t=55': the client waits t seconds on a 429
            headers["RateLimit"] = re.sub(
                r"(\bt\s*=\s*)(\d+)",
                lambda m: f"{m[1]}{min(int(m[2]), RETRY_AFTER_CAP)}",
                headers["RateLimit"],
            )
        if response.status_code >= 400:
            # the client loops on some answers by itself (a 409 "conflicting operation" when
            # creating a repo, with no end): a Hub that keeps answering so must not hold us
            request = response.request
            key = (request.method, urlsplit(str(request.url)).path)
            self.error_answers[key] += 1
            if self.error_answers[key] > ERROR_ANSWERS:
                raise PushError(
                    f"the Hub at {self.endpoint} answered {response.status_code} to "
                    f"{key[0]} {key[1]} {self.error_answers[key]} times; giving up"
                )

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``, an idempotent call, tried again while ``retry`` says."""
        for attempt in itertools.count(1):
            self.tries.clear()
            try:
                return function(*args, **kwargs)
            except Exception as error:
                if not self.retry(error, attempt):
                    raise

    def retry(self, error: Exception, attempt: int) -> bool:
        """After ``attempt`` tries of a call that failed with ``error``: wait and say True when
        another try is worth it (a transient failure of a request the client did not already
        retry, tries and the push's total wait left)."""
        if isinstance(error, ClipshipError) or attempt >= TRIES or not _transient(error):
            return False
        if self.tries[_request_of(error)] > 1:  # the client's own backoff tried it already
            return False
        delay = _retry_after(error)
        delay = BACKOFF * 2 ** (attempt - 1) if delay is None else delay
        if delay > self.wait_left:
            return False
        self.wait_left -= delay
        time.sleep(delay)
        return True

    def _mask(self, text: str) -> str:
        """Hide URL credentials and the token: wherever it appears, or, for a token too short
        to be a real one (< 8 characters), where it stands as a whole word. Line breaks (from a
        server's message) become spaces: an error is one line."""
        text = public_url(re.sub(r"\s*[\r\n]+\s*", " ", text))
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
        if _httpx_kind(error, "ConnectTimeout", "PoolTimeout"):
            limit = f"{self.timeout['connect']:g} s"
            return f"cannot reach the Hub at {self.endpoint}: no connection within {limit}"
        if _httpx_kind(error, "TimeoutException"):
            limit = f"{self.timeout['read']:g} s"
            return (
                f"the Hub at {self.endpoint} did not answer within {limit} "
                f"({type(error).__name__}; {TIMEOUT_VARIABLE} sets the limit)"
            )
        module = type(error).__module__
        if isinstance(error, OSError) or module.startswith(("httpx", "httpcore")):
            return f"cannot reach the Hub at {self.endpoint}: {type(error).__name__}: {error}"
        return f"push failed: {type(error).__name__}: {error}"

    def _why(self, error: BaseException) -> str:
        """A few words on why a request got no usable answer (for the UNKNOWN line)."""
        status = _status(error)
        if status is not None:
            return f"the Hub answered {status}"
        if _httpx_kind(error, "TimeoutException"):
            return f"no answer within {self.timeout['read']:g} s"
        return f"no answer ({type(error).__name__})"


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
    """Upload ``folder`` to ``repo_id`` in one commit (none if nothing changed).

    >>> push("runs/ta/release", "me/clip-ta", tag="v1").commit  # doctest: +SKIP
    '3f1c…'
    """
    from clipship.schemas import check_line, check_revision

    folder = Path(folder)
    with release_files(folder) as files:
        check_repo_id(repo_id)
        for value, option, check in [
            (revision, "revision", check_revision),
            (tag, "tag", check_revision),
            (message, "message", check_line),  # one line of visible text
        ]:
            if value is not None:
                check(value, f"`{option}`", option=option)
        check_publishable(files)
        endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        summary = PushResult(
            repo_id,
            public_url(endpoint),
            revision or "main",
            [{"path": f.path, "size": f.size} for f in files],
            sum(f.size for f in files),
            dry_run,
        )
        if dry_run:
            return summary
        hub = _Hub(public_url(endpoint), repo_id, hub_timeout())
        with hub:
            hub.token = token = resolve_token(token)
            return _push(
                hub, files, folder.name, summary, token, endpoint, tag, private, message, prune
            )


def _push(
    hub: _Hub,
    files: list[LocalFile],
    name: str,
    summary: PushResult,
    token: str,
    endpoint: str,
    tag: str | None,
    private: bool,
    message: str | None,
    prune: bool,
) -> PushResult:
    from huggingface_hub import HfApi

    from clipship import __version__

    repo_id, branch = summary.repo_id, summary.revision
    api = HfApi(
        endpoint=endpoint, token=token, library_name="clipship", library_version=__version__
    )
    me = hub.call(api.whoami)
    owner = repo_id.split("/")[0]
    if owner not in {me.get("name"), *(o.get("name") for o in me.get("orgs", []))}:
        raise PushError(
            f"not allowed to write to {repo_id}: it belongs to {owner}, and the token is "
            f"{me.get('name')}'s (not a member of {owner})"
        )
    # None keeps the namespace's default visibility; an existing repo is never re-published.
    hub.call(api.create_repo, repo_id, private=True if private else None, exist_ok=True)
    if private and not hub.call(api.repo_info, repo_id).private:
        raise PushError(
            f"{repo_id} already exists and is public: `private` does not change an existing "
            "repo (change its visibility in its settings, or push without `private`)",
            option="private",
        )
    if branch != "main":
        hub.call(api.create_branch, repo_id, branch=branch, exist_ok=True)
    head = hub.call(api.repo_info, repo_id, revision=branch).sha
    tree = hub.call(lambda: list(api.list_repo_tree(repo_id, revision=head, recursive=True)))
    remote = {entry.path: entry for entry in tree if hasattr(entry, "blob_id")}
    changed = [f for f in files if not _unchanged(f, remote.get(f.path))]
    local = {f.path for f in files}
    stale = sorted(p for p in remote if prune and p not in local and p != ".gitattributes")
    tags = (
        {t.name: t.target_commit for t in hub.call(api.list_repo_refs, repo_id).tags} if tag else {}
    )
    if tag in tags and (changed or stale or tags[tag] != head):
        raise PushError(
            f"tag {tag} already exists on {repo_id} at {tags[tag][:12]}; the push would make "
            "a new commit (nothing was pushed)"
        )
    commit = head
    if changed or stale:
        title, description = commit_message(files, name)
        commit = _commit(hub, api, branch, head, changed, stale, message or title, description)
    if tag and tag not in tags:
        try:
            _tag(hub, api, tag, commit)
        except Exception as error:
            why = str(error) if isinstance(error, ClipshipError) else hub._explain(error)
            raise PushError(
                hub._mask(
                    f"{repo_id} has commit {commit[:12]} on {branch}, but tagging it {tag} failed "
                    f"({why}); check the repo's tags, then push again with the same tag"
                )
            ) from None
    suffix = "" if branch == "main" else f"/tree/{branch}"
    return dataclasses.replace(
        summary,
        committed=commit != head,
        uploaded=[f.path for f in changed],
        deleted=stale,
        commit=commit,
        tag=tag,
        url=f"{hub.endpoint}/{repo_id}{suffix}",
    )


def _commit(
    hub: _Hub,
    api: Any,
    branch: str,
    head: str,
    changed: list[LocalFile],
    stale: list[str],
    title: str,
    description: str,
) -> str:
    """Commit ``changed`` and delete ``stale`` on ``branch`` over ``head``; the new commit's id.

    The commit names ``head`` as its parent, so it can never land on top of another one (not
    even on one of its own earlier tries). Its description carries a line unique to this push,
    which is how a commit whose answer was lost is recognised on the branch afterwards (a file
    tree comparison could not tell it from someone else's push of the same files)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    push_id = uuid.uuid4().hex
    description = "\n\n".join(filter(None, [description, f"{PUSH_ID}: {push_id}"]))
    sent = False  # a commit request went out whose outcome is not known from its answer
    for attempt in itertools.count(1):
        hub.tries.clear()
        try:
            with contextlib.ExitStack() as handles:
                operations = [
                    CommitOperationAdd(f.path, handles.enter_context(open_checked(f)))
                    for f in changed
                ]
                operations += [CommitOperationDelete(p) for p in stale]
                info = api.create_commit(
                    hub.repo_id,
                    operations,
                    commit_message=title,
                    commit_description=description,
                    revision=branch,
                    parent_commit=head,  # a commit that landed since the comparison fails this
                )
            return info.oid
        except Exception as error:
            if isinstance(error, ClipshipError):
                raise
            request = _request_of(error)
            committing = request is None or re.search(r"/commit/[^/]+$", urlsplit(request[1]).path)
            # 412 on a later try: the parent moved, maybe to an earlier try of ours
            if committing and (_transient(error) or (sent and _status(error) == 412)):
                sent = True  # (the reads in _landed reset hub.tries: retry() may try again)
                if landed := _landed(hub, api, branch, head, push_id, error):
                    return landed
            if hub.retry(error, attempt):
                continue
            if sent and _status(error) != 412:
                raise PushError(
                    hub._mask(
                        f"{hub._explain(error)}; tried {attempt} times, and {branch} has not "
                        "moved: nothing was pushed"
                    )
                ) from None
            raise
    raise AssertionError("unreachable")


def _landed(
    hub: _Hub, api: Any, branch: str, head: str, push_id: str, failure: Exception
) -> str | None:
    """After a commit request with no usable answer: our commit's id if it landed, None if
    ``branch`` is still at ``head`` (it did not); raises when someone else's commit is there or
    when the Hub cannot be asked."""
    mark = f"{PUSH_ID}: {push_id}"
    try:
        now = hub.call(api.repo_info, hub.repo_id, revision=branch).sha
        if now == head:
            return None
        history = hub.call(api.list_repo_commits, hub.repo_id, revision=now)
    except Exception as error:
        if isinstance(error, ClipshipError):
            raise
        raise PushError(
            hub._mask(
                f"the commit to {hub.repo_id} (branch {branch}) may have landed or not: its "
                f"outcome is UNKNOWN ({hub._why(failure)} to the commit, and reading the branch "
                f"back failed: {hub._why(error)}); look for '{mark}' in the latest commits of "
                f"{branch} before pushing again"
            )
        ) from None
    for commit in history:  # newest first, down to the commit we built on
        if commit.commit_id == head:
            break
        if mark in f"{commit.title}\n{commit.message}":
            return commit.commit_id
    raise PushError(
        f"{branch} of {hub.repo_id} moved to {now[:12]} (someone else's commit) while this push "
        "ran, and this push's commit did not land: nothing was pushed; run the push again"
    )


def _tag(hub: _Hub, api: Any, tag: str, commit: str) -> None:
    """Tag ``commit``; a tag that turns out to be there already, at ``commit``, is success (a
    first try whose answer was lost)."""
    for attempt in itertools.count(1):
        hub.tries.clear()
        try:
            api.create_tag(hub.repo_id, tag=tag, revision=commit)
            return
        except Exception as error:
            exists = _status(error) == 409
            if isinstance(error, ClipshipError) or not (exists or _transient(error)):
                raise
            again = not exists and hub.retry(error, attempt)
            tags = {t.name: t.target_commit for t in hub.call(api.list_repo_refs, hub.repo_id).tags}
            if tags.get(tag) == commit:
                return
            if tag in tags:
                raise PushError(f"tag {tag} already exists at {tags[tag][:12]}") from None
            if not again:
                raise error from None
    raise AssertionError("unreachable")
