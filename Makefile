# Set up a virtual environment with everything the project and its tests need,
# then run the test suite. `make setup` is idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test bench crd

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
	touch $@

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run.py

crd: setup
	$(BIN)/moeshard crd
