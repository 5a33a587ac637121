# `make demo` and `make test` each bootstrap .venv (idempotent), then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: demo test test-all bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is installed first and pinned, so pip never resolves a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/effusion train --run $(RUN) --fresh
	$(BIN)/effusion sample --run $(RUN) --n 100 --out $(RUN)/demo-grid.png --npy $(RUN)/demo-samples.npy
	@echo "samples: $(RUN)/demo-grid.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	$(BIN)/effusion bench train --out bench

clean:
	rm -rf $(VENV) runs .pytest_cache
