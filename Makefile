# Two entry points on a fresh machine: `make demo` and `make test`. Everything lands in .venv.
PYTHON ?= python3
VENV ?= .venv
# A local CPU wheel on our machines; on a GPU machine with torch already in $(VENV), nothing is reinstalled.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-slow clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" scripts/demo.sh

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) demo-out
