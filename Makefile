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

# SMTP listens on 25/587/465 by default, which needs root (or a kernel that lets anyone bind
# them). For anyone else `make run` moves each SMTP port not set in the environment to
# 2525/2587/2465 and says so. LOW_PORTS=yes|no overrides the check.
LOW_PORTS ?= $(shell if [ "$$(id -u)" = 0 ] || [ "$$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024)" -le 25 ]; then echo yes; else echo no; fi)

run: install
	@if [ "$(LOW_PORTS)" != yes ]; then \
	  moved=""; \
	  if [ -z "$${SMTP_TRANSFER_PORT+set}" ]; then export SMTP_TRANSFER_PORT=2525; moved="$$moved SMTP_TRANSFER_PORT=2525"; fi; \
	  if [ -z "$${SMTP_SUBMISSION_PORT+set}" ]; then export SMTP_SUBMISSION_PORT=2587; moved="$$moved SMTP_SUBMISSION_PORT=2587"; fi; \
	  if [ -z "$${SMTP_SUBMISSIONS_PORT+set}" ]; then export SMTP_SUBMISSIONS_PORT=2465; moved="$$moved SMTP_SUBMISSIONS_PORT=2465"; fi; \
	  if [ -n "$$moved" ]; then echo "make run: not root, so SMTP listens on unprivileged ports:$$moved (set them to choose others)"; fi; \
	fi; \
	exec $(PY) -m inbox serve

test: install
	$(PY) -m pytest -q -p no:cacheprovider

check: install
	$(VENV)/bin/ruff check inbox tests bench
	$(VENV)/bin/mypy inbox

bench: install
	$(PY) bench/send.py

schema: install
	$(PY) -m inbox schema > schema.graphql
