"""``tallow selfcheck`` and ``tallow --version`` (issue 25): what a user runs
on an installed wheel to learn whether it computes right on their CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest

import tallow
from tallow import selfcheck
from tallow.testing import available_isas, require_native

pytestmark = pytest.mark.native


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "tallow", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("isa", available_isas() or ["scalar"])
def test_selfcheck_passes_on_each_isa_this_cpu_runs(isa):
    require_native()
    proc = _cli("selfcheck", "--isa", isa, "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["isa"] == isa and report["failed"] == 0
    assert {r["op"] for r in report["results"]} == set(selfcheck.OPS)  # every op, none skipped


def test_selfcheck_catches_a_wrong_kernel(monkeypatch):
    require_native()
    import tallow.ops

    real = tallow.ops.int8_matmul

    def off_by_one_in_the_last_value(a, b):
        out = real(a, b).clone()
        out.view(-1)[-1] += 1
        return out

    monkeypatch.setattr(tallow.ops, "int8_matmul", off_by_one_in_the_last_value)
    _, results = selfcheck.run()
    bad = {(r.op, r.ok) for r in results if r.op == "int8_matmul"}
    assert (("int8_matmul", False) in bad), results
    assert all(r.ok for r in results if r.op != "int8_matmul")


def test_selfcheck_reports_a_crash_as_a_failure_and_restores_the_isa(monkeypatch):
    require_native()
    import tallow.ops

    def boom(*args, **kwargs):
        raise RuntimeError("simulated kernel crash")

    before = tallow.get_isa()
    monkeypatch.setattr(tallow.ops, "attention", boom)
    _, results = selfcheck.run("scalar")
    failed = [r for r in results if not r.ok]
    assert failed and all(r.op == "attention" and "simulated kernel crash" in r.detail for r in failed)
    assert tallow.get_isa() == before


def test_selfcheck_refuses_an_isa_this_cpu_lacks():
    require_native()
    proc = _cli("selfcheck", "--isa", "no-such-isa")
    assert proc.returncode == 2 and "selfcheck: error" in proc.stderr and "Traceback" not in proc.stderr


def test_version_has_one_source():
    from tallow._version import __version__

    assert tallow.__version__ == __version__ == metadata.version("tallow")  # pyproject reads _version.py
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"tallow {__version__}"
    assert tallow.info()["version"] == __version__
