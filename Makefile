# The README's two commands: `make demo` (the main job on offline synthetic data) and
# `make test`. Both set up .venv from a fresh clone first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUDY ?=

.PHONY: setup demo test lint report bench clean

setup: $(STAMP)

# torch 2.13 goes in first so that resolving the project's dependencies keeps this build
# instead of pulling the newest torch with gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tune_cifar.search --space smoke --data synthetic --wandb offline

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

report: $(STAMP)
	@test -n "$(STUDY)" || { echo "usage: make report STUDY=path/to/study"; exit 2; }
	STUDY_DIR="$(abspath $(STUDY))" $(BIN)/jupyter nbconvert --execute --to html \
		--output-dir "$(abspath $(STUDY))/analysis" analysis/explore_trials.ipynb

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
