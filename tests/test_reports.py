"""The typed eval report: today's file layout in and out, and one clear line for a bad file."""

import json

import pytest

from clipship.errors import ClipshipError
from clipship.reports import EvalReport, read_eval_reports

ROW = {
    "accuracy": 0.75,
    "loss": 0.61,
    "loss_batch_mean": 0.6,
    "samples": 4,
    "skipped": [2],
    "dataset": "tanganke/mnist",
    "images_per_second": 120.5,
}
SINGLE = {
    "mnist": ROW,
    "svhn": {**ROW, "accuracy": 0.5, "dataset": None},
    "average": {"accuracy": 0.625, "loss": 0.61},
    "model_info": {"trainable_params": 10, "all_params": 10, "trainable_percentage": 1.0},
}


def test_round_trip_keeps_the_file_layout():
    report = EvalReport.from_json(json.loads(json.dumps(SINGLE)))
    assert report.accuracies() == {"mnist": 0.75, "svhn": 0.5}
    assert report.datasets() == {"mnist": "tanganke/mnist", "svhn": None}
    assert report.tasks["mnist"].fields["skipped"] == [2]
    assert report.to_json() == SINGLE
    assert EvalReport.from_json(report.to_json()) == report


def test_every_eval_file_layout_reads_as_labelled_reports():
    assert set(read_eval_reports(SINGLE)) == {"merged"}
    pool = {"_pretrained_": SINGLE, "mnist": SINGLE}
    assert set(read_eval_reports(pool)) == {"_pretrained_", "mnist"}
    release = {"pretrained": SINGLE, "merged": SINGLE, "individual": {"mnist": ROW}}
    reports = read_eval_reports(release)
    assert reports["individual"].average is None
    assert reports["individual"].accuracies() == {"mnist": 0.75}


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "not an eval report"),
        ({"mnist": {"loss": 1.0}, "average": {}}, "mnist has no accuracy"),
        ({"mnist": {"accuracy": True}, "average": {}}, "mnist has no accuracy"),
        ({"mnist": {"accuracy": 1.5}, "average": {}}, "not a finite accuracy"),
        ({"mnist": {"accuracy": float("nan")}, "average": {}}, "not a finite accuracy"),
        ({"merged": {"mnist": ROW}}, "not an eval report"),
    ],
)
def test_a_bad_report_is_one_line_naming_the_file(data, message):
    with pytest.raises(ClipshipError, match=message) as caught:
        read_eval_reports(data, "run/eval_report.json")
    assert str(caught.value).startswith("run/eval_report.json: ")


def test_export_report_summary_and_round_trip():
    from clipship.reports import ExportReport

    row = {"max_abs_logit_diff": 1e-5, "top1_agreement": 1.0, "disagreements": 0, "images": 8}
    data = {
        "format": "x",
        "variants": {
            "fp32": {"mnist": row, "svhn": {**row, "max_abs_logit_diff": 3e-5}, "file": "a"},
            "int8": {"mnist": {**row, "top1_agreement": 0.75, "disagreements": 2}},
        },
    }
    report = ExportReport.from_json(json.loads(json.dumps(data)))
    assert report.to_json() == data
    assert set(report.task_rows("fp32")) == {"mnist", "svhn"}
    summary = report.summary()
    assert summary["fp32"] == {
        "max_abs_logit_diff": 3e-5,
        "min_top1_agreement": 1.0,
        "disagreements": 0,
        "images": 16,
    }
    assert summary["int8"]["min_top1_agreement"] == 0.75 and summary["int8"]["disagreements"] == 2
    with pytest.raises(ClipshipError, match="not an export report"):
        ExportReport.from_json({"variants": []})


def test_push_result_round_trip_and_dry_run_layout():
    from clipship.cards.push import PushResult

    files = [{"path": "model.safetensors", "size": 10}]
    dry = PushResult("alice/m", "https://hub", "main", files, 10, dry_run=True)
    assert set(dry.to_json()) == {"repo_id", "endpoint", "revision", "files", "bytes", "dry_run"}
    pushed = PushResult(
        "alice/m", "https://hub", "main", files, 10, False, True, ["model.safetensors"], [],
        "a" * 40, "v1", "https://hub/alice/m",
    )  # fmt: skip
    data = json.loads(json.dumps(pushed.to_json()))
    assert data["committed"] and data["commit"] == "a" * 40 and data["tag"] == "v1"
    assert PushResult.from_json(data) == pushed


def test_closed_choices_are_str_enums_that_read_and_write_as_their_value():
    from clipship.exporter.onnx_export import FILES, Variant
    from clipship.requests import choice
    from clipship.runtime.model import PRECISIONS, Precision

    assert choice(Precision, "bf16", "precision") is Precision.BF16
    assert f"{Precision.BF16}" == str(Precision.BF16) == "bf16" == Precision.BF16
    assert json.dumps({"p": Precision.FP16}) == '{"p": "fp16"}'
    assert PRECISIONS["fp32"] is PRECISIONS[Precision.FP32]
    assert FILES["int8"] == FILES[Variant.INT8] == "model_int8.onnx"
    with pytest.raises(ClipshipError, match=r"`precision` fp8: choose fp32, fp16 or bf16") as error:
        choice(Precision, "fp8", "precision")
    assert error.value.option == "precision"


def test_library_errors_name_the_parameter_and_the_cli_names_the_flag(tmp_path):
    """A Python caller reads the parameter's name; the CLI writes the command's own flag, and
    leaves a name that is not one of its flags as it is."""
    from typer.testing import CliRunner

    from clipship.cli import app
    from clipship.eval.evaluate import check_options

    with pytest.raises(ClipshipError, match="`batch_size` 0: must be positive"):
        check_options("fp32", 0, None, None)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "m", "--tasks", "mnist", "--batch-size", "0"])
    assert result.exit_code == 1 and result.stderr == "error: --batch-size 0: must be positive\n"
    result = runner.invoke(app, ["eval", "m", "--tasks", "mnist", "--precision", "fp8"])
    assert result.stderr == "error: --precision fp8: choose fp32, fp16 or bf16\n"
    out = tmp_path / "taken"
    out.mkdir()
    result = runner.invoke(app, ["minibench", "build", "--out", str(out), "--budget", "tiny"])
    assert result.stderr == "error: --budget tiny: choose smoke or full\n"
