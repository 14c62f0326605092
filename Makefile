# Two commands for a newcomer:  `make demo`  (install + nightly pipeline on MovieLens-100k)
#                               `make test`  (install + unit and integration tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
export RAY_AUTH_MODE ?= disabled
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-all bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel locally; the pyproject range stays open for GPU clusters.
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -c constraints-local.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m jobs.nightly --config jobs/configs/ml100k.yaml

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install -q -c constraints-local.txt '.[bench]'
	$(BIN)/python benchmarks/run_all.py --json results.json

clean:
	rm -rf $(VENV) .pytest_cache
