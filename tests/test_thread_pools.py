"""One thread pool at a time: while tallow's native encoder forward runs,
torch's OpenMP team (already started by a torch op) stays parked — whatever
was imported first. Decided by CPU time per thread (/proc/self/task), not
by wall-clock speed: the per-op path, which interleaves torch ops with
tallow's kernels, lets torch's threads busy-wait through every layer (they
then use ~0.5-1x the CPU time of tallow's own threads); the native path
leaves them idle."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tallow.testing import require_native

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")

SCRIPT = textwrap.dedent("""
    import json, os, sys, threading
    order, path = sys.argv[1], sys.argv[2]
    if order == "torch-first":
        import torch
        import tallow
    else:
        import tallow
        import torch
    from tallow.models import load

    def cpu_ticks():
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
            except FileNotFoundError:  # the thread ended meanwhile
                continue
            out[int(tid)] = (name, int(fields[11]) + int(fields[12]))  # utime + stime
        return out

    model = load(path)
    if os.environ.get("PER_OP"):
        model.bert.native = None
    sentences = [f"sentence number {i} " + "with a few more words " * (i % 7) for i in range(32)]
    ids = model.tokenizer.encode_ids(sentences)
    model.embed_ids(ids)
    x = torch.randn(1500, 1500)
    (x @ x + x).sum()  # torch's OpenMP team has run and may now spin
    before = cpu_ticks()
    for _ in range(int(os.environ.get("ROUNDS", "6"))):
        model.embed_ids(ids)
    after = cpu_ticks()
    main = threading.get_native_id()
    used = {"main": 0, "tallow": 0, "other": 0}
    for tid, (name, ticks) in after.items():
        d = ticks - before.get(tid, (name, 0))[1]
        used["main" if tid == main else "tallow" if name == "tallow-pool" else "other"] += d
    print(json.dumps(used))
""")


def _cpu_split(order: str, path: Path, per_op: bool = False) -> dict:
    import os

    env = {**os.environ, "TALLOW_NUM_THREADS": "2", **({"PER_OP": "1"} if per_op else {})}
    env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, order, str(path)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["torch-first", "tallow-first"])
def test_torch_threads_stay_idle_during_native_forwards(minilm_dir, order):
    require_native()
    used = _cpu_split(order, minilm_dir)
    ours = used["main"] + used["tallow"]
    assert ours > 0, used
    assert used["other"] <= 0.1 * ours, f"torch's threads used {used['other']} of {ours} ticks: {used}"


def test_the_per_op_path_shows_what_the_check_catches(minilm_dir):
    """The same measurement on the per-op path, torch imported first: torch's
    team busy-waits between the layers' torch ops (so the check above can fail)."""
    require_native()
    used = _cpu_split("torch-first", minilm_dir, per_op=True)
    assert used["other"] > 0.1 * (used["main"] + used["tallow"]), used
