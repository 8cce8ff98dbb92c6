"""Every file clipship reads, parsed by one typed schema (pydantic v2), and the loaders under them.

A file goes through three steps, each refusing with one line that names the file and, for a bad
value, its path inside the file (``eval.tasks[3]: ...``):

1. ``read_yaml`` / ``read_json``: the text, bounded in size; YAML with anchors and aliases
   expanded at most ``MAX_NODES`` nodes deep and wide (a "billion laughs" file is refused before
   it is built), nesting at most ``MAX_DEPTH`` levels, one document; duplicate keys refused in
   both formats (YAML and JSON parsers otherwise let the last one win silently); JSON's
   ``NaN``/``Infinity`` refused.
2. ``parse(Model, data, where)``: the schema: types, ranges, closed choices, unknown keys, every
   number finite, names that are names (``Name``).
3. Cross-references the file itself cannot state (a gate's task among the evaluated ones) are
   checked by the caller before any stage runs.

The schemas here are the shared core's files: a FusionBench modelpool, a merge recipe, a task
file, text heads' metadata, an export record, a release stage's record, a data order. The release
file's schema is in ``clipship.release_file`` (it names the stages' choices).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from clipship.errors import ClipshipError, shown
from clipship.imaging import MAX_PREPROCESS_SIDE

M = TypeVar("M", bound=BaseModel)

MAX_YAML_BYTES = 1 << 20  # configuration files: release, modelpool, taskpool
MAX_JSON_BYTES = 64 << 20  # records: a recipe's data rows or an ImageNet task file stay far below
MAX_NODES = 100_000  # YAML nodes after alias expansion
MAX_DEPTH = 64  # nesting levels, in YAML and JSON
MAX_NAME = 200  # characters in a task, model, tag or revision name


# --- names --------------------------------------------------------------------------------------


def line_problem(value: Any) -> str | None:
    """Why ``value`` is not one line of visible text (a card title, a license, a commit
    summary), or None: no control, format (bidi, zero-width) or line-separator characters."""
    if not isinstance(value, str):
        return "is not a text"
    if not value.strip():
        return "is empty"
    for char in value:
        if unicodedata.category(char)[0] in "CZ" and char != " ":
            return f"holds the character U+{ord(char):04X} (control, format or line separator)"
    return None


def name_problem(value: Any) -> str | None:
    """Why ``value`` is not a name (task, model, tag, revision, release), or None.

    Names reach file names, model-card tables, ONNX output names and hub URLs, so they are one
    line of visible text with no ``/`` or ``\\``, no ``..``, no spaces around them, at most
    ``MAX_NAME`` characters."""
    problem = line_problem(value)
    if problem:
        return problem
    if len(value) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if "/" in value or "\\" in value:
        return "holds a '/' or '\\' (a name is not a path)"
    if ".." in value:
        return "holds '..'"
    if value != value.strip():
        return "starts or ends with a space"
    return None


_PR_REF = re.compile(r"refs/pr/[1-9][0-9]{0,8}")


def revision_problem(value: Any) -> str | None:
    """A hub revision is a name (a branch, tag or commit); the Hub's pull-request refs
    (``refs/pr/N``) are the one form with a '/' accepted."""
    if isinstance(value, str) and _PR_REF.fullmatch(value):
        return None
    return name_problem(value)


def _checker(problem_of: Callable[[Any], str | None]) -> Callable[..., str]:
    def check(value: Any, what: str, option: str | None = None) -> str:
        problem = problem_of(value)
        if problem:
            raise ClipshipError(f"{what} {shown(value)} {problem}", option=option)
        return value

    check.__doc__ = f"``value`` if ``{problem_of.__name__}`` finds nothing, else one line."
    return check


def _validator(problem_of: Callable[[Any], str | None], kind: str) -> Callable[[str], str]:
    def validate(value: str) -> str:
        problem = problem_of(value)
        if problem:
            raise ValueError(f"{kind} {problem}")
        return value

    return validate


check_line = _checker(line_problem)
check_name = _checker(name_problem)
check_revision = _checker(revision_problem)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Name = Annotated[str, AfterValidator(_validator(name_problem, "a name"))]
Revision = Annotated[str, AfterValidator(_validator(revision_problem, "a revision"))]
Text = Annotated[str, Field(min_length=1)]
Line = Annotated[str, AfterValidator(_validator(line_problem, "a line of text"))]
Finite = Annotated[float, AfterValidator(_finite)]
Fraction = Annotated[float, Field(ge=0, le=1)]  # ranges refuse NaN; ±Inf is out of range
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Side = Annotated[int, Field(ge=1, le=MAX_PREPROCESS_SIDE)]
Pair = Annotated[list[Side], Field(min_length=2, max_length=2)]  # JSON has no tuples
Channels = Annotated[list[Finite], Field(min_length=3, max_length=3)]


# --- reading ------------------------------------------------------------------------------------


def read_text(path: Path | str, error: type[Exception], what: str, limit: int) -> str:
    """A UTF-8 file of at most ``limit`` bytes, or one ``error`` line."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: a folder, not a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror})") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {limit >> 20} MiB; not a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (a {what} is UTF-8)") from None


def read_yaml(path: Path | str, error: type[Exception], what: str) -> Any:
    """A YAML file's data, bounded (``MAX_YAML_BYTES``, ``MAX_NODES`` after aliases,
    ``MAX_DEPTH``), one document, duplicate keys refused."""
    import yaml

    text = read_text(path, error, what, MAX_YAML_BYTES)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _yaml_problem(node)
        if problem:
            raise error(f"{path}: {problem}")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{path}: not valid YAML ({shown(first)[1:-1]})") from None
    except RecursionError:
        raise error(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def _yaml_problem(root: Any) -> str | None:
    """Walk the composed YAML graph as construction would (aliases expanded), without building
    anything: too many nodes, too deep, or a key given twice."""
    import yaml

    count = 0
    stack: list[tuple[Any, int, str]] = [(root, 0, "")]
    while stack:
        node, depth, where = stack.pop()
        count += 1
        if count > MAX_NODES:
            return f"more than {MAX_NODES} values once anchors and aliases are expanded"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels (or an alias refers to itself)"
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    stack.append((value, depth + 1, where))
                    continue
                label = key.value if isinstance(key, yaml.ScalarNode) else "<key>"
                if isinstance(key, yaml.ScalarNode):
                    if (key.tag, key.value) in seen:
                        return f"{_join(where, label)}: the key is given twice"
                    seen.add((key.tag, key.value))
                stack.append((value, depth + 1, _join(where, label)))
                if not isinstance(key, yaml.ScalarNode):
                    stack.append((key, depth + 1, where))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                stack.append((item, depth + 1, f"{where}[{i}]"))
    return None


def _join(where: str, key: Any) -> str:
    """``where.key``; a key that is not plain text is quoted (it may hold a line break)."""
    if not re.fullmatch(r"[\w-]+", str(key)):
        return f"{where}[{shown(key)}]"
    return f"{where}.{key}" if where else str(key)


def read_json(
    path: Path | str, error: type[Exception], what: str, limit: int = MAX_JSON_BYTES
) -> Any:
    """A JSON file's data: bounded, duplicate keys and NaN/Infinity refused."""
    text = read_text(path, error, what, limit)
    try:
        return loads_json(text)
    except _DuplicateKey as e:
        raise error(f"{path}: the key {shown(e.args[0])} is given twice in one object") from None
    except _NonFiniteConstant as e:
        raise error(f"{path}: {e.args[0]} is not a finite number (JSON has none)") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise error(f"{path}: nested deeper than Python can read") from None


class _DuplicateKey(ValueError):
    pass


class _NonFiniteConstant(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _NonFiniteConstant(name)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to Inf
        raise _NonFiniteConstant(text)
    return value


def loads_json(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys, NaN/Infinity and numbers beyond float range
    (raising ``ValueError`` subclasses the readers above turn into one line)."""
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)


# --- validation ---------------------------------------------------------------------------------


def parse(
    model: type[M], data: Any, where: str, error: type[Exception] = ClipshipError, **context: Any
) -> M:
    """``data`` as ``model``, or one ``error`` line: ``{where}: {path}: {problem}``."""
    try:
        return model.model_validate(data, context=context or None)
    except ValidationError as e:
        raise error(f"{where}: {explain(e, model)}") from None


def explain(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The first problem of a validation error as ``path: message (got value)``."""
    problems = error.errors(include_url=False)
    # In a union, every member reports; the deepest path is the member the value was meant for.
    # An unknown key (a typo) explains more than the missing key it stands for.
    first = max(problems, key=lambda p: (len(_location(p["loc"])), p["type"] == "extra_forbidden"))
    loc = _location(first["loc"])
    where = _path(loc)
    kind, context = first["type"], first.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1]) if model is not None else []
        message = "unknown key" + (f" (known: {', '.join(known)})" if known else "")
    elif kind == "missing":
        message = "missing"
    else:
        message = _message(kind, context) or first["msg"].removeprefix("Value error, ")
        if "input" in first and loc:
            message += f" (got {shown(first['input'])})"
    return f"{where}: {message}" if where else message


_MESSAGES = {
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a text",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "finite_number": "expected a finite number",
    "string_too_short": "must not be empty",
    "greater_than_equal": "must be ≥ {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be ≤ {le}",
    "less_than": "must be < {lt}",
    "literal_error": "choose {expected}",
    "string_pattern_mismatch": "does not match {pattern}",
}


def _message(kind: str, context: dict[str, Any]) -> str | None:
    if kind == "too_short":
        least = context.get("min_length", 1)
        return "must not be empty" if least == 1 else f"needs at least {least} items"
    if kind == "too_long":
        return f"takes at most {context.get('max_length')} items"
    template = _MESSAGES.get(kind)
    try:
        return template.format(**context) if template else None
    except (KeyError, IndexError):
        return template


def _location(loc: tuple) -> list:
    """A pydantic location without the union-member and validator tags it inserts."""
    return [
        part
        for part in loc
        if isinstance(part, int)
        or not (
            "[" in part
            or part in ("str", "int", "float", "bool", "list", "dict", "none", "literal")
            or part.startswith(("function-", "constrained-", "lax-", "strict-"))
        )
    ]


def _path(loc: list) -> str:
    """``eval.tasks[3]``; a key that is not plain text is quoted (``models['b\\n']``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[\w-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{shown(part)}]"
    return out


def _known_keys(model: type[BaseModel], loc: list) -> list[str]:
    """The keys a (nested) model accepts at ``loc``, for an unknown-key message."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = field.annotation
        while typing.get_origin(current) is not None:
            args = [a for a in typing.get_args(current) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            current = models[0] if models else (args[-1] if args else None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


class Schema(BaseModel):
    """A file format: unknown keys refused, numbers finite, no silent type coercion of text
    into numbers (``"3"`` is not 3)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class Open(Schema):
    """A format read from another tool (FusionBench's Hydra files): its other keys are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


# --- a FusionBench modelpool ---------------------------------------------------------------------


class PoolModel(Open):
    """One entry of a modelpool's ``models:``: a source (text), or Hydra's model config (a
    mapping with ``pretrained_model_name_or_path`` or ``path``, and ``revision``), or one of
    FusionBench's loader calls: ``load_fft_vision_model_hf`` (``model_name``),
    ``load_lora_vision_model_hf`` (``peft_name`` over ``base_model_name``, merged and unloaded)
    and ``load_l_lora_vision_model_hf`` (``peft_name`` over ``base_model_name``, linearized)."""

    pretrained_model_name_or_path: Text | None = None
    path: Text | None = None
    revision: Revision | None = None
    target: Text | None = Field(default=None, alias="_target_")
    model_name: Text | None = None
    peft_name: Text | None = None
    base_model_name: Text | None = None
    merge_and_unload: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _source(self) -> PoolModel:
        loader = (self.target or "").rsplit(".", 1)[-1]
        if loader == "load_lora_vision_model_hf" and self.merge_and_unload is not True:
            raise ValueError(
                "a LoRA task model is merged in weight space: set merge_and_unload: true"
            )
        if self.source is None or "${" in self.source:
            raise ValueError("no plain source path or hub id (pretrained_model_name_or_path:)")
        return self

    @property
    def source(self) -> str | None:
        return self.pretrained_model_name_or_path or self.path or self.peft_name or self.model_name


class PoolFile(Open):
    """``CLIPVisionModelPool`` YAML: ``models: {_pretrained_: SRC, task: SRC | {...}}``, and
    FusionBench's ``platform`` (``hf``, the default, or ``modelscope``: its hub ids are
    ModelScope's)."""

    platform: Literal["hf", "huggingface", "modelscope"] | None = None

    models: dict[Name, PoolModel]

    @field_validator("models")
    @classmethod
    def _pretrained(cls, models: dict) -> dict:
        if "_pretrained_" not in models:
            raise ValueError("the pool has no '_pretrained_' model")
        return models


# --- task files ----------------------------------------------------------------------------------


class TaskEntry(Schema):
    classnames: list[Text] = Field(min_length=1)
    templates: list[Text] = Field(default_factory=lambda: ["a photo of a {c}."], min_length=1)
    data: Text | None = None
    dataset: dict[str, Any] | None = None


class TaskFile(Schema):
    """``{"tasks": {name: {classnames, templates, data?, dataset?}}}``; ``data`` relative to
    the file."""

    tasks: dict[Name, TaskEntry] = Field(min_length=1)


class TaskPool(Open):
    """A FusionBench taskpool YAML: ``test_datasets`` names (or Hydra ``defaults``)."""

    defaults: list[Any] = Field(default_factory=list)
    test_datasets: dict[Name, Any] | None = None


# --- a merge recipe ------------------------------------------------------------------------------


class RecipeSource(Schema):
    """A pool member as a recipe names it; ``files`` (weight file → sha256) is what a replay
    checks, so it cannot be missing or empty."""

    name: Name
    source: Text
    revision: Revision | None = None
    repo_id: Text | None = None
    path: Text | None = None  # recipes written before local paths were left out
    license: str | None = None
    files: dict[Text, Sha256] = Field(min_length=1)


class RecipeTaskData(Schema):
    split: Text
    batch_size: int = Field(ge=1)
    epoch_size: int | None = Field(default=None, ge=0)
    rows: list[Annotated[int, Field(ge=0)]]
    sha256: Sha256 | None = None
    dataset: dict[str, Any] | None = None
    source: str | None = None

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, frozen=True)


class RecipeData(Schema):
    tasks: dict[Name, RecipeTaskData] = Field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None
    merging_weights: list[Any] | None = None
    given_merging_weights: bool | None = None
    router_init_sha256: Sha256 | None = None  # a mixture's given initial routers
    mask_noise_sha256: Sha256 | None = None  # a Concrete merge's given noise
    merging_weights_sha256: Sha256 | None = None  # a Concrete merge's given λ and final mask


class Recipe(Schema):
    format: Literal["clipship-recipe/1"]
    method: Text
    parameters: dict[str, Any]
    seed: int = Field(ge=0)
    vision_only: bool
    max_shard_bytes: int = Field(ge=1)
    pretrained: RecipeSource
    models: list[RecipeSource] = Field(min_length=1)
    statistics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    device: Text | None = None
    data: RecipeData | None = None
    sweep: dict[str, Any] | None = None  # how ``clipship sweep`` chose the parameters

    @model_validator(mode="after")
    def _distinct(self) -> Recipe:
        names = [m.name for m in self.models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"model {twice[0]!r} is listed twice")
        return self


# --- text heads, export record, stage record, data order ------------------------------------------


class HeadsTask(Schema):
    classnames: list[Text] = Field(min_length=1)
    templates: list[Text] = Field(min_length=1)


class HeadsMeta(Schema):
    """``text_heads.json``. ``record_sha256`` covers every other key and the tensors' file
    (``heads_sha256``), so an edited class name is caught like an edited tensor."""

    model: Text
    repo_id: Text | None = None
    revision: str | None = None
    text_tower_sha256: Sha256
    tokenizer_sha256: Sha256
    config_sha256: Sha256
    logit_scale: Finite
    projection_dim: int | None = Field(default=None, ge=1)
    dtype: Text
    tasks: dict[Name, HeadsTask] = Field(min_length=1)
    versions: dict[str, str] = Field(default_factory=dict)
    heads_sha256: Sha256
    record_sha256: Sha256


class Preprocessing(Schema):
    """An export's image preprocessing (``ImagePreprocess.record()``)."""

    shortest_edge: Side | None
    size: Pair | None
    crop: Pair | None
    rescale_factor: Finite
    mean: Channels
    std: Channels
    resample: Literal["bicubic"] | Annotated[int, Field(ge=0, le=5)]


class ExportRecord(Schema):
    """``export.json``: what ``predict`` needs besides the graph. ``record_sha256`` covers the
    other keys; ``sha256`` each graph file."""

    format: Literal["clipship-export/1"]
    model: Text
    opset: int
    input: dict[str, Any]
    outputs: list[Text]
    tasks: list[Name] = Field(min_length=1)
    class_offsets: dict[
        Name, Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]
    ]
    classnames: dict[Name, list[Text]]
    templates_sha256: Sha256
    logit_scale: Finite
    preprocessing: Preprocessing
    recipe_sha256: Sha256 | None = None
    model_info: dict[str, Any]
    variants: dict[Literal["fp32", "fp16", "int8"], Text] = Field(min_length=1)
    versions: dict[str, str]
    int8: dict[str, Any] | None = None
    tensorrt: dict[str, Any] | None = None
    sha256: dict[Text, Sha256]
    record_sha256: Sha256

    @model_validator(mode="after")
    def _references(self) -> ExportRecord:
        for task in self.tasks:
            if task not in self.classnames or task not in self.class_offsets:
                raise ValueError(f"task {task!r} has no classnames or class offsets")
        for variant, file in self.variants.items():
            if file not in self.sha256:
                raise ValueError(f"variant {variant}: {file} has no sha256")
            if "/" in file or "\\" in file or file.startswith("."):
                raise ValueError(f"variant {variant}: {shown(file)} is not a file in the folder")
        return self


class StageRecord(Schema):
    """A release stage's ``stage.json``: its input key and the sha256 of every file it wrote."""

    key: Sha256
    files: dict[Text, Sha256]


def read_data_order(path: Path | str, error: type[Exception]) -> dict[str, list[int]]:
    """A fixed fetch order for data-aware merges: ``{task: [row, ...]}``."""

    class Order(Schema):
        rows: dict[Name, list[Annotated[int, Field(ge=0)]]]

    data = read_json(path, error, "data order (JSON {task: [row, ...]})")
    return parse(Order, {"rows": data}, str(path), error).rows


def record_sha256(record: dict[str, Any], key: str = "record_sha256") -> str:
    """sha256 of a record's canonical JSON without ``key`` (what ``key`` vouches for)."""
    import hashlib

    body = {k: v for k, v in record.items() if k != key}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_record_hash(
    record: dict[str, Any], where: str, error: type[Exception], remedy: str
) -> None:
    """Refuse a record whose ``record_sha256`` is missing or does not match its content."""
    recorded = record.get("record_sha256")
    if recorded is None:
        raise error(f"{where}: no record_sha256 (an older clipship wrote it): {remedy}")
    if recorded != record_sha256(record):
        raise error(f"{where}: changed since it was written (record_sha256 differs): {remedy}")
