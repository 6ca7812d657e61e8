"""The C++ kernels on aarch64, proven from an x86 machine.

``make check-aarch64`` cross-compiles the kernel sources (scalar + NEON) with
Debian's aarch64-linux-gnu-g++ together with the stand-alone driver
csrc/tests/kernel_check.cpp and runs it under ``qemu-aarch64-static -cpu max``
(a CPU with asimddp and i8mm): every kernel on every tier against scalar
references (int8 GEMM exact, attention vs float64, preprocess bit-identical
to the scalar tier), plus a check that the NEON tier is the one selected.
On an aarch64 machine the same target builds and runs natively.

``make tools`` installs the cross compiler and qemu with apt-get. Where it
could have (apt-get and root or passwordless sudo) a missing tool fails this
test: a skip must not hide a broken set-up. Elsewhere it skips and says why.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NATIVE = platform.machine().lower() in ("aarch64", "arm64")
TOOLS = [] if NATIVE else ["aarch64-linux-gnu-g++", "qemu-aarch64-static"]


def _can_install() -> bool:
    """Whether `make tools` could apt-get install the cross tools here."""
    if shutil.which("apt-get") is None:
        return False
    if os.geteuid() == 0:
        return True
    if shutil.which("sudo") is None:
        return False
    return subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


def _require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if shutil.which("make") is None:
        missing.append("make")
    if not missing:
        return
    why = f"{', '.join(missing)} not found"
    if _can_install():
        pytest.fail(f"{why}: run `make tools` (make test does), which installs g++-aarch64-linux-gnu and "
                    "qemu-user-static with apt-get here")
    pytest.skip(f"{why} and no apt-get with root/sudo to install them (`make tools`): the aarch64 kernel "
                "check (cross-compiled, under qemu) cannot run on this machine")


def test_kernels_on_aarch64():
    _require_tools()
    proc = subprocess.run(["make", "-s", "-j2", "check-aarch64"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"make check-aarch64 failed (exit {proc.returncode}):\n{out[-6000:]}"
    assert "arch aarch64" in out, out[-3000:]
    # qemu -cpu max (and every aarch64 CPU worth a NEON tier) reports asimddp:
    # the driver itself fails if neon is then not chosen; this pins the output.
    assert "best_isa: neon" in out, out[-3000:]
    for op in ("int8_matmul", "quantize", "int8_linear", "attention", "preprocess"):
        assert any(line.split()[:2] == [op, "neon"] for line in out.splitlines()), f"no {op} neon row:\n{out[-3000:]}"
    assert "kernel_check (aarch64, best_isa neon): all passed" in out, out[-3000:]


@pytest.mark.skipif(NATIVE, reason="qemu's CPU models are for the cross check; natively the CPU is what it is")
def test_kernels_on_aarch64_without_dotprod():
    """An ARMv8.0 core (Cortex-A72: asimd, no asimddp, e.g. Raspberry Pi 4, Graviton 1) must get the scalar
    tier and never execute an SDOT (qemu would raise SIGILL)."""
    _require_tools()
    build = subprocess.run(["make", "-s", "-j2", "build/kcheck-aarch64/kernel_check"], cwd=REPO, capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    proc = subprocess.run(["qemu-aarch64-static", "-cpu", "cortex-a72", "build/kcheck-aarch64/kernel_check"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-6000:]}"
    assert "supported ISAs: scalar; best_isa: scalar" in out, out[-3000:]
    assert "kernel_check (aarch64, best_isa scalar): all passed" in out, out[-3000:]
