"""The command line's flags: each option's type, names and help text, named once here and
used by the commands in ``clipship.cli`` (some are shared by several commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer import Option as Opt

Pool = Annotated[Path | None, Opt("--pool", help="FusionBench modelpool YAML file.")]
Pretrained = Annotated[
    str | None, Opt("--pretrained", help="Pretrained CLIP: hub id[@revision] or folder.")
]
Model = Annotated[
    list[str] | None,
    Opt("--model", help="Task encoder as NAME=SOURCE (hub id[@revision] or folder); repeat."),
]
Pickle = Annotated[
    bool,
    Opt(
        "--allow-pickle", help="Load pytorch_model.bin checkpoints (torch.load weights_only=True)."
    ),
]
Force = Annotated[bool, Opt("--force", help="Replace an existing output atomically.")]
Quiet = Annotated[bool, Opt("--quiet", "-q", help="No progress bars or messages.")]
Json = Annotated[bool, Opt("--json", help="Print a machine-readable JSON summary.")]
Out = Annotated[Path, Opt("--out", help="Output folder (written atomically).")]
Device = Annotated[str, Opt("--device", help="cuda, cpu or auto.")]
Seed = Annotated[int, Opt("--seed")]
Tasks = Annotated[
    str | None,
    Opt(
        "--tasks",
        help="'all' (the eight tasks), 'tall14', 'tall20', or comma-separated task names "
        "(FusionBench's names and aliases).",
    ),
]
Taskpool = Annotated[Path | None, Opt("--taskpool", help="FusionBench taskpool YAML.")]
Custom = Annotated[
    list[str] | None, Opt("--task", help="Custom ImageFolder task NAME=PATH; repeat.")
]
Classnames = Annotated[
    Path | None, Opt("--classnames", help="Custom tasks: one class name per line.")
]
Taskfile = Annotated[
    Path | None, Opt("--taskfile", help="JSON task file (e.g. the mini-benchmark's).")
]
Templates = Annotated[
    Path | None, Opt("--templates", help="Custom tasks: one template per line, with {c}.")
]
DataDir = Annotated[Path | None, Opt("--data-dir", help="Local data: DIR/<task>.")]
Heads = Annotated[Path | None, Opt("--heads", help="Heads from `clipship heads`.")]
Budget = Annotated[
    str,
    Opt(
        "--budget",
        envvar="CLIPSHIP_MINIBENCH_BUDGET",
        help="smoke (tests, < 1 min) or full (demo).",
    ),
]

MainDebug = Annotated[bool, Opt("--debug", help="Show tracebacks for errors.")]
MergeMethod = Annotated[str | None, Opt("--method", help="Merge method (see `clipship methods`).")]
MergeLambda = Annotated[str | None, Opt("--lambda", help="Scaling factor λ (scaling_factor).")]
MergeThreshold = Annotated[str | None, Opt("--threshold", help="TIES/DARE-TIES: percent kept.")]
MergeParam = Annotated[
    list[str] | None, Opt("--param", help="Method parameter NAME=VALUE; repeat.")
]
MergeSeed = Annotated[int, Opt("--seed", help="Seed for random methods (DARE).")]
MergeVisionOnly = Annotated[bool, Opt("--vision-only", help="Write only the vision tower.")]
MergeRecipe = Annotated[Path | None, Opt("--recipe", help="Rerun a clipship_recipe.json.")]
MergeMaxShardSize = Annotated[str, Opt("--max-shard-size", help="Shard weights above this size.")]
MergeDevice = Annotated[
    str | None,
    Opt("--device", help="Where per-tensor and data-aware methods compute: cpu, cuda or auto."),
]
SimilarityOut = Annotated[Path, Opt("--out", help="Folder for the CSV and PNG.")]
SimilarityNoPlot = Annotated[bool, Opt("--no-plot", help="Skip the heatmap PNG.")]
InfoSources = Annotated[list[str] | None, typer.Argument(help="Model folders or hub ids.")]
HeadsModel = Annotated[str, typer.Argument(help="Pretrained CLIPModel folder or hub id.")]
HeadsNoCache = Annotated[bool, Opt("--no-cache", help="Rebuild even if cached.")]
EvalModel = Annotated[str | None, typer.Argument(help="Merged folder, task encoder or hub id.")]
EvalPrecision = Annotated[str, Opt("--precision", help="fp32, fp16 or bf16 (autocast).")]
EvalBatchSize = Annotated[int, Opt("--batch-size")]
EvalLimit = Annotated[int | None, Opt("--limit", help="First N test images per task.")]
EvalWorkers = Annotated[int | None, Opt("--workers", help="DataLoader workers.")]
EvalSkipBadImages = Annotated[bool, Opt("--skip-bad-images")]
EvalCorruption = Annotated[
    str | None,
    Opt(
        "--corruption",
        help="Also evaluate under corruptions: NAME[,NAME] or 'all' (contrast, gaussian_noise, "
        "impulse_noise, jpeg_compression, motion_blur, pixelate, spatter).",
    ),
]
MinibenchCorruptions = Annotated[
    str | None,
    Opt(
        "--corruptions",
        help="Also evaluate the pretrained and merged models under corruptions: NAME[,NAME] or "
        "'all' (robustness.png: methods × corruptions).",
    ),
]
EvalSeverity = Annotated[
    int | None, Opt("--severity", help="Corruption severity 1-5 for generated corruptions [3].")
]
EvalRouting = Annotated[
    str,
    Opt(
        "--routing",
        help="A mixture's routing: per_sample (each image on its own) or batch "
        "(FusionBench's evaluation: weights averaged over the batch).",
    ),
]
EvalOut = Annotated[Path | None, Opt("--out", help="Write the JSON report here.")]
FinetuneOut = Annotated[Path, Opt("--out", help="Output CLIPVisionModel folder.")]
FinetuneTasks = Annotated[str | None, Opt("--tasks", help="The built-in task to tune for.")]
FinetuneSteps = Annotated[int, Opt("--steps")]
FinetuneLr = Annotated[float, Opt("--lr")]
FinetuneWeightDecay = Annotated[float, Opt("--weight-decay")]
FinetunePrecision = Annotated[str, Opt("--precision", help="fp32, fp16 or bf16 (AMP).")]
FinetuneWorkers = Annotated[int, Opt("--workers", help="DataLoader workers.")]
FinetuneCheckpointEvery = Annotated[int, Opt("--checkpoint-every", help="Steps; 0 = never.")]
FinetuneResume = Annotated[bool, Opt("--resume", help="Continue from the last checkpoint.")]
ExportModel = Annotated[
    str, typer.Argument(help="Merged CLIPModel folder (or encoder + --pretrained).")
]
ExportHeadsDir = Annotated[Path, Opt("--heads", help="Heads from `clipship heads`.")]
ExportOut = Annotated[Path, Opt("--out", help="Export folder (written atomically).")]
ExportOnnx = Annotated[bool, Opt("--onnx", help="Write the ONNX graph (the format).")]
ExportTensorrt = Annotated[
    bool, Opt("--tensorrt", help="Also a TensorRT fp16 engine (needs a GPU).")
]
ExportMaxBatch = Annotated[int, Opt("--max-batch", help="TensorRT profile's largest batch.")]
ExportPrecision = Annotated[str, Opt("--precision", help="fp32,fp16,int8")]
ExportDataDir = Annotated[Path | None, Opt("--data-dir", help="DIR/<task> data.")]
ExportValidationData = Annotated[Path | None, Opt("--validation-data", help="Images or a dataset.")]
ExportValidationSize = Annotated[int, Opt("--validation-size", help="Validation images per task.")]
ExportInt8Scheme = Annotated[
    str,
    Opt(
        "--int8-scheme",
        help="auto (the fastest that passes the agreement gate: reduce_range, else u8u8), "
        "u8u8 or reduce_range (both exact on any CPU).",
    ),
]
ExportMaxLogitDiff = Annotated[float, Opt("--max-logit-diff", help="fp32 gate.")]
ExportMinAgreementFp16 = Annotated[float, Opt("--min-agreement-fp16")]
ExportMinAgreementInt8 = Annotated[float, Opt("--min-agreement-int8")]
PredictExportDir = Annotated[Path, typer.Argument(help="Folder written by `clipship export`.")]
PredictImages = Annotated[list[Path], typer.Argument(help="Image files.")]
PredictTask = Annotated[str | None, Opt("--task", help="Which exported task.")]
PredictTopK = Annotated[int, Opt("--top-k")]
PredictVariant = Annotated[str, Opt("--variant", help="fp32, fp16 or int8.")]
PredictProvider = Annotated[str, Opt("--provider", help="cpu, cuda, tensorrt.")]
CardRunDir = Annotated[Path, typer.Argument(help="Release folder (a merged model folder).")]
CardLicense = Annotated[str | None, Opt("--license", help="When the base's is unknown.")]
CardName = Annotated[str | None, Opt("--name", help="Model name in the card.")]
CardBaseModel = Annotated[
    str | None, Opt("--base-model", help="Hub id of a pretrained model merged from a local copy.")
]
CardForce = Annotated[bool, Opt("--force", help="Replace a README.md clipship did not write.")]
PushRepoId = Annotated[str, Opt("--repo-id", help="owner/name on the Hub.")]
PushRevision = Annotated[str | None, Opt("--revision", help="Branch (created if needed).")]
PushTag = Annotated[str | None, Opt("--tag", help="Tag the pushed commit.")]
PushPrivate = Annotated[bool, Opt("--private", help="Create the repo private.")]
PushMessage = Annotated[str | None, Opt("--message", help="Commit summary.")]
PushToken = Annotated[str | None, Opt("--token", help="Default: HF_TOKEN, then the saved login.")]
PushEndpoint = Annotated[
    str | None, Opt("--endpoint", help="Default: HF_ENDPOINT, then huggingface.co.")
]
PushDryRun = Annotated[
    bool, Opt("--dry-run", help="List what would be uploaded; contact no server.")
]
PushPrune = Annotated[
    bool, Opt("--prune", help="Also delete remote files the folder does not have.")
]
ReleaseConfig = Annotated[
    Path | None, typer.Argument(help="Release YAML (see examples/release.yaml).")
]
ReleaseSchema = Annotated[
    bool, Opt("--schema", help="Print the release file's JSON Schema and exit.")
]
ReleaseRunDir = Annotated[Path | None, Opt("--run-dir", help="Default: release_out/<name>.")]
ReleaseRepoId = Annotated[str | None, Opt("--repo-id", help="Override hub.repo_id.")]
ReleaseTag = Annotated[str | None, Opt("--tag", help="Override hub.tag.")]
ReleaseDryRun = Annotated[
    bool, Opt("--dry-run", help="Everything but the upload (lists it instead).")
]
ReleaseForce = Annotated[bool, Opt("--force", help="Use a --run-dir that holds other files.")]
MinibenchBuildOut = Annotated[
    Path | None, Opt("--out", help="Copy the pool here (default: cache).")
]
MinibenchRunMethods = Annotated[
    str, Opt("--methods", help="Comma-separated merge methods, or all.")
]
MinibenchRunPoolDir = Annotated[
    Path | None, Opt("--pool-dir", help="A built pool (default: build).")
]
MinibenchRunOut = Annotated[
    Path | None, Opt("--out", help="Results folder [minibench_results in the working directory].")
]
DemoOut = Annotated[Path, Opt("--out", help="Folder for the results.")]
MergeTaskfile = Annotated[
    Path | None, Opt("--taskfile", help="Data-aware methods: the tasks' JSON task file.")
]
MergeDataDir = Annotated[
    Path | None, Opt("--data-dir", help="Data-aware methods: local data, DIR/<task>.")
]
MergeDataExamples = Annotated[
    int | None, Opt("--data-examples", help="Data-aware methods: images per task.")
]
MergeBatchSize = Annotated[int | None, Opt("--batch-size", help="Data-aware methods: batch size.")]
MergeDataOrder = Annotated[
    Path | None, Opt("--data-order", help="Data-aware methods: fixed rows, a JSON task → rows map.")
]
MergeMergingWeights = Annotated[
    Path | None, Opt("--merging-weights", help="AdaMerging: merge with these weights, no data.")
]
MergeSaveMergingWeights = Annotated[
    Path | None, Opt("--save-merging-weights", help="AdaMerging: write the learned weights.")
]
SweepOut = Annotated[
    Path, Opt("--out", help="Folder for sweep.md/json/png and best/ (written atomically).")
]
SweepGrid = Annotated[
    list[str] | None,
    Opt("--grid", help="Swept parameter NAME=a,b,c or NAME=start:stop:step; repeat."),
]
SweepSelectOn = Annotated[
    str, Opt("--select-on", help="Split the best point is chosen on: validation (or test).")
]
SweepAllowTest = Annotated[
    bool,
    Opt(
        "--allow-test-selection",
        help="Allow --select-on test: choose on test data (labelled as such everywhere).",
    ),
]
SweepValFraction = Annotated[
    float | None,
    Opt(
        "--val-fraction",
        help="Stratified hold-out of each task's train split for validation, in (0, 1) "
        "[FusionBench's validation split where it has one, else 0.1].",
    ),
]
SweepReportTest = Annotated[
    bool, Opt("--report-test", help="Also evaluate every point on the test split (not to choose).")
]
SweepLimit = Annotated[
    int | None, Opt("--limit", help="First N selection (and test) images per task.")
]
