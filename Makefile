# `make demo` and `make test` each bootstrap .venv (idempotent), then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: demo test test-all bench install clean browser icons docs

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

# The page test drives Debian's Chromium (Playwright's own browser download is unreachable).
# Installed when missing and this runs as root; otherwise that one test skips with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && echo "installing Debian's chromium for the page test (apt-get)" \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "chromium not installed: the page test will skip (apt-get install chromium)"; }

# The real colour set (data.source=icons) is built from Debian's icon themes; its tests skip
# with the apt-get line when they are missing and this cannot install them.
ICON_PACKAGES := faenza-icon-theme oxygen-icon-theme moka-icon-theme
icons:
	@[ -d /usr/share/icons/Faenza ] && [ -d /usr/share/icons/oxygen ] && [ -d /usr/share/icons/Moka ] \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && echo "installing Debian's icon themes for the colour data set (apt-get)" \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(ICON_PACKAGES)) >/dev/null 2>&1 \
	  || echo "icon themes not installed: the icons tests will skip (apt-get install $(ICON_PACKAGES))"; }

test: $(STAMP) browser icons
	$(BIN)/python -m pytest -q

test-all: $(STAMP) browser icons
	$(BIN)/python -m pytest -q -m ""

# The documentation site (docs/, MkDocs) at http://127.0.0.1:8000; `make test` builds it --strict.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/effusion bench train --out bench

clean:
	rm -rf $(VENV) runs .pytest_cache
