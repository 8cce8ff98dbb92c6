"""`clipship push` against a local Hub API server with the unmodified huggingface_hub client."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download
from typer.testing import CliRunner

from clipship.cli import app

from .conftest import FIXTURE, HUB_TOKENS, TASKS

runner = CliRunner()
ALICE, BOB = list(HUB_TOKENS)


def clipship(*args: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "clipship", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("release") / "run"
    args = ["merge", "--pretrained", str(FIXTURE / "pretrained"), "--method", "task_arithmetic"]
    args += [a for t in TASKS for a in ("--model", f"{t}={FIXTURE / t}")]
    assert runner.invoke(app, [*args, "--out", str(run), "--quiet"]).exit_code == 0
    assert runner.invoke(app, ["card", str(run), "--license", "mit"]).exit_code == 0
    return run


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(".")
    }


def test_push_uploads_one_commit_then_nothing_and_downloads_identically(
    hub, hub_env, release, tmp_path
):
    from transformers import CLIPModel

    first = clipship("push", str(release), "--repo-id", "alice/ta", "--tag", "v1", env=hub_env)
    assert first.returncode == 0, first.stderr
    assert "pushed" in first.stdout and "tag v1" in first.stdout
    second = clipship("push", str(release), "--repo-id", "alice/ta", "--json", env=hub_env)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["committed"] is False and summary["uploaded"] == []

    api = HfApi(endpoint=hub.url, token=ALICE)
    commits = api.list_repo_commits("alice/ta")
    assert len(commits) == 2 and commits[0].title.startswith("clipship: task_arithmetic merge")
    refs = api.list_repo_refs("alice/ta")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": commits[0].commit_id}

    folder = Path(
        snapshot_download("alice/ta", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "dl")
    )
    downloaded = files_under(folder)
    downloaded.pop(".gitattributes", None)
    assert downloaded == files_under(release)
    model = CLIPModel.from_pretrained(folder)
    assert model.config.projection_dim > 0
    assert api.model_info("alice/ta").card_data.license == "mit"


def test_changed_file_makes_one_commit_with_only_that_file(hub, hub_env, release, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name, data in files_under(release).items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    assert clipship("push", str(run), "--repo-id", "alice/edit", env=hub_env).returncode == 0
    (run / "notes.txt").write_text("second version\n")
    result = clipship("push", str(run), "--repo-id", "alice/edit", "--json", env=hub_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["uploaded"] == ["notes.txt"]
    assert len(HfApi(endpoint=hub.url, token=ALICE).list_repo_commits("alice/edit")) == 3


def test_branch_private_and_dry_run(hub, hub_env, release):
    before = len(hub.state.requests)
    dry = clipship(
        "push", str(release), "--repo-id", "alice/p", "--dry-run", env={**hub_env, "HF_TOKEN": ""}
    )
    assert dry.returncode == 0 and "model.safetensors" in dry.stdout and "total" in dry.stdout
    assert len(hub.state.requests) == before  # talked to no server, needed no token

    result = clipship(
        "push", str(release), "--repo-id", "alice/p", "--private", "--revision", "rc", env=hub_env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("/alice/p/tree/rc")
    owner = HfApi(endpoint=hub.url, token=ALICE)
    assert owner.model_info("alice/p").private
    assert {b.name for b in owner.list_repo_refs("alice/p").branches} == {"main", "rc"}
    assert "model.safetensors" in owner.list_repo_files("alice/p", revision="rc")
    assert "model.safetensors" not in owner.list_repo_files("alice/p")  # main untouched
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("alice/p")  # invisible to anonymous


@pytest.mark.parametrize(
    "case, expect",
    [
        ("wrong-token", "rejected the token (401"),
        ("not-owner", "not allowed to write to alice/ta"),
        ("no-token", "no Hugging Face token"),
        ("network-down", "cannot reach the Hub at http://127.0.0.1:9"),
    ],
)
def test_push_errors_are_one_line_and_never_show_the_token(
    hub, hub_env, release, tmp_path, case, expect
):
    env = dict(hub_env)
    if case == "wrong-token":
        env["HF_TOKEN"] = "hf_wrong_secret_token_789"
    elif case == "not-owner":
        env["HF_TOKEN"] = BOB
    elif case == "no-token":
        env.pop("HF_TOKEN")
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    api = HfApi(endpoint=hub.url, token=ALICE)
    before = api.list_repo_commits("alice/ta") if api.repo_exists("alice/ta") else []
    result = clipship("push", str(release), "--repo-id", "alice/ta", env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
    token = env.get("HF_TOKEN", "")
    if token:
        assert token not in result.stdout + result.stderr
        for path in [*release.rglob("*"), *Path(env["HF_HOME"]).rglob("*")]:
            assert not path.is_file() or token.encode() not in path.read_bytes()
    after = api.list_repo_commits("alice/ta") if api.repo_exists("alice/ta") else []
    assert len(after) == len(before)  # nothing reached the Hub


def test_token_from_option_is_not_written_or_printed(hub, hub_env, release):
    env = {k: v for k, v in hub_env.items() if k != "HF_TOKEN"}
    result = clipship(
        "push", str(release), "--repo-id", "alice/opt", "--token", ALICE, "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    assert ALICE not in result.stdout + result.stderr
    home = Path(env["HF_HOME"])
    for path in [*release.rglob("*"), *(home.rglob("*") if home.exists() else [])]:
        assert not path.is_file() or ALICE.encode() not in path.read_bytes()
    assert os.environ.get("HF_TOKEN") != ALICE


def test_token_from_the_saved_login(hub, hub_env, release):
    env = {k: v for k, v in hub_env.items() if k != "HF_TOKEN"}
    Path(env["HF_HOME"]).mkdir(parents=True, exist_ok=True)
    (Path(env["HF_HOME"]) / "token").write_text(ALICE)  # what `hf auth login` saves
    result = clipship("push", str(release), "--repo-id", "alice/saved", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["committed"] and ALICE not in result.stdout + result.stderr


def copy_of(release: Path, target: Path) -> Path:
    for name, data in files_under(release).items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    return target


def test_prune_and_tags_that_would_move(hub, hub_env, release, tmp_path):
    api = HfApi(endpoint=hub.url, token=ALICE)
    run = copy_of(release, tmp_path / "run")
    (run / "old_variant.onnx").write_bytes(b"stale")
    assert clipship("push", str(run), "--repo-id", "alice/prune", env=hub_env).returncode == 0
    (run / "old_variant.onnx").unlink()
    kept = clipship("push", str(run), "--repo-id", "alice/prune", "--json", env=hub_env)
    assert json.loads(kept.stdout)["committed"] is False  # without --prune nothing is deleted
    pruned = clipship(
        "push", str(run), "--repo-id", "alice/prune", "--prune", "--json", env=hub_env
    )
    assert json.loads(pruned.stdout)["deleted"] == ["old_variant.onnx"]
    assert "old_variant.onnx" not in api.list_repo_files("alice/prune")

    tagged = clipship("push", str(run), "--repo-id", "alice/prune", "--tag", "v1", env=hub_env)
    assert tagged.returncode == 0, tagged.stderr  # nothing changed: the tag goes on the head
    commits = len(api.list_repo_commits("alice/prune"))
    (run / "README.md").write_text("changed\n")
    moved = clipship("push", str(run), "--repo-id", "alice/prune", "--tag", "v1", env=hub_env)
    assert moved.returncode == 1 and "tag v1 already exists" in moved.stderr
    assert len(api.list_repo_commits("alice/prune")) == commits  # refused before committing


def test_private_never_republishes_an_existing_public_repo(hub, hub_env, release):
    assert clipship("push", str(release), "--repo-id", "alice/pub", env=hub_env).returncode == 0
    result = clipship("push", str(release), "--repo-id", "alice/pub", "--private", env=hub_env)
    assert result.returncode == 1 and "already exists and is public" in result.stderr


def test_symlinked_files_are_pushed_like_a_hub_snapshot(tmp_path):
    from clipship.cards.push import release_files

    repo = tmp_path / "hub/models--alice--ta"
    blobs, folder = repo / "blobs", repo / "snapshots/0123abc"
    blobs.mkdir(parents=True)
    folder.mkdir(parents=True)
    (blobs / "abc").write_bytes(b"weights")
    (folder / "model.safetensors").symlink_to(blobs / "abc")
    (folder / "config.json").write_text("{}")
    (folder / ".hidden").write_text("x")
    (folder / "sub").mkdir()
    (folder / "sub/card.md").write_text("card")
    (folder / "same.json").symlink_to(folder / "config.json")  # inside the folder: fine
    (folder / "again").symlink_to(folder / "sub")
    (folder / "sub/loop").symlink_to(folder)  # a cycle is walked once
    files = {f.path: f.size for f in release_files(folder)}
    assert files == {
        "again/card.md": 4,
        "config.json": 2,
        "model.safetensors": 7,
        "same.json": 2,
        "sub/card.md": 4,
    }


@pytest.mark.parametrize("kind", ["file", "folder", "blobs of another folder", "broken"])
def test_links_out_of_the_folder_are_refused_in_a_push_and_a_dry_run(
    hub, hub_env, release, tmp_path, kind
):
    import shutil

    folder = tmp_path / "release"
    shutil.copytree(release, folder)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0")
    (tmp_path / "blobs").mkdir()  # not a hub cache: the folder is not a snapshot
    (tmp_path / "blobs/abc").write_text("root:x:0:0")
    target = {
        "file": secret / "passwd",
        "folder": secret,
        "blobs of another folder": tmp_path / "blobs/abc",
        "broken": folder / "missing",  # inside, but nothing there
    }[kind]
    (folder / "nested").mkdir()
    (folder / "nested/passwd.txt").symlink_to(target)
    expect = "a broken link" if kind == "broken" else "a link to outside the folder"
    api = HfApi(endpoint=hub.url, token=ALICE)
    for extra in ([], ["--dry-run"]):
        result = clipship("push", str(folder), "--repo-id", "alice/leak", *extra, env=hub_env)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == f"error: nested/passwd.txt: {expect}" + (
            "; refusing to upload it\n" if kind != "broken" else "; refusing to push the folder\n"
        )
        assert str(tmp_path) not in result.stderr
    assert not api.repo_exists("alice/leak")  # no request changed the Hub


def test_endpoint_credentials_and_short_tokens_are_masked(hub_env, release):
    env = {**hub_env, "HF_TOKEN": "x"}
    endpoint = "http://someone:hunter2@127.0.0.1:9"
    result = clipship(
        "push", str(release), "--repo-id", "alice/ta", "--endpoint", endpoint, env=env
    )
    assert result.returncode == 1
    assert "hunter2" not in result.stderr and "someone" not in result.stderr
    assert "http://***@127.0.0.1:9" in result.stderr
    # The token "x" is masked where it stands alone, not inside other words.
    from clipship.cards.push import _Hub

    hub = _Hub("http://127.0.0.1:9", "alice/ta")
    hub.token = "x"
    assert hub._mask("got x from box, token=x") == "got *** from box, token=***"
    dry = clipship(
        "push",
        str(release),
        "--repo-id",
        "a/b",
        "--endpoint",
        endpoint,
        "--dry-run",
        "--json",
        env=env,
    )
    assert json.loads(dry.stdout)["endpoint"] == "http://***@127.0.0.1:9"


def test_links_into_blobs_only_from_a_real_hub_snapshot_and_never_to_hidden_files(tmp_path):
    from clipship.cards.push import release_files
    from clipship.errors import PushError

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("key")
    # "blobs" that is a link to elsewhere, beside a folder that looks like a snapshot
    fake = tmp_path / "models--evil--x"
    (fake / "snapshots/rev").mkdir(parents=True)
    (fake / "blobs").symlink_to(secret)
    (fake / "snapshots/rev/model.bin").symlink_to(fake / "blobs/id_rsa")
    with pytest.raises(PushError, match="model.bin: a link to outside the folder"):
        release_files(fake / "snapshots/rev")
    # a real snapshot reached through a link is still a snapshot
    repo = tmp_path / "hub/models--alice--ta"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots/abc").mkdir(parents=True)
    (repo / "blobs/123").write_bytes(b"weights")
    (repo / "snapshots/abc/model.safetensors").symlink_to(repo / "blobs/123")
    (tmp_path / "latest").symlink_to(repo / "snapshots/abc")
    assert [f.path for f in release_files(tmp_path / "latest")] == ["model.safetensors"]
    # a visible name for a hidden file
    folder = tmp_path / "release"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git/config").write_text("[remote] url = https://user:pw@host")
    (folder / "config.txt").symlink_to(folder / ".git/config")
    with pytest.raises(PushError, match="config.txt: a link to a hidden file"):
        release_files(folder)
    (folder / "config.txt").unlink()
    (folder / "loop").symlink_to(folder / "loop")
    with pytest.raises(PushError, match="loop: a link that cannot be resolved"):
        release_files(folder)


def test_a_file_swapped_after_the_check_is_not_uploaded(tmp_path):
    from clipship.cards.push import open_checked, release_files
    from clipship.errors import PushError

    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights")
    (tmp_path / "secret").write_text("key")
    [checked] = release_files(folder)
    with open_checked(checked) as handle:
        assert handle.read() == b"weights"
    (folder / "model.bin").unlink()
    (folder / "model.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(PushError, match="model.bin: changed while pushing"):
        open_checked(checked)


def test_masking_covers_passwords_with_at_signs_query_tokens_and_encoded_text():
    from clipship.cards.push import _Hub, public_url

    assert public_url("http://me:p@ss@host:1/x") == "http://***@host:1/x"
    assert public_url("https://host/api?token=abc123&x=1") == "https://host/api?token=***&x=1"
    hub = _Hub("http://host", "a/b")
    hub.token = "hf_abcdefgh12345678"
    assert hub._mask("Bearer%20hf_abcdefgh12345678 sent") == "Bearer%20*** sent"


def test_a_hub_cache_snapshot_pushes(hub, hub_env, release, tmp_path):
    """A folder of links into its repo's blobs/ (what snapshot_download leaves) uploads the
    files the links point to, under the links' names."""
    repo = tmp_path / "hub/models--alice--ta"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots/0123abc"
    snapshot.mkdir(parents=True)
    for file in release.iterdir():
        if file.is_file():
            (repo / "blobs" / file.name).write_bytes(file.read_bytes())
            (snapshot / file.name).symlink_to(repo / "blobs" / file.name)
    result = clipship("push", str(snapshot), "--repo-id", "alice/from-cache", env=hub_env)
    assert result.returncode == 0, result.stderr
    folder = Path(
        snapshot_download(
            "alice/from-cache", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "dl"
        )
    )
    assert files_under(folder) == {
        k: v for k, v in files_under(release).items() if (release / k).parent == release
    }
