# The README's two commands: `make demo` (the main job on offline synthetic data) and
# `make test`. Both set up .venv from a fresh clone first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUDY ?=
PORT ?= 8080

DATA_DIR ?=
STUDIES ?= studies/results
CHUNK ?= all

.PHONY: setup demo test lint report dashboard bench results clean

setup: $(STAMP)

# torch pinned to 2.13 in the same install, so that resolving the project's dependencies takes
# this build instead of pulling the newest torch with gigabytes of CUDA packages (one pip run:
# one resolution, not two).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tune_cifar.search --space smoke --data synthetic --wandb offline

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# CurveZMQ keys (transport_encryption) encrypt the kernel's local TCP sockets instead of ipykernel
# warning that they are plain text; the classic template writes each figure's alternative text (the
# notebook sets it from the figure's titles), which the default lab template drops (nbconvert then
# warns "Alternative text is missing").
report: $(STAMP)
	@test -n "$(STUDY)" || { echo "usage: make report STUDY=path/to/study"; exit 2; }
	STUDY_DIR="$(abspath $(STUDY))" $(BIN)/jupyter nbconvert --execute --to html --template classic \
		--KernelManager.transport_encryption=auto \
		--output-dir "$(abspath $(STUDY))/analysis" analysis/explore_trials.ipynb

# optuna-dashboard on STUDY/optuna.db, on 127.0.0.1 only (the `dashboard` extra, part of `dev`).
dashboard: $(STAMP)
	@test -n "$(STUDY)" || { echo "usage: make dashboard STUDY=path/to/study [PORT=8080]"; exit 2; }
	$(BIN)/python -m tune_cifar.dashboard "$(STUDY)" --port "$(PORT)"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

# Every run behind RESULTS.md, in chunks of at most about 2.5 h on a 2-core CPU (CHUNK=1..5; default all), then RESULTS.md.
results: $(STAMP)
	@test -n "$(DATA_DIR)" || { echo "usage: make results DATA_DIR=folder-with-cifar-10-batches-py [STUDIES=studies/results]"; exit 2; }
	PYTHON=$(BIN)/python analysis/make_results.sh "$(DATA_DIR)" "$(STUDIES)" "$(CHUNK)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
