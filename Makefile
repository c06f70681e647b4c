# Every target sets itself up: a fresh machine needs only Python 3.11+ and a C compiler.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := $(shell find src -name '*.py' -o -name '*.pyx' -o -name '*.pxi' -o -name '*.pyi' -o -name '*.h') setup.py pyproject.toml

.PHONY: all venv build test torture bench demo demo-journal wheel-test clean lint

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "setuptools>=77" "Cython>=3.1" wheel

# The package is installed (not editable): tests import the built wheel's contents, not src/.
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation ".[test]"
	touch $(STAMP)

venv build: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The long crash and soak runs (marked `torture`; skipped unless PMQ_TORTURE=1).
torture: $(STAMP)
	PMQ_TORTURE=1 $(PY) -m pytest -q -m torture tests

bench: $(STAMP)
	$(PY) bench/report.py

# Two cage processes, thousands of queued calls, both killed with SIGKILL and restarted; then
# the tally (made, accepted, executed, duplicates, dead, lost) and the throughput.
demo: $(STAMP)
	$(PY) -m pmq._demo

demo-journal: $(STAMP)
	$(PY) bench/demo_journal.py

# The suite against the built wheel in a fresh virtual environment, with no src/ on the path
# (CI's tests job, locally): scripts/wheel_test.sh builds the sdist and a wheel from it into
# dist/. Arguments for pytest: make wheel-test ARGS="-x -k cage".
wheel-test:
	PYTHON=$(PYTHON) bash scripts/wheel_test.sh $(ARGS)

# CI's lint job, with the versions .pre-commit-config.yaml pins, installed from PyPI (pre-commit
# itself would clone the hooks from GitHub).
LINTERS := ruff==0.17.0 cython-lint==0.17.0 pycodestyle codespell==2.4.3 validate-pyproject==0.26 mypy
lint: $(STAMP)
	$(PY) -m pip install --quiet $(LINTERS)
	$(VENV)/bin/ruff check src tests bench
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cython-lint --max-line-length=100 src/pmq/*.pyx src/pmq/*.pxi
	$(VENV)/bin/codespell --ignore-words-list=bu,caf --skip='src/pmq/_vendor,*.c' src tests bench docs README.md
	$(VENV)/bin/validate-pyproject pyproject.toml
	$(PY) -m mypy --strict src/pmq
	$(PY) -m mypy.stubtest pmq._journal --allowlist stubtest-allowlist.txt

clean:
	rm -rf build dist $(VENV) src/pmq/_journal.c src/pmq/*.so *.egg-info src/*.egg-info
