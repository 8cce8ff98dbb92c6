"""`make demo` end to end, offline, on the smoke budget: build → merge → evaluate → table."""

from typer.testing import CliRunner

from clipship.cli import app


def test_demo_prints_the_table_and_writes_a_loadable_merge(tmp_path, smoke_minibench):
    env = {"CLIPSHIP_CACHE": str(smoke_minibench[1])}
    result = CliRunner().invoke(
        app, ["demo", "--budget", "smoke", "--out", str(tmp_path / "demo")], env=env
    )
    assert result.exit_code == 0, result.output
    assert "| Pretrained |" in result.stdout and "| ties |" in result.stdout
    from transformers import CLIPModel

    CLIPModel.from_pretrained(tmp_path / "demo/merged/ties")
    again = CliRunner().invoke(
        app, ["demo", "--budget", "smoke", "--out", str(tmp_path / "demo")], env=env
    )
    assert again.exit_code == 1 and "already exists" in again.stderr
