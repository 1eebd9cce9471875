# Two commands do all set-up: `make demo` and `make test`.
# TORCH_SPEC picks the torch build; the default is the CPU build used on CI machines.
# GPU users: `make demo TORCH_SPEC=torch` (or install a CUDA build into .venv first, see README).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medseg demo -o demo_output

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf demo_output .pytest_cache
