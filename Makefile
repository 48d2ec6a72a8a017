# Two-command quick start: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

DEMO_ROOT ?= workdirs/demo

# The paper's dermatology setting at toy scale on the embedded HAM10000 (README: Demo).
# Rerunning skips finished runs and resumes interrupted ones.
demo: $(STAMP)
	$(PY) -m launch.sweep --sweep=configs/sweeps/demo.py --root=$(DEMO_ROOT) \
	  --executor=local --parallel=2
	$(PY) -m micle_jax.report --root=$(DEMO_ROOT) \
	  --show='split=test,checkpoint=best|frozen,metric=balanced_accuracy|accuracy'

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf workdirs .pytest_cache .ruff_cache
