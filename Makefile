# Set up a virtual environment with everything the project and its tests need,
# then run the test suite. `make setup` is idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test bench crd images

# Container images (buildah or docker/podman: BUILD="docker build"), tagged with the
# package version from pyproject.toml. Extra flags (a BASE, volumes) go in IMAGE_FLAGS.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BUILD ?= buildah build
IMAGE_FLAGS ?=
OPERATOR_IMAGE ?= ghcr.io/moeshard/operator:$(VERSION)
# TORCH=cpu builds the engine on PyTorch's CPU wheel and tags it VERSION-cpu.
TORCH ?= cuda
ENGINE_IMAGE ?= ghcr.io/moeshard/engine:$(VERSION)$(if $(filter cpu,$(TORCH)),-cpu)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# Prometheus (Debian package) for the balancer's end-to-end tests; root only.
	@if ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
	      || echo "warning: could not install prometheus; its tests will be skipped"; \
	  else echo "note: install Debian's 'prometheus' package to run the balancer's end-to-end tests"; fi; \
	fi
	@# checkov (policy scanner of the rendered engine pods, tests/test_operator/test_hardening.py) in a venv
	@# of its own: its pins (packaging<24, python-dateutil<3) clash with pytest 9 and kubernetes 37.
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q checkov || echo "warning: could not install checkov; its test will be skipped"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run.py

crd: setup
	$(BIN)/moeshard crd

# The operator image and the engine image (CUDA torch; `make images TORCH=cpu` for CPU clusters).
images:
	$(BUILD) $(IMAGE_FLAGS) -f images/operator/Containerfile -t $(OPERATOR_IMAGE) .
	$(BUILD) $(IMAGE_FLAGS) -f images/engine/Containerfile --build-arg TORCH=$(TORCH) -t $(ENGINE_IMAGE) .
