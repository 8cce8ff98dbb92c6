"""Regenerate clipship's task registry from an installed FusionBench (0.2.33), and the table the
tests check it against.

    python scripts/fusionbench_tasks.py --fusionbench SITE_PACKAGES_OR_SOURCE_DIR

Reads, without importing ``fusion_bench`` itself (its ``__init__`` pulls in Lightning and Hydra):

- ``fusion_bench/tasks/clip_classification/__init__.py``: ``CLIPTemplateFactory._dataset_mapping``
  (every task name and alias) by parsing it; each task module is executed on its own as part of a
  stand-in package, so its relative imports (``tiny_imagenet`` takes ``imagenet``'s templates)
  resolve. Class names are the module's ``classnames`` (or the attribute the mapping names:
  ``cifar100`` → ``fine_label``); templates are its lambdas rendered with the literal ``{c}``,
  and each is checked to be plain substitution (the lambda of any class name equals the rendered
  text with ``{c}`` replaced) before it is written.
- ``fusion_bench_config/dataset/image_classification/test/<task>.yaml``: the hub test set.
- ``fusion_bench_config/dataset/image_classification/val/<task>.yaml``: the validation split it
  carves from the training split (``train_validation_split``: fraction, seed).
- ``fusion_bench_config/dataset/image_classification/test/TALL14.yaml`` and ``TALL20.yaml``: the
  suites.
- ``fusion_bench_config/model/clip-vit/*.yaml``: the model config group its modelpools name in
  their ``defaults`` (each file one model), written to ``tests/data/fusionbench_model_group.json``
  for the test of the rule ``clipship.pool.model_group`` reads them by.

Writes ``clipship/runtime/tasks.json`` (the eight tasks keep the sources SPEC §3 fixes and their
test-set sizes) and ``tests/data/fusionbench_prompts.json``: per task, FusionBench's own prompts
(each lambda applied to each class name, class by class) as a count and a sha256, so the test
compares clipship's rendered prompts with FusionBench's output byte for byte, at 26 tasks × up to
80 templates without committing the prompts themselves.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "clipship" / "runtime" / "tasks.json"
PROMPTS = ROOT / "tests" / "data" / "fusionbench_prompts.json"
MODEL_GROUP = ROOT / "tests" / "data" / "fusionbench_model_group.json"
PLACEHOLDER = "{c}"
PROBES = ("x", "Abc_1", "two words", "{", "%s")  # class names that would expose non-substitution
SUITES = {"tall14": "TALL14.yaml", "tall20": "TALL20.yaml"}
# Columns of hub sets that do not use FusionBench's "image" / "label" (its loader renames them).
COLUMNS = {"fer2013": ("jpg", "cls")}
# FusionBench loads fer2013 with a function; this is its default path
# (fusion_bench/dataset/fer2013.py).
LOADER_PATHS = {"fusion_bench.dataset.fer2013.load_fer2013": "clip-benchmark/wds_fer2013"}
# Modules the factory names that 0.2.33 ships under another file name (so its own factory raises
# ModuleNotFoundError for the task): the file that holds the task's names and templates.
MODULE_FILES = {"mango_leaf_disease": "mongo_leaf_disease"}


def dataset_mapping(init: Path) -> dict[str, object]:
    """``CLIPTemplateFactory._dataset_mapping``, read from the source as a literal."""
    tree = ast.parse(init.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "CLIPTemplateFactory":
            for item in node.body:
                if isinstance(item, ast.Assign) and item.targets[0].id == "_dataset_mapping":
                    return ast.literal_eval(item.value)
    raise SystemExit(f"{init}: no CLIPTemplateFactory._dataset_mapping")


def load_modules(folder: Path) -> dict[str, types.ModuleType]:
    """Every module of the folder, executed inside a stand-in package (relative imports work)."""
    package = types.ModuleType("fb_clip_tasks")
    package.__path__ = [str(folder)]
    sys.modules[package.__name__] = package
    modules = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem in ("__init__", "clip_dataset"):
            continue
        name = f"{package.__name__}.{path.stem}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        modules[path.stem] = sys.modules[name]
    return modules


def rendered(templates: list, task: str) -> list[str]:
    out = []
    for template in templates:
        text = template(PLACEHOLDER)
        for probe in PROBES:
            if template(probe) != text.replace(PLACEHOLDER, probe):
                raise SystemExit(f"{task}: a template is not plain substitution: {text!r}")
        out.append(text)
    return out


def hub_source(config: Path, task: str) -> dict | None:
    """The test set a FusionBench dataset config names, as clipship's ``dataset`` entry."""
    if not config.exists():
        return None
    entry = yaml.safe_load(config.read_text())[task]
    target = entry.get("_target_")
    if target == "datasets.load_dataset":
        args = entry.get("_args_") or []
        path = entry.get("path", args[0] if args else None)
        name = entry.get("name", args[1] if len(args) > 1 else None)
    elif target in LOADER_PATHS:
        path, name = entry.get("path", LOADER_PATHS[target]), None
    else:
        raise SystemExit(f"{config}: unknown loader {target}")
    image, label = COLUMNS.get(task, ("image", "label"))
    return {
        "path": path,
        "name": name,
        "split": entry.get("split", "test"),
        "image_column": image,
        "label_column": label,
    }


def validation_split(config: Path, task: str) -> dict | None:
    """The validation split a FusionBench ``val/<task>.yaml`` carves from the training split
    (``fusion_bench.utils.data.train_validation_split``): its fraction (or size) and seed."""
    if not config.is_file():
        return None
    entry = yaml.safe_load(config.read_text())[task]
    if not str(entry.get("_target_", "")).endswith("train_validation_split"):
        return None
    return {
        "from": entry["dataset"].get("split", "train"),
        "fraction": entry.get("validation_fraction"),
        "size": entry.get("validation_size"),
        "seed": entry.get("random_seed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusionbench", type=Path, required=True, help="holds fusion_bench/")
    args = parser.parse_args()
    tasks_dir = args.fusionbench / "fusion_bench" / "tasks" / "clip_classification"
    tests_dir = args.fusionbench / "fusion_bench_config" / "dataset" / "image_classification"
    mapping = dataset_mapping(tasks_dir / "__init__.py")
    modules = load_modules(tasks_dir)
    old = json.loads(REGISTRY.read_text())

    canonical: dict[str, str] = {}  # module → the first name without '/' (FusionBench's own)
    aliases: dict[str, str] = {}
    missing_modules = {}
    for name, info in mapping.items():
        module = (info if isinstance(info, str) else info["module"]).lstrip(".")
        if module not in modules:  # FusionBench's factory cannot load it either
            if module not in MODULE_FILES:
                raise SystemExit(f"{name}: the factory names .{module}, which is not shipped")
            missing_modules[name] = (module, MODULE_FILES[module])
            module = MODULE_FILES[module]
        if module not in canonical and "/" not in name:
            canonical[module] = name
    tasks, prompts = {}, {}
    for name, info in mapping.items():
        module = (info if isinstance(info, str) else info["module"]).lstrip(".")
        module = missing_modules.get(name, (module, module))[1]
        if canonical[module] != name:
            aliases[name] = canonical[module]
            continue
        attrs = {"classnames": "classnames", "templates": "templates"}
        if not isinstance(info, str):
            attrs = {"classnames": info["classnames"], "templates": info["templates"]}
        source = modules[module]
        classnames = list(getattr(source, attrs["classnames"]))
        templates = list(getattr(source, attrs["templates"]))
        entry = {"classnames": classnames, "templates": rendered(templates, name)}
        if name in old["tasks"] and "dataset" in old["tasks"][name]:
            entry["dataset"] = old["tasks"][name]["dataset"]  # SPEC §3's source and size
        else:
            dataset = hub_source(tests_dir / "test" / f"{name}.yaml", name)
            if dataset is not None:
                entry["dataset"] = dataset
        validation = validation_split(tests_dir / "val" / f"{name}.yaml", name)
        if validation is not None:
            entry["validation"] = validation
        tasks[name] = entry
        texts = [template(c) for c in classnames for template in templates]
        prompts[name] = {
            "classes": len(classnames),
            "templates": len(templates),
            "prompts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        }
    suites = {}
    for suite, file in SUITES.items():
        listed = yaml.safe_load((tests_dir / "test" / file).read_text())["defaults"]
        suites[suite] = [aliases.get(n, n) for n in listed]
    registry = {
        "source": "fusion-bench 0.2.33 (PyPI): fusion_bench/tasks/clip_classification (class "
        "names, templates, names and aliases) and fusion_bench_config/dataset/"
        "image_classification/test (hub test sets, TALL14/TALL20) and .../val (validation "
        "splits); the eight tasks' sources from "
        "clipship's SPEC §3; generated by scripts/fusionbench_tasks.py",
        "placeholder": PLACEHOLDER,
        "standard": old["standard"],
        "suites": suites,
        "aliases": dict(sorted(aliases.items())),
        "unloadable_in_fusionbench": {
            n: f"its factory imports .{m}; the file is {f}.py"
            for n, (m, f) in missing_modules.items()
        },
        "tasks": tasks,
    }
    REGISTRY.write_text(json.dumps(registry, indent=1, ensure_ascii=False) + "\n")
    PROMPTS.write_text(
        json.dumps(
            {"source": registry["source"], "aliases": registry["aliases"], "tasks": prompts},
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    group = args.fusionbench / "fusion_bench_config" / "model" / "clip-vit"
    entries = {}
    for file in sorted(group.glob("*.yaml")):
        content = yaml.safe_load(file.read_text())
        if isinstance(content, dict) and "defaults" not in content:  # one model per file
            entries[file.stem] = content
    MODEL_GROUP.write_text(json.dumps(entries, indent=1) + "\n")
    print(f"{len(tasks)} tasks, {len(aliases)} aliases, suites {', '.join(suites)}")


if __name__ == "__main__":
    main()
