"""The release file (``clipship release RELEASE.yaml``) as one typed schema.

Every key, type and range is declared here; ``read_release_file`` reads the YAML through the
bounded loader (``clipship.schemas.read_yaml``) and refuses the first problem with one line that
names its path (``release.yaml: eval.tasks[3]: ...``). The method's parameters are checked by the
method itself (``clipship methods`` lists them), and the cross-references a file can state on
its own (a gate's task among the listed tasks, ``gates.export`` without ``export:``) here; those
that need the pool resolved are checked by ``release`` before any stage runs.

``clipship release --schema`` prints ``release_json_schema()``: point an editor's YAML language
server at it for completion and checks while writing the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from clipship.errors import ClipshipError, ReleaseConfigError
from clipship.schemas import (
    Finite,
    Fraction,
    Line,
    Name,
    Revision,
    Schema,
    Text,
    parse,
    read_yaml,
)

MAX_EVAL_BATCH = 1 << 16
Count = Annotated[int, Field(ge=1, le=1 << 31)]


class Pool(Schema):
    """Exactly one of: ``minibench`` (the embedded mini-benchmark, with ``seed``), ``yaml`` (a
    FusionBench modelpool file), ``pretrained`` + ``models``."""

    minibench: Literal["smoke", "full"] | None = None
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    yaml: Text | None = None
    pretrained: Text | None = None
    models: dict[Name, Text] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Pool:
        chosen = [k for k in ("minibench", "yaml", "pretrained") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of minibench:, yaml:, pretrained: + models:")
        if (self.pretrained is None) != (self.models is None):
            raise ValueError("pretrained: and models: go together")
        return self


class Eval(Schema):
    tasks: Literal["pool"] | Name | list[Name] = "pool"
    taskfile: Text | None = None
    data_dir: Text | None = None
    baselines: bool = True
    batch_size: int | None = Field(default=None, ge=1, le=MAX_EVAL_BATCH)
    limit: Count | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: Any) -> Any:
        if isinstance(tasks, list):
            if not tasks:
                raise ValueError("name at least one task")
            twice = sorted({t for t in tasks if tasks.count(t) > 1})
            if twice:
                raise ValueError(f"task {twice[0]!r} is listed twice")
        return tasks

    def listed(self) -> list[str] | None:
        """The tasks named in the file (None: the pool's, or every task of a task file)."""
        if isinstance(self.tasks, list):
            return list(self.tasks)
        if self.tasks in ("pool", "all"):
            return None
        return self.tasks.split(",")


class ExportGates(Schema):
    max_logit_diff: Finite | None = Field(default=None, ge=0)
    min_agreement_fp32: Fraction | None = None
    min_agreement_fp16: Fraction | None = None
    min_agreement_int8: Fraction | None = None


class Gates(Schema):
    """Accuracies are fractions in [0, 1]; ``max_drop`` may be negative (the merged model must
    beat each fine-tuned one by that much)."""

    min_average_accuracy: Fraction | None = None
    min_accuracy: Fraction | dict[Name, Fraction] | None = None
    max_drop: float | None = Field(default=None, ge=-1, le=1)
    export: ExportGates | None = None


class Export(Schema):
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(default=["fp32"], min_length=1)
    validation_size: Count | None = None
    validation_data: Text | None = None
    tensorrt: bool = False
    max_batch: int | None = Field(default=None, ge=32, le=1 << 16)
    int8_scheme: Literal["auto", "u8u8", "reduce_range"] | None = None

    @field_validator("precisions")
    @classmethod
    def _distinct(cls, precisions: list[str]) -> list[str]:
        twice = sorted({p for p in precisions if precisions.count(p) > 1})
        if twice:
            raise ValueError(f"{twice[0]} is listed twice")
        return precisions


class Card(Schema):
    license: Line | None = None
    name: Line | None = None
    base_model: Line | None = None


def _repo_id(repo_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id, re.ASCII):
        raise ValueError("not a repo id (owner/name: letters, digits, '.', '_', '-')")
    if ".." in repo_id:
        raise ValueError("a repo id holds no '..'")
    return repo_id


class Hub(Schema):
    repo_id: Annotated[str, AfterValidator(_repo_id)]
    private: bool = False
    revision: Revision | None = None
    tag: Revision | None = None
    message: Line | None = None


def _release_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise ValueError(
            "a release name is letters, digits, '.', '_' and '-' (it names the folder "
            "release_out/<name>; use --run-dir for another place)"
        )
    return name


class ReleaseFile(Schema):
    """A release: the pool, the merge, then optional evaluation gates, export, card and hub
    target. Paths are relative to the file."""

    name: Annotated[str, AfterValidator(_release_name)] | None = None
    pool: Pool
    method: Text
    # a value ``{sweep: [a, b, ...]}`` sweeps the parameter (``clipship sweep``), chosen on
    # ``select_on``
    parameters: dict[Text, Any] = Field(default_factory=dict)
    select_on: Literal["validation", "test"] = "validation"
    allow_test_selection: bool = False
    val_fraction: float | None = Field(default=None, gt=0, lt=1)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    eval: Eval = Field(default_factory=Eval)
    gates: Gates = Field(default_factory=Gates)
    export: Export | None = None
    card: Card = Field(default_factory=Card)
    hub: Hub | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, value: Any) -> Any:
        return {} if value is None else value

    def swept(self) -> dict[str, list[Any]]:
        """The swept parameters and their values."""
        return {k: v["sweep"] for k, v in self.parameters.items() if isinstance(v, dict)}

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.parameters.items() if not isinstance(v, dict)}

    @model_validator(mode="after")
    def _references(self) -> ReleaseFile:
        for key, value in self.parameters.items():
            if isinstance(value, dict) and (
                set(value) != {"sweep"}
                or not isinstance(value["sweep"], list)
                or not value["sweep"]
            ):
                raise ValueError(
                    f"parameters.{key}: a value, or {{sweep: [values]}} to choose one by a sweep"
                )
            for item in value["sweep"] if isinstance(value, dict) else ():
                scalar = isinstance(item, (int, float, bool)) or (
                    isinstance(item, str) and not set(item) & {",", ":"}
                )
                if not scalar:
                    raise ValueError(
                        f"parameters.{key}.sweep: {item!r} is not a number, boolean or name "
                        "(a swept value is one of those)"
                    )
        if not self.swept():
            given = [k for k in ("val_fraction", "allow_test_selection") if getattr(self, k)]
            given += ["select_on"] if self.select_on != "validation" else []
            if given:
                raise ValueError(f"{given[0]} needs a swept parameter ({{sweep: [values]}})")
        if self.select_on == "test" and not self.allow_test_selection:
            raise ValueError(
                "select_on: test chooses on the test data (an optimistic accuracy): add "
                "allow_test_selection: true to do it anyway"
            )
        if self.gates.export is not None and self.export is None:
            raise ValueError("gates.export needs an export: section to gate")
        if self.gates.max_drop is not None and not self.eval.baselines:
            raise ValueError("gates.max_drop needs eval.baselines: true")
        listed = self.eval.listed()
        if listed is None and self.eval.tasks == "pool" and self.pool.models is not None:
            listed = list(self.pool.models)
        if isinstance(self.gates.min_accuracy, dict) and listed is not None:
            for task in self.gates.min_accuracy:
                if task not in listed:
                    raise ValueError(
                        f"gates.min_accuracy.{task}: not an evaluated task "
                        f"(evaluated: {', '.join(listed)})"
                    )
        return self


def read_release_file(path: Path) -> ReleaseFile:
    """The release file, parsed and checked (its method's parameters included)."""
    from clipship.merge.registry import get_method

    data = read_yaml(path, ReleaseConfigError, "release file")
    if not isinstance(data, dict):
        raise ReleaseConfigError(f"{path}: a release file is a mapping (pool:, method:, ...)")
    release = parse(ReleaseFile, data, str(path), ReleaseConfigError)
    try:
        spec = get_method(release.method)
        for name, values in release.swept().items():
            for value in values:
                spec.resolve({**release.fixed(), name: value})
        spec.resolve(release.fixed())
    except ClipshipError as e:
        raise ReleaseConfigError(f"{path}: parameters: {e}") from None
    return release


def release_json_schema() -> dict[str, Any]:
    """The release file's JSON Schema (draft 2020-12), for editors and CI validation."""
    schema = ReleaseFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "clipship release file"
    return schema


def schema_text() -> str:
    return json.dumps(release_json_schema(), indent=2, ensure_ascii=False) + "\n"
