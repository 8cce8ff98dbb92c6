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
