"""The package itself: import without the native module, info, threads, ISA, dispatch."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

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
