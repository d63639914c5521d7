# heatmapbench — two commands from a fresh clone:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 5000
STORE := sqlite:///$(CURDIR)/mlruns/mlflow.db
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: help setup data demo test test-fast lint bench ui docs docs-serve clean

help:
	@echo "make demo   set up .venv, get Fashion-MNIST, train the small CNN with AOPC tracking"
	@echo "make test   set up .venv, get Fashion-MNIST, run the test suite"
	@echo "make ui     serve the MLflow UI for mlruns/ on http://127.0.0.1:$(PORT) (saves the answer-first chart view, prints the links)"
	@echo "make lint   check the code with ruff (the rules are listed and explained in pyproject.toml)"
	@echo "make bench  run the benchmarks in benches/ (installs the peers first)"
	@echo "make docs   build the documentation site into site/ (strict: a broken link fails); docs-serve serves it"

setup: $(VENV)/.installed

# Exact versions from constraints.txt (torch==2.14.1 / torchvision==0.29.1: pip takes them from disk);
# pyproject.toml declares the ranges the wheel accepts.
$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3.x"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,zoo,launchers]'
	touch $@

# Offline source of the default data: Debian's dataset-fashion-mnist (needs root + apt-get).
# Online users without it get torchvision's download (data.download=true).
data:
	@if [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "warning: could not install dataset-fashion-mnist; will try torchvision's download"; \
	else \
	  echo "note: no Debian Fashion-MNIST; the demo will download it (data.download=true)"; \
	fi

demo: setup data
	$(BIN)/python -m heatmapbench.app.train experiment=demo $(ARGS)

test: setup data
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: setup data
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# ruff with the rule set of pyproject.toml ([tool.ruff.lint], each rule explained there)
$(VENV)/.lint-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[lint]'
	touch $@

lint: $(VENV)/.lint-installed
	$(BIN)/ruff check src tests benches scripts .ci

bench: setup
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	for f in benches/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# The docs extra (MkDocs, Material, mkdocstrings) into .venv, once per change of pyproject.toml.
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[docs]'
	touch $@

# Strict: a broken link, a missing anchor or an unresolved reference fails the build. The site
# works offline (no web fonts, no external scripts; checked after the build).
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/python scripts/docs_offline_check.py site

docs-serve: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:8000

ui: setup
	@mkdir -p mlruns/artifacts
	@$(BIN)/python -m heatmapbench.app.ui --tracking-uri $(STORE) --port $(PORT)
	$(BIN)/mlflow ui --backend-store-uri $(STORE) --default-artifact-root $(CURDIR)/mlruns/artifacts \
	  --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf outputs multirun .pytest_cache site
