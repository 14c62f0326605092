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

# About 6 minutes and 2.3 GB on a fresh machine (torch 0.75 GB, Ray 0.24 GB, pyarrow 0.17 GB, transformers
# 0.13 GB); pip shows a progress bar per download. PIP_FLAGS=-q for a quiet install.
PIP_FLAGS ?= --progress-bar on

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	@echo "[install 1/3] pip itself"
	$(BIN)/pip install $(PIP_FLAGS) --upgrade pip
	@echo "[install 2/3] torch, CPU wheel (the largest download; the pyproject range stays open for GPU clusters)"
	$(BIN)/pip install $(PIP_FLAGS) $(TORCH_PIN)
	@echo "[install 3/3] recsys-core with Ray, transformers, pyarrow and the test tools"
	$(BIN)/pip install $(PIP_FLAGS) -c constraints-local.txt -e '.[dev]'
	@du -sh $(VENV) | sed 's/^/[install] done: /'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/recsys-core nightly --config ml100k

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install $(PIP_FLAGS) -c constraints-local.txt '.[bench]'
	$(BIN)/python benchmarks/run_all.py --json results.json

clean:
	rm -rf $(VENV) .pytest_cache
