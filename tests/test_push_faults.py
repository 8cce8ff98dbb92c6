"""`clipship push` against a faulty or hostile Hub (tests/hubserver.py's faults) and a folder that
changes under it: every request times out, idempotent calls are retried a bounded number of times,
a commit whose answer was lost is reported for what it did, nothing is read from outside the
folder, and nothing non-finite is published.

Pushes run in this process with ``CLIPSHIP_HUB_TIMEOUT`` at half a second and the backoff between
tries cut to 50 ms (a Retry-After the Hub sends is still waited for real), so the module runs in
well under a minute; a few run the CLI to see the one error line and the exit code. They pass
with huggingface_hub 2 (httpx2) and 1.x (httpx) alike."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import _http
from safetensors.torch import save_file

import clipship.cards.push as pushing
from clipship.cards.push import TRIES, PushResult, push, release_files
from clipship.errors import PushError

from .conftest import HUB_TOKENS

ALICE = list(HUB_TOKENS)[0]
TIMEOUT = 0.5  # CLIPSHIP_HUB_TIMEOUT, seconds
WHOAMI, CREATE, YAML = r"^/api/whoami-v2$", r"^/api/repos/create$", r"^/api/validate-yaml$"
HEAD, TREE, REFS = r"/revision/main$", r"/tree/", r"/refs$"
COMMIT, TAG = r"/commit/main$", r"/tag/"


@pytest.fixture(autouse=True)
def short_waits(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPSHIP_HUB_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(pushing, "BACKOFF", 0.05)


@pytest.fixture
def faults(hub):
    yield hub.state.faults
    hub.state.faults.clear()


@pytest.fixture
def folder(tmp_path) -> Path:
    return release_folder(tmp_path / "release")


def release_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": 4, "layer_norm_eps": 1e-5}))
    save_file({"w": torch.randn(4, 4), "steps": torch.arange(4)}, str(path / "model.safetensors"))
    (path / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")  # validate-yaml too
    (path / "sub/notes.txt").write_text("notes\n")
    return path


def files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def new_repo() -> str:
    return f"alice/faults-{uuid.uuid4().hex[:8]}"


def history(hub, repo_id: str, branch: str = "main") -> list:
    """The branch's commits on the server, newest first."""
    repo = hub.state.repos[repo_id]
    commit, out = repo.resolve(branch), []
    while commit is not None:
        out.append(commit)
        commit = repo.commits.get(commit.parent) if commit.parent else None
    return out


def requests_to(hub, since: int, method: str, path: str) -> int:
    return sum(m == method and bool(re.search(path, p)) for m, p in hub.state.requests[since:])


def run_push(hub, folder: Path, repo_id: str, **options) -> tuple[PushResult | None, str, float]:
    """(result or None, the error line or "", seconds it took)."""
    start = time.monotonic()
    try:
        result = push(folder, repo_id, token=ALICE, endpoint=hub.url, **options)
        return result, "", time.monotonic() - start
    except PushError as e:
        return None, str(e), time.monotonic() - start


def assert_no_token(capsys, caplog, *texts: str) -> None:
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text, *texts):
        assert ALICE not in text


def assert_pushed_once(hub, repo_id: str, result: PushResult, folder: Path, branch="main"):
    commits = history(hub, repo_id, branch)
    assert len(commits) == 2, [c.title for c in commits]  # the repo's first commit, and ours
    assert result.committed and result.commit == commits[0].id
    assert {k: v for k, v in commits[0].files.items() if k != ".gitattributes"} == files_of(folder)


# (method, path, fault, times, options): each fault is met, then the push succeeds.
RECOVERED = [
    ("GET", WHOAMI, "status", 1, {"status": 503, "retry_after": 1}),
    ("GET", WHOAMI, "429", 1, {"retry_after": 1}),
    ("GET", HEAD, "status", 2, {"status": 503, "retry_after": 1}),
    ("GET", TREE, "status", 1, {"status": 503, "retry_after": 0}),  # huggingface_hub 2's retry
    ("POST", COMMIT, "status", 1, {"status": 503, "retry_after": 1}),
    ("POST", COMMIT, "429", 1, {"retry_after": 1}),
    ("POST", COMMIT, "status", 2, {"status": 500}),
    ("GET", WHOAMI, "drop", 2, {}),
    ("POST", CREATE, "drop", 1, {}),
    ("POST", CREATE, "lost", 1, {}),  # created: the next try's 409 is "it exists"
    ("GET", HEAD, "drop", 1, {}),
    ("GET", TREE, "drop", 1, {}),
    ("POST", YAML, "drop", 1, {}),
    ("POST", COMMIT, "drop", 3, {}),
    ("GET", WHOAMI, "stall", 1, {"seconds": 10}),  # then it hangs up, should timeouts fail
    ("GET", HEAD, "stall", 1, {"seconds": 10}),
    ("POST", COMMIT, "stall", 1, {"seconds": 10}),
]


@pytest.mark.parametrize(
    "method, path, kind, times, options",
    RECOVERED,
    ids=[f"{m} {p} {k} x{t}" for m, p, k, t, _ in RECOVERED],
)
def test_transient_faults_are_retried_and_the_push_lands_once(
    hub, faults, folder, capsys, caplog, method, path, kind, times, options
):
    repo_id, before = new_repo(), len(hub.state.requests)
    fault = faults.add(method, path, kind, times, **options)
    result, error, seconds = run_push(hub, folder, repo_id)
    assert error == "" and fault.hits == times and not faults.pending()
    assert_pushed_once(hub, repo_id, result, folder)
    assert requests_to(hub, before, method, path) == times + 1
    assert requests_to(hub, before, "POST", COMMIT) == 1 + (times if path == COMMIT else 0)
    waited = int(options.get("retry_after", 0)) * times
    assert waited <= seconds < waited + 10  # Retry-After was honoured
    assert_no_token(capsys, caplog)


def test_a_commit_whose_answer_was_lost_is_reported_as_the_success_it_was(hub, faults, tmp_path):
    twin = release_folder(tmp_path / "twin")  # the same files, pushed with no fault
    expected, _, _ = run_push(hub, twin, new_repo())
    folder = release_folder(tmp_path / "release")
    repo_id = new_repo()
    faults.add("POST", COMMIT, "lost")
    result, error, _ = run_push(hub, folder, repo_id)
    assert error == ""
    assert_pushed_once(hub, repo_id, result, folder)  # found on the branch, not pushed twice
    different = {"repo_id", "commit", "url"}
    assert {k: v for k, v in result.to_json().items() if k not in different} == {
        k: v for k, v in expected.to_json().items() if k not in different
    }
    assert result.url == f"{hub.url}/{repo_id}"
    message = history(hub, repo_id)[0].message
    assert message.count("clipship-push-id: ") == 1


def test_a_lost_commit_on_a_branch_then_a_lost_tag(hub, faults, folder):
    repo_id = new_repo()
    faults.add("POST", r"/branch/rc$", "drop")
    faults.add("POST", r"/commit/rc$", "lost")
    faults.add("POST", TAG, "lost")
    result, error, _ = run_push(hub, folder, repo_id, revision="rc", tag="v1")
    assert error == "" and not faults.pending()
    assert_pushed_once(hub, repo_id, result, folder, branch="rc")
    assert hub.state.repos[repo_id].tags == {"v1": result.commit}
    assert result.url.endswith(f"/{repo_id}/tree/rc")


@pytest.mark.parametrize("kind", ["drop", "status", "lost"])
def test_tag_faults_end_with_the_tag_on_our_commit(hub, faults, folder, kind):
    repo_id, before = new_repo(), len(hub.state.requests)
    faults.add("GET", REFS, "drop")  # the refs listing, before the commit
    faults.add("POST", TAG, kind, retry_after=0)
    result, error, _ = run_push(hub, folder, repo_id, tag="v1")
    assert error == "" and not faults.pending()
    assert hub.state.repos[repo_id].tags == {"v1": result.commit}
    assert requests_to(hub, before, "POST", TAG) == (1 if kind == "lost" else 2)


def test_a_lost_tag_answer_with_the_tag_elsewhere_says_the_commit_landed(hub, faults, folder):
    repo_id = new_repo()

    def tag_elsewhere(state):  # someone tags the repo's first commit meanwhile
        repo = state.repos[repo_id]
        repo.tags["v1"] = history(hub, repo_id)[-1].id

    faults.add("POST", TAG, "drop", action=tag_elsewhere)
    _, error, _ = run_push(hub, folder, repo_id, tag="v1")
    head = history(hub, repo_id)[0]
    assert f"has commit {head.id[:12]} on main, but tagging it v1 failed" in error
    assert "tag v1 already exists at" in error and "\n" not in error
    assert len(history(hub, repo_id)) == 2


def foreign_commit(repo_id: str):
    """A fault action: bob's push lands on main just then."""

    def act(state):
        repo = state.repos[repo_id]
        files = dict(repo.resolve("main").files, **{"other.txt": b"someone else's"})
        repo.commit("main", files, "someone else's commit", "", "bob")

    return act


def test_a_branch_moved_by_someone_else_is_not_taken_for_our_commit(hub, faults, folder):
    repo_id = new_repo()
    faults.add("POST", COMMIT, "drop", action=foreign_commit(repo_id))
    _, error, _ = run_push(hub, folder, repo_id)
    head = history(hub, repo_id)[0]
    assert error == (
        f"main of {repo_id} moved to {head.id[:12]} (someone else's commit) while this push ran, "
        "and this push's commit did not land: nothing was pushed; run the push again"
    )
    assert [c.title for c in history(hub, repo_id)] == ["someone else's commit", "initial commit"]


def test_our_lost_commit_is_found_under_a_later_one(hub, faults, folder):
    repo_id = new_repo()
    faults.add("POST", COMMIT, "lost", action=foreign_commit(repo_id))
    result, error, _ = run_push(hub, folder, repo_id, tag="v1")
    ours = history(hub, repo_id)[1]
    assert error == "" and result.commit == ours.id and ours.author == "alice"
    assert hub.state.repos[repo_id].tags == {"v1": ours.id}


def unreachable_after(path: str, kind: str = "drop", **options):
    """A fault action: from then on the Hub does not answer ``GET path`` (a few times over)."""
    return lambda state: state.faults.add("GET", path, kind, TRIES + 2, **options)


def test_an_outcome_that_cannot_be_checked_is_reported_as_unknown(
    hub, faults, folder, capsys, caplog
):
    repo_id = new_repo()
    faults.add("POST", COMMIT, "lost", action=unreachable_after(HEAD))
    _, error, _ = run_push(hub, folder, repo_id)
    assert "its outcome is UNKNOWN" in error and "\n" not in error
    assert f"the commit to {repo_id} (branch main) may have landed or not" in error
    assert "look for 'clipship-push-id: " in error and "before pushing again" in error
    assert "nothing was pushed" not in error and "cannot reach" not in error
    assert len(history(hub, repo_id)) == 2  # it had landed indeed
    assert_no_token(capsys, caplog, error)


def test_the_cli_reports_a_lost_commit_as_pushed_and_an_unknown_one_in_one_line(
    hub, hub_env, faults, folder
):
    env = {**hub_env, "CLIPSHIP_HUB_TIMEOUT": str(TIMEOUT)}
    command = [sys.executable, "-m", "clipship", "push", str(folder), "--repo-id"]
    repo_id = new_repo()
    faults.add("POST", COMMIT, "lost")
    done = subprocess.run([*command, repo_id], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    head = history(hub, repo_id)[0].id
    assert f"in commit {head[:12]}" in done.stdout

    repo_id = new_repo()
    # Retry-After 0: the CLI waits its real backoff only where the Hub gives none
    faults.add("POST", COMMIT, "lost", action=unreachable_after(HEAD, "status", retry_after=0))
    unknown = subprocess.run(
        [*command, repo_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("error: the commit to") and unknown.stderr.count("\n") == 1
    assert "UNKNOWN" in unknown.stderr and ALICE not in unknown.stderr
    assert len(history(hub, repo_id)) == 2


# (method, path, fault, the error line's start): the fault never ends.
PERMANENT = [
    ("GET", WHOAMI, "status", "the Hub at {url} answered 500"),
    ("GET", WHOAMI, "stall", "the Hub at {url} did not answer within 0.5 s (ReadTimeout"),
    ("GET", HEAD, "drop", "cannot reach the Hub at {url}: RemoteProtocolError"),
    ("POST", COMMIT, "status", "the Hub at {url} answered 500: injected fault: 500; tried 4 times"),
    ("POST", COMMIT, "stall", "the Hub at {url} did not answer within 0.5 s (ReadTimeout; "),
]


@pytest.mark.parametrize(
    "method, path, kind, expect", PERMANENT, ids=[f"{m} {p} {k}" for m, p, k, _ in PERMANENT]
)
def test_a_fault_that_lasts_fails_in_bounded_time_with_one_line(
    hub, faults, folder, capsys, caplog, method, path, kind, expect
):
    repo_id, before = new_repo(), len(hub.state.requests)
    faults.add(method, path, kind, 100, status=500, seconds=10)
    _, error, seconds = run_push(hub, folder, repo_id)
    assert error.startswith(expect.format(url=hub.url)) and "\n" not in error
    assert requests_to(hub, before, method, path) == TRIES
    assert seconds < TRIES * TIMEOUT + 5
    if path == COMMIT:  # each try was checked: the branch never moved
        assert error.endswith("; tried 4 times, and main has not moved: nothing was pushed")
    if repo_id in hub.state.repos:
        assert len(history(hub, repo_id)) == 1
    assert_no_token(capsys, caplog, error)


def test_the_cli_prints_a_lasting_503_as_one_line(hub, hub_env, faults, folder):
    env = {**hub_env, "CLIPSHIP_HUB_TIMEOUT": str(TIMEOUT)}
    faults.add("GET", WHOAMI, "status", 100, retry_after=0)
    repo_id = new_repo()
    command = [sys.executable, "-m", "clipship", "push", str(folder), "--repo-id", repo_id]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: the Hub at {hub.url} answered 503: injected fault: 503\n"
    assert repo_id not in hub.state.repos and ALICE not in result.stderr


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_refused(hub, folder, monkeypatch, value):
    from clipship.errors import ClipshipError

    monkeypatch.setenv("CLIPSHIP_HUB_TIMEOUT", value)
    before = len(hub.state.requests)
    with pytest.raises(ClipshipError) as refused:
        push(folder, new_repo(), token=ALICE, endpoint=hub.url)
    assert str(refused.value) == (
        f"CLIPSHIP_HUB_TIMEOUT={value!r}: not a number of seconds above 0"
    )
    assert len(hub.state.requests) == before


def test_retry_after_is_capped_for_our_tries_and_the_clients_own(hub, faults, folder, monkeypatch):
    monkeypatch.setattr(pushing, "RETRY_AFTER_CAP", 0)
    faults.add("GET", WHOAMI, "status", 1, retry_after=86400)
    faults.add("GET", TREE, "429", 1, retry_after=86400)  # huggingface_hub 2 retries it itself
    result, error, seconds = run_push(hub, folder, new_repo())
    assert error == "" and result.committed and seconds < 5 and not faults.pending()


def test_a_hub_that_answers_the_same_error_forever_is_left(hub, faults, folder):
    # huggingface_hub's create_repo asks again, with no end, on this one answer
    busy = "Cannot create repo: another conflicting operation is in progress"
    faults.add("POST", CREATE, "status", 10**6, status=409, message=busy)
    _, error, seconds = run_push(hub, folder, new_repo())
    assert error == (
        f"the Hub at {hub.url} answered 409 to POST /api/repos/create 13 times; giving up"
    )
    assert seconds < 5


def test_the_client_factory_and_logging_are_restored(hub, faults, folder):
    factory, level = _http._GLOBAL_CLIENT_FACTORY, logging.getLogger("huggingface_hub").level
    assert run_push(hub, folder, new_repo())[1] == ""
    faults.add("GET", WHOAMI, "status", 100, status=500)
    assert run_push(hub, folder, new_repo())[1] != ""
    assert _http._GLOBAL_CLIENT_FACTORY is factory
    assert logging.getLogger("huggingface_hub").level == level


# --- the folder -------------------------------------------------------------------------------


def with_secret_beside(folder: Path) -> Path:
    """``folder``/sub holds weights.bin; a folder outside holds files of the same names."""
    (folder / "sub/weights.bin").write_bytes(b"the real weights")
    secret = folder.parent / "secret"
    secret.mkdir()
    for name in ("weights.bin", "notes.txt"):
        (secret / name).write_bytes(b"SECRET " + name.encode())
    return secret


def swap_sub_for_a_link(folder: Path, secret: Path) -> None:
    (folder / "sub").rename(folder / "moved")
    (folder / "sub").symlink_to(secret, target_is_directory=True)


@pytest.mark.parametrize("when", ["after the walk", "before the upload"])
def test_a_sub_folder_swapped_for_a_link_mid_push_uploads_nothing_from_outside(
    hub, folder, monkeypatch, when
):
    secret = with_secret_beside(folder)
    original = files_of(folder)
    name = {"after the walk": "check_publishable", "before the upload": "open_checked"}[when]
    real, swapped = getattr(pushing, name), []

    def swap_then(*args):
        if not swapped:
            swap_sub_for_a_link(folder, secret)
            swapped.append(True)
        return real(*args)

    monkeypatch.setattr(pushing, name, swap_then)
    repo_id = new_repo()
    result, error, _ = run_push(hub, folder, repo_id)
    assert swapped and error == "" and result.committed
    landed = history(hub, repo_id)[0].files
    assert {k: v for k, v in landed.items() if k != ".gitattributes"} == original
    for repo in hub.state.repos.values():
        for commit in repo.commits.values():
            assert not any(b"SECRET" in data for data in commit.files.values())


def test_a_link_swapped_in_on_the_way_to_a_followed_link_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "release"
    (folder / "inner/deep").mkdir(parents=True)
    (folder / "inner/deep/file.txt").write_text("inside")
    (folder / "shortcut.txt").symlink_to(folder / "inner/deep/file.txt")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "file.txt").write_text("SECRET")
    resolve = Path.resolve

    def resolve_then_swap(self, strict=False):
        real = resolve(self, strict=strict)
        if self.name == "shortcut.txt":  # checked: now make a folder on its way a link out
            (folder / "inner/deep").rename(folder / "inner/old")
            (folder / "inner/deep").symlink_to(secret, target_is_directory=True)
        return real

    monkeypatch.setattr(Path, "resolve", resolve_then_swap)
    with pytest.raises(PushError) as refused:
        release_files(folder)
    assert str(refused.value) == (
        "shortcut.txt: changed while pushing (a link or a missing name on its way); "
        "nothing was pushed"
    )


def test_a_file_swapped_for_a_link_before_the_upload_stops_the_push(hub, folder, monkeypatch):
    (folder.parent / "secret.txt").write_text("SECRET")
    real = pushing.check_publishable

    def check_then_swap(files):
        real(files)
        (folder / "config.json").unlink()
        (folder / "config.json").symlink_to(folder.parent / "secret.txt")

    monkeypatch.setattr(pushing, "check_publishable", check_then_swap)
    repo_id = new_repo()
    _, error, _ = run_push(hub, folder, repo_id)
    assert error == "config.json: changed while pushing; nothing was pushed"
    assert len(history(hub, repo_id)) == 1


def test_links_that_loop_through_folders_end(tmp_path):
    folder = tmp_path / "release"
    (folder / "a/b").mkdir(parents=True)
    (folder / "a/b/up").symlink_to(folder / "a")
    (folder / "a/b/top").symlink_to(folder)
    (folder / "a/b/w.txt").write_text("w")
    (folder / "twin").symlink_to(folder / "a")
    with release_files(folder) as files:
        assert [f.path for f in files] == ["a/b/w.txt", "twin/b/w.txt"]


def open_descriptors_under(path: Path) -> list[str]:
    root, found = str(path.resolve()), []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_descriptors_are_closed_on_every_path(hub, faults, folder, tmp_path):
    assert run_push(hub, folder, new_repo())[1] == ""
    push(folder, new_repo(), dry_run=True)
    faults.add("GET", WHOAMI, "status", 100, status=500)
    assert run_push(hub, folder, new_repo())[1] != ""
    faults.clear()
    (folder / "bad.json").write_text('{"x": NaN}')
    assert "bad.json" in run_push(hub, folder, new_repo())[1]
    (folder / "bad.json").unlink()
    (folder / "sub/zz.txt").symlink_to(tmp_path)  # refused mid-walk, with files open
    assert "a link to outside" in run_push(hub, folder, new_repo())[1]
    assert open_descriptors_under(tmp_path) == []


OPEN_FILES = """
import resource, sys
from clipship.cards.push import release_files
from clipship.errors import PushError
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64 if sys.argv[2] == "fixed" else hard))
try:
    with release_files(sys.argv[1]) as files:
        print(len(files), resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 64)
except PushError as e:
    print(f"error: {e}")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX limits")
@pytest.mark.parametrize("limit", ["fixed", "can grow"])
def test_a_folder_with_more_files_than_may_be_open(tmp_path, limit):
    import resource

    if limit == "can grow" and resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024:
        pytest.skip("the hard limit leaves no room to grow")
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(200):
        (folder / f"{i:03}.txt").write_text(str(i))
    script = textwrap.dedent(OPEN_FILES)
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), limit],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "error: many: holds more files than this process may keep open at once (limit 64, with "
        "64 left for the network); raise it (`ulimit -n`) or push fewer files\n"
        if limit == "fixed"
        else "200 True\n"
    )


# --- what may be published --------------------------------------------------------------------


def big_tensor_with_nan_at_the_end() -> dict[str, torch.Tensor]:
    big = torch.zeros(3 << 20)  # 12 MiB: read in several chunks
    big[-1] = float("nan")
    return {"a_fine": torch.ones(3), "big": big}


def tensor_with(dtype: torch.dtype, value: float) -> dict[str, torch.Tensor]:
    return {"ok": torch.ones(2), "bad": torch.tensor([0.5, value]).to(dtype)}


NOT_FINITE = [
    ("model.safetensors", big_tensor_with_nan_at_the_end(), "tensor 'big' holds NaN or infinity"),
    ("f64.safetensors", tensor_with(torch.float64, float("nan")), "tensor 'bad' holds NaN"),
    ("f16.safetensors", tensor_with(torch.float16, float("-inf")), "tensor 'bad' holds NaN"),
    ("bf16.safetensors", tensor_with(torch.bfloat16, float("inf")), "tensor 'bad' holds NaN"),
    ("e4m3.safetensors", tensor_with(torch.float8_e4m3fn, float("nan")), "tensor 'bad' holds"),
    ("e5m2.safetensors", tensor_with(torch.float8_e5m2, float("inf")), "tensor 'bad' holds"),
    ("config.json", '{"a": {"b": [1, NaN]}}', "a.b[1] is nan, not a finite number"),
    ("config.json", '{"eps": -Infinity}', "eps is -inf, not a finite number"),
    ("x.json", '{"big": 1e999}', "big is inf, not a finite number"),
    ("x.json", '[{"odd key": Infinity}]', "[0].odd key is inf, not a finite number"),
    ("x.json", "NaN", "the value is nan, not a finite number"),
    ("x.json", '{"a": 1,}', "not valid JSON (Expecting property name enclosed in double quotes)"),
    ("bad.safetensors", b"\xff" * 16, "not a valid safetensors file (corrupt header length)"),
]


@pytest.mark.parametrize(
    "name, content, expect", NOT_FINITE, ids=[f"{n}: {e}" for n, _, e in NOT_FINITE]
)
def test_non_finite_files_are_refused_before_any_request(hub, folder, name, content, expect):
    if isinstance(content, dict):
        save_file(content, str(folder / "sub" / name))
    else:
        (folder / "sub" / name).write_bytes(
            content if isinstance(content, bytes) else content.encode()
        )
    before, repo_id = len(hub.state.requests), new_repo()
    for dry_run in (False, True):
        _, error, _ = run_push(hub, folder, repo_id, dry_run=dry_run)
        assert error.startswith(f"sub/{name}: {expect}") and "\n" not in error
        assert error.endswith("; refusing to publish it")
    assert len(hub.state.requests) == before  # the Hub was never asked anything


def test_values_that_only_look_non_finite_are_published(hub, folder):
    bits = torch.tensor([0x7FC00000, 0x7F800000], dtype=torch.int32)  # NaN's and inf's bits
    save_file({"bits": bits, "mask": torch.tensor([True])}, str(folder / "ints.safetensors"))
    (folder / "words.json").write_text('{"value": "NaN", "NaN": 1.5e308}')
    result = push(folder, new_repo(), dry_run=True)
    assert {"ints.safetensors", "words.json"} <= {f["path"] for f in result.files}
