# Two-command quickstart: `make demo` (train the CPU demo) and `make test`.
# Both create .venv on first use: CPU torch first (so pip never resolves a CUDA build),
# then the package with its dev extra.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vitreg-installed

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded default: vitt/14 + 4 registers on synthetic shapes, ~5 min on 2 CPU cores.
demo: $(STAMP)
	$(BIN)/python train/pretrain.py experiment=demo $(ARGS)

# Full suite, slow tests included (pytest exits 5, and so does make, if nothing is collected).
test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
