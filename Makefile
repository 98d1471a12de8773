# The two commands of the README, and a few more. Each target prints the commands it runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint benchmark clean-demo

# Set up the virtual environment once (again when the requirements change).
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The whole pipeline on a small synthetic download: clean -> train -> predict (about 12 minutes on 2 CPU cores).
demo: $(VENV)/.installed
	$(BIN)/python data_cleaning.py --demo
	$(BIN)/python train.py --max-epochs 12
	$(BIN)/python predict.py --masks data/synthetic-download/test_masks

# The test suite (CPU, generated data; tests on ../shared data skip when it is absent): what CI runs. It ends
# with the 15 slowest tests, to keep the whole under 10 minutes on 2 cores.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

# The fast tier: the unit and table tests, in process (no script run in a subprocess, no training).
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# Speed and memory figures for every stage (see benchmarks/README.md).
benchmark: $(VENV)/.installed
	$(BIN)/python benchmarks/run.py
