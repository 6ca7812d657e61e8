"""One comparison helper for kernels: max error, where it is, NaN/inf disagreement.

Used by tallow's tests and benchmarks; handy for users checking a backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

def libsql_available() -> bool:
    """Whether the store runs on the libsql package here (not on the stdlib's
    sqlite3 fallback, as on aarch64 where libsql has no build)."""
    from .store.driver import driver

    return driver().has_libsql


def needs_libsql():
    """A skip mark for tests of what only libSQL has (embedded replicas, the
    native vector index): they skip, with the reason, where the store runs on
    sqlite3. On x86-64 (CI) libsql is installed, so they always run there."""
    import pytest

    return pytest.mark.skipif(not libsql_available(), reason="the libsql package is not installed on this "
                              "platform (no aarch64 build): the store runs on the stdlib's sqlite3")


# Set to 1 to run the suite deliberately without tallow._C (the pure-torch
# parts only): tests marked `native` then skip instead of failing.
ALLOW_NO_NATIVE_ENV = "TALLOW_ALLOW_NO_NATIVE"


def require_native() -> None:
    """For a test that needs tallow._C: returns when it loaded; otherwise
    fails the test with the load error, so a missing or broken build can
    never turn the kernel tests into a green run of skips. Skips instead
    only when TALLOW_ALLOW_NO_NATIVE=1 asks for a run without the kernels.
    (conftest.py calls this for every test marked ``native``.)"""
    import os

    import pytest

    import tallow

    if tallow.native_available():
        return
    why = f"tallow._C did not load: {tallow.native_error()}"
    if os.environ.get(ALLOW_NO_NATIVE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip(f"{why} ({ALLOW_NO_NATIVE_ENV} is set)")
    pytest.fail(f"{why}. Build it (`make install`, or `pip install -e .`), or set {ALLOW_NO_NATIVE_ENV}=1 to "
                "run only the tests that do not need the kernels.", pytrace=False)


# Every ISA tier any build knows, for test parametrization (a test skips the
# ones this CPU or architecture cannot run: see available_isas()).
ALL_ISAS = ("scalar", "avx2", "avx512_vnni", "neon")


def available_isas() -> list[str]:
    """ISAs this CPU can run, lowest first (empty without the native module):
    the build's tiers for its architecture (x86_64: scalar, avx2, avx512_vnni;
    aarch64: scalar, neon) up to the best one this CPU supports."""
    import tallow

    if not tallow.native_available():
        return []
    levels = list(tallow.native().isa_levels())
    best = tallow.native().best_isa()
    return levels[: levels.index(best) + 1]


@dataclass
class Comparison:
    max_abs: float          # max |actual - expected| over finite pairs
    max_rel: float          # max |actual - expected| / max(|expected|, tiny)
    where: tuple[int, ...] | None  # index of max_abs
    actual_at: float | None
    expected_at: float | None
    nonfinite_mismatch: int  # positions where NaN/inf pattern differs
    numel: int

    def __str__(self) -> str:
        loc = "" if self.where is None else (
            f" at {self.where} (actual {self.actual_at!r}, expected {self.expected_at!r})"
        )
        return (
            f"max abs error {self.max_abs:.3e}{loc}, max rel error {self.max_rel:.3e}, "
            f"{self.nonfinite_mismatch} NaN/inf mismatches over {self.numel} values"
        )


def compare(actual: torch.Tensor, expected: torch.Tensor) -> Comparison:
    """Compares two tensors of the same shape in float64."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    mismatch = (a_nan != e_nan) | (a_inf != e_inf) | (a_inf & e_inf & (torch.sign(a) != torch.sign(e)))
    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    if diff.numel() == 0:
        return Comparison(0.0, 0.0, None, None, None, 0, 0)
    flat = int(torch.argmax(diff).item())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    rel = diff / e.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return Comparison(
        max_abs=float(diff.max().item()),
        max_rel=float(torch.where(finite, rel, torch.zeros_like(rel)).max().item()),
        where=where,
        actual_at=float(a[where].item()),
        expected_at=float(e[where].item()),
        nonfinite_mismatch=int(mismatch.sum().item()),
        numel=diff.numel(),
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 what: str = "") -> Comparison:
    """Asserts |actual - expected| <= atol + rtol * |expected| everywhere and the
    same NaN/inf pattern; the failure message says where and by how much."""
    cmp = compare(actual, expected)
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    finite = torch.isfinite(a) & torch.isfinite(e)
    bad = finite & ((a - e).abs() > atol + rtol * e.abs())
    if cmp.nonfinite_mismatch or bool(bad.any()):
        prefix = f"{what}: " if what else ""
        raise AssertionError(
            f"{prefix}{int(bad.sum())} values outside atol={atol:g}, rtol={rtol:g}; {cmp}"
        )
    return cmp


# ---------------------------------------------------------------- GPU kernels (tests/triton, tests/gpu)

#: 4 float32 ulps of an O(1) output: the floor under "2x SDPA's error" when
#: SDPA happens to be exact (e.g. Lk = 1).
ATTENTION_ERR_FLOOR = 4 * 2.0**-23


def attention_error_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                          mask, oracle: torch.Tensor) -> float:
    """FlashAttention's accuracy rule, per dtype: twice the max error of
    torch's own ``scaled_dot_product_attention`` in q's dtype and on q's
    device vs the float64 ``oracle`` (rows that see no key excluded: SDPA
    gives NaN there), plus a floor: 4 float32 ulps for float32, one ulp of the
    output's magnitude for float16/bfloat16 (FlashAttention-2 rounds P to the
    input type before P.V, and so may the peer or not)."""
    import torch.nn.functional as F

    b, _, lq, _ = q.shape
    lk = k.shape[2]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=lk - lq)
    allowed = allowed[None, None].expand(b, 1, lq, lk)
    if mask is not None:
        allowed = allowed & ~mask[:, None, None, :]
    attn_mask = None if (not causal and mask is None) else allowed
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    visible = allowed.any(dim=-1, keepdim=True).expand_as(oracle)
    sdpa = torch.where(visible, sdpa.double(), oracle)
    err = compare(sdpa, oracle).max_abs
    if q.dtype == torch.float32:
        return 2 * err + ATTENTION_ERR_FLOOR
    eps = torch.finfo(q.dtype).eps
    return 2 * err + eps * max(1.0, float(oracle.abs().max()))


# (B, H, Lq, Lk, D, causal, masked): the awkward lengths 1, 7, 97, 129, 1025,
# head dims 64/80/128, batch 1-8, masks, causal with Lq < Lk, both the prefill
# path (Lq > 4) and the decode path (Lq <= 4, flash-decoding when B*H is small).
ATTENTION_SHAPES = [
    (1, 1, 1, 1, 64, False, False),
    (1, 1, 1, 1, 80, True, False),
    (3, 3, 7, 7, 80, False, True),
    (3, 2, 97, 97, 128, True, False),
    (1, 2, 97, 129, 64, True, True),
    (8, 2, 129, 129, 64, False, True),
    (5, 1, 129, 129, 80, True, True),
    (2, 2, 7, 1025, 80, True, False),
    (1, 2, 1025, 1025, 64, True, False),
    (2, 1, 1025, 1025, 128, False, True),
    (8, 3, 1, 129, 64, True, True),
    (4, 3, 1, 1025, 64, False, True),
    (1, 1, 1, 1025, 128, True, False),
    (1, 2, 3, 1025, 80, True, True),
    (2, 2, 4, 97, 128, False, False),
    (6, 2, 5, 129, 64, True, True),
]


def train_byte_level_bpe(path, vocab_size: int = 600) -> int:
    """A GPT-2-style byte-level BPE tokenizer trained on the stdlib docstring
    corpus, saved as tokenizer.json at ``path`` (tests: no GPT-2 vocabulary can
    be downloaded here). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .corpus import docstring_sentences

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docstring_sentences(3000), trainer)
    tok.save(str(path))
    return tok.get_vocab_size()
