# Two commands on a fresh machine (see README):
#   make demo   - set up .venv if needed, then run the main job
#   make test   - set up .venv if needed, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint format

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/main_job.py

test: setup
	$(PY) -m pytest tests

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .
