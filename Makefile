# kamra: `make demo` shows it working, `make test` runs the suite. Both install what they need.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := busybox-static debootstrap zstd tar iproute2 procps util-linux hyperfine
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test lint bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/install_criu.py
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	bash scripts/demo.sh

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -p no:cacheprovider tests $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python bench/lifecycle
	$(BIN)/python bench/network
	$(BIN)/python bench/checkpoint
	$(BIN)/python bench/migrate
