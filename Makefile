# The two commands of the README. Each one installs what it needs first (idempotent).
.PHONY: install demo test lint bench

VENV ?= .venv

install:
	bash scripts/install.sh

# the main job: the built-in run file (extract, assess, train, evaluate, export, report)
demo: install
	$(VENV)/bin/anybind run default --out runs/default

test: install
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(VENV)/bin/python benchmarks/extract_throughput.py
