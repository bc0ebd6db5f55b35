# Two commands for a fresh machine: `make run` (install + serve on embedded defaults) and
# `make test` (install + run the tests). `.ci/run` calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test check bench schema

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'

run: install
	$(PY) -m inbox serve

test: install
	$(PY) -m pytest -q -p no:cacheprovider

check: install
	$(VENV)/bin/ruff check inbox tests bench
	$(VENV)/bin/mypy inbox

bench: install
	$(PY) bench/send.py

schema: install
	$(PY) -m inbox schema > schema.graphql
