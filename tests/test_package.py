"""The package itself: import without the native module, info, threads, ISA, dispatch."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tallow
from tallow._dispatch import BackendUnavailable, dispatch
from tallow.testing import available_isas

# Blocks tallow._C the way a missing or broken build would.
_BLOCK_NATIVE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "tallow._C":
                raise ImportError("simulated: tallow._C was not built")
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_import_works_without_native_module_and_first_call_says_why():
    code = _BLOCK_NATIVE + textwrap.dedent(
        """
        import json, warnings, torch, tallow
        report = tallow.info()
        try:
            tallow.get_num_threads()
            raised = None
        except tallow.NativeUnavailableError as exc:
            raised = str(exc)
        # An auto-chosen backend falls back to the torch reference, with a warning.
        q = torch.randn(1, 2, 3, 32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = tallow.ops.attention(q, q, q)
        ok = torch.allclose(out, tallow.ops.attention_ref(q, q, q))
        print(json.dumps({"native": report["native"], "raised": raised, "ok": ok,
                          "warnings": [str(w.message) for w in caught]}))
        """
    )
    proc = _run(code, {"TALLOW_BACKEND": ""})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["native"]["available"] is False
    assert "simulated: tallow._C was not built" in result["native"]["error"]
    assert result["raised"] and "simulated: tallow._C was not built" in result["raised"]
    assert result["ok"] is True
    assert any("falling back" in w for w in result["warnings"])


def test_explicit_backend_without_native_module_raises():
    code = _BLOCK_NATIVE + textwrap.dedent(
        """
        import torch, tallow
        q = torch.randn(1, 1, 2, 32)
        try:
            tallow.ops.attention(q, q, q)
        except tallow.BackendUnavailable as exc:
            print("RAISED", exc)
        """
    )
    proc = _run(code, {"TALLOW_BACKEND": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert "RAISED" in proc.stdout and "TALLOW_BACKEND" in proc.stdout


def test_info_reports_build_isa_threads_and_backends():
    report = tallow.info()
    assert report["version"] == tallow.__version__
    assert report["native"]["available"] is True
    assert report["native"]["isa"] in report["native"]["isa_levels"]
    machine = platform.machine().lower()
    expected_arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
    assert report["native"]["arch"] == expected_arch.get(machine, "other")
    assert report["native"]["threads"] == tallow.get_num_threads() >= 1
    assert report["backends"]["ref"] is True and report["backends"]["cpu"] is True


def test_cli_info_prints_the_same_report():
    proc = subprocess.run([sys.executable, "-m", "tallow", "info", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["native"]["isa"] == tallow.get_isa()
    text = subprocess.run([sys.executable, "-m", "tallow", "info"], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "isa" in text.stdout and "threads" in text.stdout


def test_thread_count_api_and_env():
    before = tallow.get_num_threads()
    try:
        tallow.set_num_threads(1)
        assert tallow.get_num_threads() == 1
        tallow.set_num_threads(3)
        assert tallow.get_num_threads() == 3
    finally:
        tallow.set_num_threads(before)
    with pytest.raises(ValueError, match="n must be"):
        tallow.set_num_threads(0)
    proc = _run("import tallow; print(tallow.get_num_threads())", {"TALLOW_NUM_THREADS": "5"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"


def test_isa_override_env_and_api():
    best = tallow.native().best_isa()
    proc = _run("import tallow; print(tallow.get_isa())", {"TALLOW_ISA": "scalar"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "scalar"
    with pytest.raises(ValueError, match="unknown ISA"):
        tallow.set_isa("sse9")
    # Every tier this CPU cannot run (higher ones, or another architecture's) is refused by name.
    for name in ("avx2", "avx512_vnni", "neon"):
        if name not in available_isas():
            with pytest.raises(ValueError, match="supports at most"):
                tallow.set_isa(name)
    assert best == available_isas()[-1]
    previous = tallow.get_isa()
    try:
        tallow.set_isa("scalar")
        assert tallow.get_isa() == "scalar"
    finally:
        tallow.set_isa(previous)


def test_dispatch_falls_back_only_for_auto_choice(monkeypatch):
    calls = []

    def broken(x):
        calls.append("cpu")
        raise BackendUnavailable("no kernel for this case")

    def ref(x):
        calls.append("ref")
        return x + 1

    order = {"cpu": ("cpu", "ref")}
    monkeypatch.delenv("TALLOW_BACKEND", raising=False)
    with pytest.warns(tallow.BackendFallbackWarning, match="no kernel for this case"):
        assert dispatch("demo_op", "cpu", order, {"cpu": broken, "ref": ref}, 1) == 2
    assert calls == ["cpu", "ref"]

    monkeypatch.setenv("TALLOW_BACKEND", "cpu")
    with pytest.raises(BackendUnavailable, match="no kernel"):
        dispatch("demo_op", "cpu", order, {"cpu": broken, "ref": ref}, 1)

    monkeypatch.setenv("TALLOW_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TALLOW_BACKEND='bogus'"):
        dispatch("demo_op", "cpu", order, {"cpu": broken, "ref": ref}, 1)


def test_dispatch_never_swallows_input_errors(monkeypatch):
    def strict(x):
        raise ValueError("x must be positive")

    monkeypatch.delenv("TALLOW_BACKEND", raising=False)
    with pytest.raises(ValueError, match="x must be positive"):
        dispatch("demo_op", "cpu", {"cpu": ("cpu",)}, {"cpu": strict, "ref": lambda x: x}, -1)


def test_forced_ref_backend_runs_the_reference(force_backend):
    force_backend("ref")
    q = torch.randn(1, 2, 5, 32)
    torch.testing.assert_close(tallow.ops.attention(q, q, q), tallow.ops.attention_ref(q, q, q), rtol=0, atol=0)


def _omp_policy_after_import(env_extra: dict) -> str:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TALLOW_SET_OMP_WAIT_POLICY")}
    env.update(env_extra)
    code = "import os, tallow; print(os.environ.get('OMP_WAIT_POLICY', '<unset>'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def test_omp_wait_policy_default_and_opt_out():
    """import tallow sets OMP_WAIT_POLICY=PASSIVE by default; the user's own value
    wins; TALLOW_SET_OMP_WAIT_POLICY=0 leaves the process environment alone."""
    assert _omp_policy_after_import({}) == "PASSIVE"
    assert _omp_policy_after_import({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert _omp_policy_after_import({"TALLOW_SET_OMP_WAIT_POLICY": "0"}) == "<unset>"
    assert _omp_policy_after_import({"TALLOW_SET_OMP_WAIT_POLICY": "false"}) == "<unset>"
    assert _omp_policy_after_import({"TALLOW_SET_OMP_WAIT_POLICY": "1"}) == "PASSIVE"


def test_info_is_honest_about_the_gpu_kernels(monkeypatch, tmp_path):
    from pathlib import Path

    from tallow import _gpu

    record = Path(_gpu.__file__).with_name("gpu_check.json")
    if not record.exists():
        assert tallow.info()["gpu_kernels"].startswith("compiled and interpreter-tested only; never run on a GPU")
    # the record gpu_check.sh writes after passing GPU tests turns it around
    fake = tmp_path / "_gpu.py"
    fake.write_text("")
    monkeypatch.setattr(_gpu, "__file__", str(fake))
    assert "never run on a GPU" in _gpu.gpu_kernels_status()
    (tmp_path / "gpu_check.json").write_text('{"tests_rc": 0, "gpu": "NVIDIA H200 (sm_90)", "date": "2026-12-03"}')
    assert _gpu.gpu_kernels_status().startswith("run on a GPU: benchmarks/gpu_check.sh passed its GPU tests on NVIDIA H200")
    (tmp_path / "gpu_check.json").write_text('{"tests_rc": 1}')
    assert "never run on a GPU" in _gpu.gpu_kernels_status()


# ------------------------------------------------ a build without the kernels must not pass quietly

REPO = str(Path(__file__).resolve().parents[1])


def _pytest_without_native(files: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    """Runs pytest on `files` in a subprocess where tallow._C fails to import."""
    code = _BLOCK_NATIVE + "import pytest, sys\nsys.exit(pytest.main(sys.argv[1:]))\n"
    env = {k: v for k, v in os.environ.items() if k != "TALLOW_ALLOW_NO_NATIVE"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code, *files, "-q", "-p", "no:cacheprovider", "-rfEs"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def _outcomes(stdout: str) -> dict[str, int]:
    """{'passed': 3, 'failed': 1, 'error': 2, ...} from pytest's last summary line."""
    last = stdout.strip().splitlines()[-1]
    found = {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last)}
    assert found, f"no pytest summary in:\n{stdout[-3000:]}"
    return found


def test_the_kernel_tests_fail_when_the_native_module_does_not_load():
    """A broken or missing tallow._C must turn the op tests red, with the load error shown, never into a
    green run of skips."""
    proc = _pytest_without_native(["tests/ops/test_preprocess.py", "tests/ops/test_attention.py"], {})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    outcomes = _outcomes(proc.stdout)
    assert "skipped" not in outcomes and "passed" not in outcomes, outcomes
    assert outcomes.get("error", 0) + outcomes.get("failed", 0) >= 80, outcomes
    assert "tallow._C did not load: ImportError: simulated: tallow._C was not built" in out
    assert "TALLOW_ALLOW_NO_NATIVE=1" in out  # and how to run without the kernels on purpose


def test_allow_no_native_skips_the_kernel_tests_and_says_why():
    proc = _pytest_without_native(["tests/ops/test_preprocess.py"], {"TALLOW_ALLOW_NO_NATIVE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert set(_outcomes(proc.stdout)) == {"skipped"}, out[-3000:]
    assert "simulated: tallow._C was not built (TALLOW_ALLOW_NO_NATIVE is set)" in out


# ------------------------------------------------ each tier needs what its compile flags enable

# CPU feature (as the native module names it) behind each ISA flag of CMakeLists.txt.
_FLAG_FEATURES = {
    "-mavx": ["avx"], "-mavx2": ["avx2"], "-mfma": ["fma"], "-mf16c": ["f16c"], "-mbmi": ["bmi1"],
    "-mbmi2": ["bmi2"], "-mpopcnt": ["popcnt"], "-mavx512f": ["avx512f"], "-mavx512dq": ["avx512dq"],
    "-mavx512bw": ["avx512bw"], "-mavx512vl": ["avx512vl"], "-mavx512vnni": ["avx512_vnni"],
    "-march=armv8.2-a+dotprod": ["asimd", "asimddp"],
}
# The x86 compiler's predefined macro for each extension a flag set turns on, implied ones included.
_MACRO_FEATURES = {
    "__SSE3__": "sse3", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__CRC32__": "sse4_2", "__POPCNT__": "popcnt", "__XSAVE__": "xsave", "__AVX__": "avx", "__AVX2__": "avx2",
    "__FMA__": "fma", "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__AVX512F__": "avx512f",
    "__AVX512DQ__": "avx512dq", "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl",
    "__AVX512VNNI__": "avx512_vnni", "__EVEX256__": "avx512f", "__EVEX512__": "avx512f",
}
_NOT_ISA_MACRO = re.compile(r"__BIGGEST_ALIGNMENT__|__FP_FAST_FMA\w*|__GCC_\w+|__(FLT|DBL|LDBL)\w*")
_SUFFIX_TIER = {"avx2": "avx2", "avx512": "avx512_vnni", "neon": "neon"}


def _cmake_isa_flags() -> dict[str, list[str]]:
    """{tier: flags} from CMakeLists.txt's set(TALLOW_<SUFFIX>_FLAGS ...)."""
    text = Path(REPO, "CMakeLists.txt").read_text()
    found = {_SUFFIX_TIER[s.lower()]: flags.split() for s, flags in
             re.findall(r"set\(TALLOW_(AVX2|AVX512|NEON)_FLAGS ([^)]*)\)", text)}
    assert set(found) == set(_SUFFIX_TIER.values()), found
    return found


def test_the_kernel_check_builds_each_tier_with_the_modules_flags():
    text = Path(REPO, "Makefile").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("KC_ISAFLAGS"))
    make = {_SUFFIX_TIER[s]: flags.split() for s, flags in re.findall(r"%_(\w+)\.o,\$@\),([^,$)]+)", line)}
    assert make == _cmake_isa_flags()


def test_each_tier_requires_every_feature_its_compile_flags_enable():
    """A tier whose files are compiled with -mf16c must not be picked on a CPU without F16C: the compiler may
    emit those instructions anywhere in the tier's code (SIGILL)."""
    required = tallow.native().isa_requirements()
    levels = tallow.native().isa_levels()
    assert set(required) == set(levels) and required["scalar"] == []
    flags = _cmake_isa_flags()
    for tier in levels[1:]:
        unknown = [f for f in flags[tier] if f not in _FLAG_FEATURES]
        assert not unknown, f"CMakeLists.txt builds {tier} with {unknown}: map them here and check the matching " \
                            "CPU features in isa_supported (csrc/common/cpu_features.cpp)"
        wanted = {feat for f in flags[tier] for feat in _FLAG_FEATURES[f]}
        missing = wanted - set(required[tier])
        assert not missing, f"{tier} is compiled with {flags[tier]} but does not require {sorted(missing)}"
    # and the tier picked here is the highest whose requirements this CPU reports
    report = tallow.native().cpu_features()
    features = set(report.split())
    best = levels.index(tallow.native().best_isa())
    for i, tier in enumerate(levels[1:], 1):
        has_all = set(required[tier]) - {"os_ymm", "os_zmm"} <= features
        if i <= best:
            assert has_all, f"{tier} is used but needs {required[tier]}; this CPU has {report}"
        else:
            assert not has_all or "os-disabled" in report, f"this CPU has all {tier} needs ({report}) but it is " \
                                                            "not used"


def test_each_x86_tier_requires_what_the_compiler_may_emit_for_its_flags():
    """The same, through the compiler: every instruction-set macro the tier's flags define, implied ones
    included (-mavx2 turns on AVX, SSE4.2, POPCNT...)."""
    if tallow.native().arch() != "x86_64":
        pytest.skip("the macro map is for x86-64; the flag check above covers this architecture")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to ask which extensions the flags enable")

    def macros(flags: list[str]) -> set[str]:
        proc = subprocess.run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        return {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("#define ")}

    base = macros([])
    required = tallow.native().isa_requirements()
    flags = _cmake_isa_flags()
    for tier in ("avx2", "avx512_vnni"):
        new = {m for m in macros(flags[tier]) - base if not _NOT_ISA_MACRO.fullmatch(m)}
        unknown = sorted(new - set(_MACRO_FEATURES))
        assert not unknown, f"{cxx} {' '.join(flags[tier])} also enables {unknown}: map them to CPU features " \
                            "here and check those in isa_supported"
        missing = {_MACRO_FEATURES[m] for m in new} - set(required[tier])
        assert not missing, f"{tier}: its flags enable {sorted(missing)}, which isa_supported does not check"
