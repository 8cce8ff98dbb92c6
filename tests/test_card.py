"""`clipship card`: a model card the Hub's own parser reads back, with the eval results."""

import json
import shutil

from huggingface_hub import ModelCard, metadata_load
from typer.testing import CliRunner

from clipship.cli import app

from .conftest import FIXTURE, TASKS

runner = CliRunner()


def merged(tmp_path):
    args = [
        "merge",
        "--pretrained",
        str(FIXTURE / "pretrained"),
        "--method",
        "ties",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ]
    args += [a for t in TASKS for a in ("--model", f"{t}={FIXTURE / t}")]
    assert runner.invoke(app, args).exit_code == 0
    return tmp_path / "run"


def test_card_round_trips_with_eval_results(tmp_path):
    run = merged(tmp_path)
    # The report says which hub test set each task was evaluated on (None: local data).
    report = {
        "mnist": {"accuracy": 0.91, "loss": 0.3, "dataset": "ylecun/mnist"},
        "svhn": {"accuracy": 0.5, "loss": 1.2, "dataset": "ufldl-stanford/svhn"},
        "digits": {"accuracy": 0.7, "loss": 1.0, "dataset": None},
        "average": {"accuracy": 0.705, "loss": 0.75},
        "model_info": {},
    }
    (run / "eval_report.json").write_text(json.dumps(report))
    (run / "export").mkdir()
    (run / "export/export_report.json").write_text(
        json.dumps(
            {
                "variants": {
                    "fp32": {
                        "mnist": {"max_abs_logit_diff": 1e-5, "top1_agreement": 1.0, "images": 8},
                        "batch_1_7_vs_32_max_diff": 0.0,
                    }
                }
            }
        )
    )
    base = ["--base-model", "openai/clip-vit-base-patch32"]  # merged from a local copy of it
    result = runner.invoke(
        app, ["card", str(run), "--license", "mit", "--name", "tiny-ties", *base]
    )
    assert result.exit_code == 0, result.output
    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.base_model_relation == "merge" and {
        "clip",
        "model-merging",
        "ties",
        "clipship",
    } <= set(card.data.tags)
    assert set(card.data.datasets) == {"ylecun/mnist", "ufldl-stanford/svhn"}
    results = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert results == {"mnist": 91.0, "svhn": 50.0, "digits": 70.0}
    # A local test set is named by its task, never as a hub dataset it was not.
    types = {r.dataset_name: r.dataset_type for r in card.data.eval_results}
    assert types == {"mnist": "ylecun/mnist", "svhn": "ufldl-stanford/svhn", "digits": "digits"}
    meta = metadata_load(run / "README.md")
    assert meta["model-index"][0]["results"][0]["metrics"][0]["type"] == "accuracy"
    assert "## Export validation" in card.text and "| task_a |" in card.text
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_card_without_reports_and_license_rules(tmp_path):
    run = merged(tmp_path)
    result = runner.invoke(app, ["card", str(run)])
    assert result.exit_code == 1 and "pass --license" in result.stderr
    assert runner.invoke(app, ["card", str(run), "--license", "apache-2.0"]).exit_code == 0
    card = ModelCard.load(run / "README.md")
    assert card.data.eval_results is None and "Zero-shot accuracy" not in card.text
    # A local pretrained model and no --base-model: no base_model field, and no local paths.
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert str(FIXTURE) not in (run / "README.md").read_text()
    assert "local folder `pretrained`" in card.text
    assert not (run / "accuracy.png").exists()
    # The merge reads the base model's license from its card into the recipe; the card uses it.
    base = tmp_path / "base"
    shutil.copytree(FIXTURE / "pretrained", base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    licensed = tmp_path / "licensed"
    args = ["merge", "--pretrained", str(base), "--model", f"task_a={FIXTURE / 'task_a'}"]
    assert (
        runner.invoke(
            app, [*args, "--method", "task_arithmetic", "--out", str(licensed), "--quiet"]
        ).exit_code
        == 0
    )
    assert (
        json.loads((licensed / "clipship_recipe.json").read_text())["pretrained"]["license"]
        == "mit"
    )
    assert runner.invoke(app, ["card", str(licensed)]).exit_code == 0
    assert ModelCard.load(licensed / "README.md").data.license == "mit"
