# Two entry points on a fresh machine (see README):
#   make demo   install into .venv and run the main job on the bundled data
#   make test   install into .venv (with test extras) and .venv-slicer, and run the whole test suite
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

# The 3D Slicer module's logic is tested on real MRML from the slicer-core package, in its own environment
# (slicer-core pins vtk; torch again from the same pinned build).
SLICER_VENV ?= .venv-slicer
SLICER_BIN := $(SLICER_VENV)/bin

$(SLICER_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SLICER_VENV)
	$(SLICER_BIN)/python -m pip install --quiet --upgrade pip
	$(SLICER_BIN)/python -m pip install --quiet "$(TORCH)"
	$(SLICER_BIN)/python -m pip install --quiet slicer-core pytest -e .
	touch $@

install: $(BIN)/.installed

demo: install
	mkdir -p demo_output
	$(BIN)/geomed demo --output demo_output

test: install $(SLICER_BIN)/.installed
	mkdir -p $(KEOPS_CACHE_FOLDER)
	$(BIN)/python -m pytest
	$(SLICER_BIN)/python -m pytest -p no:cacheprovider tests/slicer

clean:
	rm -rf $(VENV) $(SLICER_VENV) build demo_output .pytest_cache .hypothesis
