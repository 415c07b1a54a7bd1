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

# nnU-Net v2 for the trainers' tests (monai_losses.nnunet). Its dependency dynamic-network-architectures wants timm,
# hence torchvision, whose wheels here would replace the pinned CPU torch: nnU-Net's own packages go in without their
# dependencies, then the others (nnU-Net finds geomed's trainers before the timm-based ones it cannot import).
NNUNET := nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 acvl-utils==0.2.6 batchgeneratorsv2==0.3.6 \
	batchgenerators==0.25.5
NNUNET_DEPS := tqdm scipy scikit-learn scikit-image SimpleITK pandas graphviz tifffile requests nibabel matplotlib \
	seaborn imagecodecs yacs einops "blosc2>=3.3.2" connected-components-3d pillow future unittest2 threadpoolctl

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(NNUNET)
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(NNUNET_DEPS)
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
