# Two entry points on a fresh machine (see README):
#   make demo   install into .venv and run the main job on the bundled data
#   make test   install into .venv (with test extras) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here only (a CPU build on these machines); the package accepts any recent torch.
TORCH ?= torch==2.13.0
# KeOps compiles its formulas into this folder, inside the build tree.
export KEOPS_CACHE_FOLDER := $(CURDIR)/build/keops-cache

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	mkdir -p demo_output
	$(BIN)/geomed demo --output demo_output

test: install
	mkdir -p $(KEOPS_CACHE_FOLDER)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build demo_output .pytest_cache .hypothesis
