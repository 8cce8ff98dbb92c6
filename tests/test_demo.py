"""`make demo` end to end (offline): seeded pool → TIES merge → a CLIPModel that loads."""

from typer.testing import CliRunner

from clipship.cli import app

from .conftest import load_weights


def test_demo_runs_offline_and_is_deterministic(tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["demo", "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert (
        "loaded with CLIPModel" in first.stdout and str(tmp_path / "a" / "merged") in first.stdout
    )
    assert runner.invoke(app, ["demo", "--out", str(tmp_path / "a")]).exit_code == 1  # exists
    assert runner.invoke(app, ["demo", "--out", str(tmp_path / "b")]).exit_code == 0
    for part in ("pool/task_c", "merged"):
        assert (tmp_path / "a" / part / "model.safetensors").read_bytes() == (
            tmp_path / "b" / part / "model.safetensors"
        ).read_bytes()
    assert len(load_weights(tmp_path / "a/merged")) > 71  # vision and text towers
