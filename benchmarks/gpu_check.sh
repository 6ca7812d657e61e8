#!/usr/bin/env bash
# One prepared GPU check (issue 6), for a machine with one CUDA GPU; at most
# 150 + 240 + 150 s by its stage timeouts (build, tests, benchmarks), ~6-8 min
# on an H200:
#   1. build and install tallow with TALLOW_CUDA=ON (fails if no nvcc),
#   2. run the GPU tests (tests/gpu, and tests/triton compiled for the GPU),
#   3. run the GPU benchmarks (benchmarks/bench_gpu.py) -> benchmarks/results/<machine>/gpu-*.json
#      and check the targets (results/gpu-targets.json).
#
# Needs a Python with a CUDA build of torch, triton, pybind11,
# scikit-build-core, ninja, pytest, numpy, pillow (PYTHON=..., default
# .venv/bin/python, else python3). Everything it prints also goes to
# benchmarks/results/gpu-check.log.
#
# Env: PYTHON, TALLOW_CUDA_ARCHS (default: the GPU's own, e.g. 90),
#      GPU_CHECK_QUICK=1 (benchmarks --quick), GPU_CHECK_SKIP_BUILD=1.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
LOG=benchmarks/results/gpu-check.log
exec > >(tee "$LOG") 2>&1

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

stamp "environment"
"$PY" - <<'PYEOF' || { echo "FATAL: this Python has no CUDA torch or no GPU"; exit 2; }
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: NOT INSTALLED (triton backend will be skipped)")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not in PATH (CUDACXX may point at it)"

if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]]; then
  ARCHS=${TALLOW_CUDA_ARCHS:-$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}{p.minor}')")}
  stamp "build tallow with CUDA for sm_${ARCHS}"
  TALLOW_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCHS}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    timeout 150 "$PY" -m pip install --quiet --no-build-isolation --no-deps . || { echo "FATAL: build failed"; exit 3; }
fi
"$PY" -m tallow info || { echo "FATAL: tallow does not import"; exit 3; }
"$PY" -c "import tallow, sys; i = tallow.info(); print(i['cuda_module']); sys.exit(0 if i['backends']['cuda'] else 1)" \
  || echo "WARNING: the cuda backend is not usable here (see above); its tests will fail"

stamp "GPU tests"
timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/gpu tests/triton tests/test_gpu_backends.py \
  --durations=10
tests_rc=$?
stamp "GPU tests exit code ${tests_rc}"

stamp "GPU benchmarks"
QUICK=""
[[ "${GPU_CHECK_QUICK:-0}" == 1 ]] && QUICK="--quick"
timeout 150 "$PY" benchmarks/bench_gpu.py $QUICK
bench_rc=$?
stamp "benchmarks exit code ${bench_rc}; results in benchmarks/results/<machine>/gpu-*.json"
ls -l benchmarks/results/*/gpu-* 2>/dev/null
# The record tallow.info()["gpu_kernels"] reads (shipped in the package; commit
# it): written only when the GPU tests passed on this device.
if [[ $tests_rc == 0 ]]; then
  "$PY" - <<'PYEOF'
import json, time, torch
p = torch.cuda.get_device_properties(0)
rec = {"tests_rc": 0, "gpu": f"{p.name} (sm_{p.major}{p.minor})", "torch": torch.__version__,
       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
open("python/tallow/gpu_check.json", "w").write(json.dumps(rec, indent=2) + "\n")
print("wrote python/tallow/gpu_check.json:", rec)
PYEOF
fi
exit $(( tests_rc != 0 ? 1 : (bench_rc != 0 ? 4 : 0) ))
