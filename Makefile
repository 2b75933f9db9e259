# openweight: `make run` starts the local stack, `make test` installs everything and runs every check.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= deploy/examples/local.yaml

.PHONY: install test lint typecheck pytest run router bench clean

# One install step for everything the project and its tests need (vLLM for CPU or GPU, Ray,
# validators for the chart and monitoring). Re-runs when the project's install files change.
$(VENV)/.installed: pyproject.toml cluster/install.sh tools/install-validators.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	bash cluster/install.sh $(VENV)
	bash tools/install-validators.sh --venv $(VENV)
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check router cluster bench openweight tests

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(VENV)/bin/pytest

test: lint typecheck pytest

# The whole local stack on the embedded default model: model preparation, a local Ray cluster with
# one vLLM CPU replica, and the router on 127.0.0.1:8000. Ctrl-C stops everything it started.
run: install
	$(VENV)/bin/openweight run --config $(CONFIG)

# Only the router, in front of whatever the config names.
router: install
	$(VENV)/bin/openweight router --config $(CONFIG)

bench: install
	$(VENV)/bin/openweight bench router

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
