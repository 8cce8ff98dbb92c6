"""A small in-memory Hugging Face Hub API server for offline tests and the demo (never shipped).

It implements the routes the unmodified ``huggingface_hub`` client uses to create a repo, push
one commit, tag it and download it again: ``whoami-v2``, repo create/delete, ``validate-yaml``,
``preupload`` (every file ``regular``, with the current file's git-sha1 ``oid`` so unchanged
files are skipped), the ndjson ``commit`` endpoint, refs, branches, tags, commits, tree and
paths-info listings, model info with ``cardData``, and ``resolve`` (HEAD and GET). Tokens are
checked: a wrong token is 401 everywhere, private repos are invisible (404) to anyone but their
owner, and writing to someone else's namespace is 403.

    python tests/hubserver.py [--port 0] [-- COMMAND...]

With a command, the server runs only while the command does, with ``HF_ENDPOINT`` set for it.

Tests can make it a faulty Hub: ``server.state.faults.add("POST", r"/commit/", "lost")`` makes
the next request matching the method and the path regex (the next ``times`` of them) misbehave:

- ``stall``: read it, answer nothing for ``seconds``, then hang up;
- ``status``: answer ``status`` (503 unless told), with ``retry_after`` as ``Retry-After`` and
  ``message`` as the error text; ``429`` is a ``status`` of 429;
- ``drop``: hang up without answering;
- ``lost``: do what it asks (apply the commit), then hang up without answering.

``action`` (a callable taking the ``HubState``) runs when the fault fires, under the state lock
for ``lost``. With no fault scheduled the server behaves as before; ``faults.clear()`` removes
them all and wakes any stalled request.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"
DATE = "2026-01-01T00:00:00.000Z"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    id: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    author: str


@dataclass
class Repo:
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(sha)

    def commit(self, branch: str, files: dict[str, bytes], title: str, message: str, author: str):
        parent = self.branches.get(branch)
        digest = hashlib.sha1(json.dumps([parent, title, message]).encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_sha1(files[path]).encode())
        commit = Commit(digest.hexdigest(), parent, files, title, message, author)
        self.commits[commit.id] = commit
        self.branches[branch] = commit.id
        return commit


@dataclass
class Fault:
    """One scheduled misbehaviour, for the next ``times`` requests that match (see the module)."""

    method: str  # "GET", "POST", ... or "*"
    path: re.Pattern[str]  # searched in the URL path
    kind: str  # stall | status | drop | lost
    times: int = 1
    status: int = 503
    retry_after: str | None = None
    seconds: float = 600.0  # how long a stall lasts at most
    action: Callable[[HubState], None] | None = None
    message: str | None = None  # a status answer's error text
    hits: int = 0


class Faults:
    """The faults scheduled on one server; thread-safe."""

    KINDS = ("stall", "status", "429", "drop", "lost")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._release = threading.Event()

    def add(
        self,
        method: str,
        path: str,
        kind: str,
        times: int = 1,
        *,
        status: int = 503,
        retry_after: str | int | None = None,
        seconds: float = 600.0,
        action: Callable[[HubState], None] | None = None,
        message: str | None = None,
    ) -> Fault:
        if kind not in self.KINDS:
            raise ValueError(f"unknown fault {kind!r}: one of {', '.join(self.KINDS)}")
        if kind == "429":
            kind, status = "status", 429
        retry = None if retry_after is None else str(retry_after)
        fault = Fault(
            method.upper(), re.compile(path), kind, times, status, retry, seconds, action, message
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault with tries left that matches this request (using up one), if any."""
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and fault.method in ("*", method) and fault.path.search(path):
                    fault.times -= 1
                    fault.hits += 1
                    return fault
        return None

    def pending(self) -> list[Fault]:
        """The faults that have not fired as many times as asked."""
        with self._lock:
            return [f for f in self._faults if f.times > 0]

    def stall(self, fault: Fault) -> None:
        self._release.wait(fault.seconds)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            release, self._release = self._release, threading.Event()
        release.set()


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.faults = Faults()


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>revision|preupload|commit|refs|tag|branch"
    r"|commits|tree|paths-info)(?:/(?P<rest>.*))?)?$"
)
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _user(self) -> str | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        if token not in self.state.tokens:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def _body(self) -> bytes:
        return self.body

    def _send(self, status: int, payload: Any = None, headers: dict | None = None, raw=None):
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _hang_up(self) -> None:
        """Close the connection without a word: the client sees it end with no answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.state.requests.append((self.command, url.path))
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.state.faults.take(self.command, url.path)
        if fault is not None and fault.kind != "lost":
            self._misbehave(fault)
            return
        with self.state.lock:
            answer = self._answer(url.path, parse_qs(url.query))
            if fault is not None:  # lost: done, but the answer never leaves
                if fault.action is not None:
                    fault.action(self.state)
                self._hang_up()
                return
        self._send(*answer)

    def _answer(self, path: str, query: dict) -> tuple[int, Any, dict | None, bytes | None]:
        try:
            return self._route(path, query)
        except HttpError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            return e.status, {"error": e.message, **e.extra}, headers, None
        except Exception as e:  # a request this server cannot handle: answer, never hang up
            message = f"{type(e).__name__}: {e}"
            return 400, {"error": message}, {"X-Error-Message": message}, None

    def _misbehave(self, fault: Fault) -> None:
        if fault.action is not None:
            fault.action(self.state)
        if fault.kind == "stall":
            self.state.faults.stall(fault)
        if fault.kind in ("stall", "drop"):
            self._hang_up()
            return
        message = fault.message or f"injected fault: {fault.status}"
        headers = {"X-Error-Message": message}
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        self._send(fault.status, {"error": message}, headers)

    do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _dispatch

    def _repo(self, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HttpError(404, "Repository not found", "RepoNotFound")
        if write and user != repo.owner:
            raise HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes ------------------------------------------------------------------------------
    def _route(self, path: str, query: dict) -> tuple[int, Any, dict | None, bytes | None]:
        user = self._user()
        method = self.command
        if path == "/api/whoami-v2":
            if user is None:
                raise HttpError(401, "Invalid username or password.")
            auth = {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}
            return 200, {"type": "user", "name": user, "orgs": [], "auth": auth}, None, None
        if path == "/api/validate-yaml":
            yaml.safe_load(json.loads(self._body())["content"].split("---")[1])
            return 200, {"errors": [], "warnings": []}, None, None
        if path == "/api/repos/create":
            return self._create(user, json.loads(self._body()))
        if path == "/api/repos/delete":
            body = json.loads(self._body())
            repo_id = f"{body.get('organization') or user}/{body['name']}"
            self._repo(repo_id, user, write=True)
            del self.state.repos[repo_id]
            return 200, {}, None, None
        if match := RESOLVE.match(path):
            repo = self._repo(match["repo"], user)
            commit = self._commit(repo, match["rev"])
            name = unquote(match["path"])
            if name not in commit.files:
                raise HttpError(404, "Entry not found", "EntryNotFound")
            data = commit.files[name]
            headers = {"X-Repo-Commit": commit.id, "ETag": f'"{git_sha1(data)}"'}
            return 200, None, headers, data
        if match := API.match(path):
            return self._api(user, method, match["repo"], match["action"], match["rest"], query)
        raise HttpError(404, f"no route {method} {path}")

    def _create(self, user: str | None, body: dict) -> tuple[int, Any, None, None]:
        if user is None:
            raise HttpError(401, "You must be authenticated to create a repo")
        owner = body.get("organization") or user
        if owner != user:
            raise HttpError(403, f"You don't have the rights to create a model under {owner}")
        repo_id = f"{owner}/{body['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.state.repos:
            raise HttpError(409, "You already created this model repo", url=url)
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = self.state.repos[repo_id] = Repo(owner, private)
        repo.commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit", "", user)
        return 200, {"url": url, "name": repo_id, "id": repo_id}, None, None

    def _api(self, user, method, repo_id, action, rest, query):  # noqa: C901 - one route table
        write = action in ("preupload", "commit", "tag", "branch") and method == "POST"
        if write and user is None:
            raise HttpError(401, "You must be authenticated to write")
        repo = self._repo(repo_id, user, write=write)
        rest = rest or "main"
        if action in (None, "revision"):
            commit = self._commit(repo, rest)
            readme = commit.files.get("README.md", b"").decode()
            card = yaml.safe_load(readme.split("---")[1]) if readme.startswith("---") else None
            info = {
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": commit.id,
                "private": repo.private,
                "lastModified": DATE,
                "tags": (card or {}).get("tags", []),
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                "cardData": card,
            }
            return 200, info, None, None
        if action == "refs":
            refs = {
                "branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                    for b, c in repo.branches.items()
                ],
                "tags": [
                    {"name": t, "ref": f"refs/tags/{t}", "targetCommit": c}
                    for t, c in repo.tags.items()
                ],
                "converts": [],
            }
            return 200, refs, None, None
        if action == "commits":
            commit, out = self._commit(repo, rest), []
            while commit is not None:
                out.append(
                    {
                        "id": commit.id,
                        "title": commit.title,
                        "message": commit.message,
                        "authors": [{"user": commit.author}],
                        "date": DATE,
                    }
                )
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return 200, out, None, None
        if action == "tree":
            revision, _, prefix = rest.partition("/")
            commit = self._commit(repo, revision)
            entries = [
                {"type": "file", "oid": git_sha1(d), "size": len(d), "path": p}
                for p, d in sorted(commit.files.items())
                if p.startswith(unquote(prefix))
            ]
            return 200, entries, None, None
        if action == "paths-info":
            commit = self._commit(repo, rest)
            body = self._body().decode()
            try:
                paths = json.loads(body)["paths"]
            except json.JSONDecodeError:
                paths = parse_qs(body).get("paths", [])
            entries = [
                {"type": "file", "oid": git_sha1(d), "size": len(d), "path": p}
                for p, d in sorted(commit.files.items())
                if p in paths
            ]
            return 200, entries, None, None
        if action == "preupload":
            commit = self._commit(repo, rest)
            files = json.loads(self._body())["files"]
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None,
                }
                for f in files
            ]
            return 200, {"files": answer, "commitOid": commit.id}, None, None
        if action == "commit":
            return self._commit_ndjson(repo, repo_id, unquote(rest), user)
        if action == "tag":
            body = json.loads(self._body())
            commit = self._commit(repo, rest)
            if body["tag"] in repo.tags:
                raise HttpError(409, f"Tag {body['tag']} already exists")
            repo.tags[body["tag"]] = commit.id
            return 200, {}, None, None
        if action == "branch":
            body = json.loads(self._body() or b"{}")
            if unquote(rest) in repo.branches:
                raise HttpError(409, f"Branch {rest} already exists")
            start = self._commit(repo, body.get("startingPoint") or "main")
            repo.branches[unquote(rest)] = start.id
            return 200, {}, None, None
        raise HttpError(404, f"no route {method} {action}")

    def _commit_ndjson(self, repo: Repo, repo_id: str, branch: str, user: str):
        if branch not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = dict(repo.commits[repo.branches[branch]].files)
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch]:
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            elif key != "header":
                raise HttpError(
                    400, f"unsupported commit entry {key!r} (this server is regular-only)"
                )
        commit = repo.commit(branch, files, header["summary"], header.get("description", ""), user)
        url = f"http://{self.headers['Host']}/{repo_id}/commit/{commit.id}"
        return 200, {"commitUrl": url, "commitOid": commit.id, "pullRequestUrl": None}, None, None


class HubServer:
    """``with HubServer({"token": "alice"}) as hub: hub.url``: a server on a free local port."""

    def __init__(self, tokens: dict[str, str], port: int = 0):
        self.state = HubState(tokens)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.state.faults.clear()  # no stalled request may hold the shutdown
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", default="demo")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    token = "hf_demo_local_token"  # the caller's own HF_TOKEN is never handed to this server
    with HubServer({token: args.user}, args.port) as hub:
        command = [c for c in args.command if c != "--"]
        if not command:
            print(f"local Hub API at {hub.url} (user {args.user!r}); Ctrl-C stops it", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                return
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token}
        env.pop("HF_OIDC_RESOURCE", None)  # no other token source may win over the demo's
        env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        code = subprocess.call(command, env=env)
        print(f"(the local Hub server at {hub.url} stops now)", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
