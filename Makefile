# The README's two commands. Each sets up .venv by itself the first time, and again only when pyproject.toml (or
# this file) changes:
#   make demo   # the whole system on this machine (`isles demo --quick`); prints where its picture is
#   make test   # the test suite (`python -m pytest -q`); ARGS="-k wheel -x" passes arguments on to pytest
# torch: the pinned build below is installed into .venv, except on a GPU machine (nvidia-smi works) whose .venv
# already has a torch: install your CUDA build there first (`.venv/bin/pip install torch`) and it is left alone.
# Another torch: make TORCH="torch==2.13.0 --index-url <your index>" demo

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.isles-installed
DEMO_DIR := demo-out
ARGS ?=

.PHONY: help demo test

help:
	@echo "make demo   the whole system on this machine (~1-2 min); prints where its picture is"
	@echo "make test   the test suite"

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/isles demo --quick --work-dir $(DEMO_DIR)
	@echo "The demo's picture: $(CURDIR)/$(DEMO_DIR)/samples.png"

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "isles needs Python >= 3.10; name one with: make PYTHON=python3.11 ..."; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	@if nvidia-smi > /dev/null 2>&1 && $(VENV)/bin/python -c 'import torch' 2> /dev/null; then \
		echo "GPU machine: keeping torch $$($(VENV)/bin/python -c 'import torch; print(torch.__version__)') in $(VENV)"; \
	else \
		echo "$(VENV)/bin/python -m pip install -q $(TORCH)"; \
		$(VENV)/bin/python -m pip install -q $(TORCH); \
	fi
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)
