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
    if hasattr(model, "bert"):  # an encoder: batches of sentences
        if os.environ.get("PER_OP"):
            model.bert.native = None
        sentences = [f"sentence number {i} " + "with a few more words " * (i % 7) for i in range(32)]
        ids = model.tokenizer.encode_ids(sentences)
        work = lambda: model.embed_ids(ids)
    else:  # a decoder: prefill and decode through the scheduler
        from tallow.models.generation import SamplingParams
        if os.environ.get("PER_OP"):
            model.native = None
        prompts = [[(7 * i + j) % 250 + 1 for j in range(24 + 8 * i)] for i in range(4)]
        params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_eos=False)
        work = lambda: list(model.generate_ids(prompts, params))
    work()
    x = torch.randn(1500, 1500)
    (x @ x + x).sum()  # torch's OpenMP team has run and may now spin
    before = cpu_ticks()
    for _ in range(int(os.environ.get("ROUNDS", "6"))):
        work()
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


@pytest.fixture(scope="module")
def gpt2_like_dir(tmp_path_factory):
    """A random GPT-2 large enough that torch's ops would go parallel (hidden 256)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpt2-threads")
    GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256, n_positions=256,
                               bos_token_id=0, eos_token_id=0)).eval().save_pretrained(out)
    return out


@pytest.mark.parametrize("order", ["torch-first", "tallow-first"])
@pytest.mark.parametrize("model", ["encoder", "decoder"])
def test_torch_threads_stay_idle_during_native_forwards(minilm_dir, gpt2_like_dir, order, model):
    require_native()
    used = _cpu_split(order, minilm_dir if model == "encoder" else gpt2_like_dir)
    ours = used["main"] + used["tallow"]
    assert ours > 0, used
    assert used["other"] <= 0.1 * ours, f"torch's threads used {used['other']} of {ours} ticks: {used}"


def test_the_per_op_path_shows_what_the_check_catches(minilm_dir):
    """The same measurement on the per-op path, torch imported first: torch's
    team busy-waits between the layers' torch ops (so the check above can fail)."""
    require_native()
    used = _cpu_split("torch-first", minilm_dir, per_op=True)
    assert used["other"] > 0.1 * (used["main"] + used["tallow"]), used
