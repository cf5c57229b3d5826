# The two commands of the README. Each one installs what it needs first (idempotent).
.PHONY: install demo test lint bench

VENV ?= .venv

install:
	bash scripts/install.sh

# the main job: for now, cache the built-in openclipart data with the default encoders
demo: install
	$(VENV)/bin/anybind extract --encoder efficientnet-lite0 --data openclipart
	$(VENV)/bin/anybind extract --encoder minilm-l6 --data openclipart --layers 3,final
	$(VENV)/bin/anybind cache ls

test: install
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(VENV)/bin/python benchmarks/extract_throughput.py
