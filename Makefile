# Thin targets: each calls the CLI (or pytest). Variables: PYTHON, DATA, DEVICE, RECIPE, RUN.
PYTHON ?= python

.PHONY: install test

install:
	$(PYTHON) -m pip install torch==2.13.0 -e ".[test]"

test:
	$(PYTHON) -m pytest -q
