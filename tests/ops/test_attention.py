"""tallow.ops.attention against a float64 oracle, with torch's SDPA as the yardstick.

Accuracy rule (FlashAttention's): the max error of tallow's float32 kernel
against the float64 oracle (``attention_ref`` on float64 copies) must be at
most twice the max error of torch's own float32
``scaled_dot_product_attention`` on the same inputs, plus a tiny floor.
"""

from __future__ import annotations

import importlib
import threading

import numpy as np
import pytest
import torch

from tallow.testing import ATTENTION_SHAPES, assert_close, require_native
import torch.nn.functional as F

import tallow
from tallow.ops import attention, attention_ref
from tallow.testing import assert_close, compare

pytestmark = pytest.mark.native  # fails, not skips, without tallow._C (conftest.py)

# The floor: when SDPA's own error is (near) zero, e.g. Lk = 1 where both
# return v exactly, "2x SDPA" would demand bit-exactness. 4 float32 ulps of
# an O(1) output (4 * 2**-23 ~ 4.8e-7) is far below any real defect (a wrong
# mask or a wrong row gives errors of order 0.1) and above rounding noise.
ERR_FLOOR = 4 * 2.0**-23

# ISA parity: the kernels of different ISAs do the same arithmetic in a
# different summation order (vector widths differ, the decode path reduces
# dot products across lanes), so results agree to a few float32 ulps of the
# output magnitude: 8 ulps of max(1, |out|).
PARITY_ULPS = 8


def _inputs(b, h, lq, lk, d, *, masked=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, lk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, lk, d, generator=g, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(b, lk, generator=g) < 0.3
        mask[0, lk // 2:] = True          # BERT-style right padding in batch row 0
        if b > 1:
            mask[-1, :] = True            # a batch row with every key padded
    return q, k, v, mask


def _allowed(lq, lk, b, causal, mask):
    """[B, 1, Lq, Lk] bool: which keys each query sees."""
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(diagonal=lk - lq)  # j <= i + (Lk - Lq)
    allowed = allowed[None, None].expand(b, 1, lq, lk)
    if mask is not None:
        allowed = allowed & ~mask[:, None, None, :]
    return allowed


def _oracle(q, k, v, causal, mask, scale=None):
    return attention_ref(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=mask, scale=scale)


def _sdpa_error(q, k, v, causal, mask, oracle) -> float:
    """Max error of torch's float32 SDPA vs the oracle, over rows that see at
    least one key (SDPA returns NaN for rows that see none; we return zeros)."""
    b, _, lq, _ = q.shape
    lk = k.shape[2]
    allowed = _allowed(lq, lk, b, causal, mask)
    attn_mask = None if (not causal and mask is None) else allowed
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    visible = allowed.any(dim=-1, keepdim=True).expand_as(oracle)  # [B, H, Lq, D] via broadcast
    sdpa = torch.where(visible, sdpa.double(), oracle)
    return compare(sdpa, oracle).max_abs


def _check_against_oracle(q, k, v, causal, mask):
    out = attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert out.dtype == torch.float32 and out.shape == q.shape
    oracle = _oracle(q, k, v, causal, mask)
    ours = compare(out, oracle)
    assert ours.nonfinite_mismatch == 0, f"NaN/inf in the output: {ours}"
    ref_err = _sdpa_error(q, k, v, causal, mask, oracle)
    assert ours.max_abs <= 2 * ref_err + ERR_FLOOR, (
        f"tallow error {ours.max_abs:.3e} > 2 x SDPA error {ref_err:.3e} + floor; {ours}"
    )
    return out


SHAPES = ATTENTION_SHAPES


@pytest.mark.parametrize("b,h,lq,lk,d,causal,masked", SHAPES)
def test_matches_oracle_within_2x_sdpa(b, h, lq, lk, d, causal, masked):
    q, k, v, mask = _inputs(b, h, lq, lk, d, masked=masked)
    _check_against_oracle(q, k, v, causal, mask)


@pytest.mark.parametrize("d", [1, 8, 24, 33, 200, 256, 300])
def test_odd_head_dims(d):
    """Head dims that are not multiples of the vector width (tail masks), and
    beyond 256."""
    for lq, causal in ((1, False), (19, True)):
        q, k, v, mask = _inputs(2, 2, lq, 40, d, masked=True, seed=d)
        _check_against_oracle(q, k, v, causal, mask)


def test_single_key_reproduces_v_exactly():
    q, k, v, _ = _inputs(2, 3, 1, 1, 80)
    assert torch.equal(attention(q, k, v), v)
    q, k, v, _ = _inputs(2, 3, 5, 5, 64)
    out = attention(q, k, v, causal=True)
    assert torch.equal(out[:, :, 0], v[:, :, 0])  # the first query sees only key 0


def test_fully_masked_rows_are_zeros_not_nan():
    b, h, lq, lk, d = 3, 2, 33, 70, 64
    q, k, v, _ = _inputs(b, h, lq, lk, d)
    mask = torch.zeros(b, lk, dtype=torch.bool)
    mask[1] = True                # batch row 1: no key at all
    mask[2, : lk - lq + 10] = True  # causal: the first 10 queries of row 2 see only padding
    for lq_ in (lq, 1):
        out = attention(q[:, :, :lq_], k, v, causal=True, key_padding_mask=mask)
        assert not torch.isnan(out).any()
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        if lq_ == lq:
            assert torch.equal(out[2, :, :10], torch.zeros_like(out[2, :, :10]))
            assert bool((out[2, :, 10:].abs().sum(-1) > 0).all())
        oracle = _oracle(q[:, :, :lq_], k, v, True, mask)
        assert_close(out, oracle, atol=1e-5, what="masked rows")


def test_every_key_padded_in_a_whole_decode_split():
    """Flash-decoding splits the key range of one (b, h) across threads; a
    split that sees only padding must not disturb the combination."""
    q, k, v, _ = _inputs(1, 1, 1, 2049, 64)
    mask = torch.zeros(1, 2049, dtype=torch.bool)
    mask[0, :1500] = True
    _check_against_oracle(q, k, v, False, mask)
    mask[0, 1600:] = True
    _check_against_oracle(q, k, v, False, mask)


def test_causal_with_shorter_query_is_bottom_right_aligned():
    """Query i of Lq sees keys j <= Lk - Lq + i: the last Lq rows of a full
    causal attention over Lk (a chunked prefill / decode with a KV cache)."""
    q, k, v, _ = _inputs(2, 2, 200, 200, 64)
    full = attention(q, k, v, causal=True)
    for lq in (1, 3, 7, 97):
        part = attention(q[:, :, -lq:], k, v, causal=True)
        assert_close(part, full[:, :, -lq:], atol=2e-6, what=f"Lq={lq}")


def test_strided_views_are_used_without_copies(monkeypatch):
    """A fused QKV projection viewed as [B, H, L, D] (transposed strides) and a
    KV-cache slice give the same result as contiguous copies, and reach the
    native kernel as views of the caller's memory."""
    b, l, h, d, max_len = 2, 37, 3, 64, 64
    qkv = torch.randn(b, l, 3, h, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, L, D] strided views
    cache_k = torch.randn(b, h, max_len, d)
    cache_v = torch.randn(b, h, max_len, d)
    cache_k[:, :, :l] = k
    cache_v[:, :, :l] = v
    ks, vs = cache_k[:, :, :l], cache_v[:, :, :l]
    assert not q.is_contiguous() and not ks.is_contiguous()

    seen = []
    real = tallow.native()

    class Spy:
        def attention_forward(self, qn, kn, vn, out, mask, causal, scale):
            seen.append([a.__array_interface__["data"][0] for a in (qn, kn, vn)])
            return real.attention_forward(qn, kn, vn, out, mask, causal, scale)

    mod = importlib.import_module("tallow.ops.attention")  # the module (tallow.ops.attention is the function)
    monkeypatch.setattr(mod, "native", lambda: Spy())
    for causal in (False, True):
        expected = attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
        seen.clear()
        got = attention(q, ks, vs, causal=causal)
        assert seen == [[q.data_ptr(), ks.data_ptr(), vs.data_ptr()]], "an input was copied"
        assert torch.equal(got, expected)
        got = attention(q[:, :, -1:], ks, vs, causal=causal)  # a decode step on the cache
        assert torch.equal(got, attention(q[:, :, -1:].contiguous(), k.contiguous(), v.contiguous(), causal=causal))


def test_explicit_scale_and_extreme_logits():
    q, k, v, mask = _inputs(2, 2, 50, 60, 64, masked=True)
    for scale in (0.0, 0.01, 3.0):
        out = attention(q, k, v, key_padding_mask=mask, scale=scale)
        assert_close(out, _oracle(q, k, v, False, mask, scale=scale), atol=2e-5, what=f"scale={scale}")
    # Logits of a few hundred: the running max must keep exp2 in range.
    out = attention(q * 30, k, v, causal=True)
    assert not torch.isnan(out).any()
    assert_close(out, _oracle(q * 30, k, v, True, None), atol=1e-4, what="large logits")


def test_same_result_for_any_thread_count():
    q, k, v, mask = _inputs(3, 2, 97, 1025, 80, masked=True)
    qd, kd, vd, _ = _inputs(1, 1, 1, 3000, 64)
    threads = tallow.get_num_threads()
    try:
        tallow.set_num_threads(1)
        one = attention(q, k, v, causal=True, key_padding_mask=mask)
        one_d = attention(qd, kd, vd)
        tallow.set_num_threads(3)
        three = attention(q, k, v, causal=True, key_padding_mask=mask)
        three_d = attention(qd, kd, vd)
    finally:
        tallow.set_num_threads(threads)
    assert torch.equal(one, three)  # prefill: the work split does not change the arithmetic
    assert_close(three_d, one_d, atol=1e-6, what="decode split")  # flash-decoding: combination order


def test_concurrent_callers_get_their_own_results():
    inputs = [_inputs(2, 2, 65, 65, 64, seed=s) for s in range(4)]
    expected = [attention(q, k, v, causal=True) for q, k, v, _ in inputs]
    results = [None] * len(inputs)

    def work(i):
        q, k, v, _ = inputs[i]
        for _ in range(5):
            results[i] = attention(q, k, v, causal=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, exp in zip(results, expected):
        assert torch.equal(got, exp)


PARITY_SHAPES = [
    (2, 2, 45, 45, 64, True, True),     # prefill, diagonal blocks, padding
    (1, 2, 33, 150, 80, True, False),   # prefill, Lq < Lk
    (3, 1, 17, 70, 24, False, True),    # head-dim tail
    (2, 3, 1, 300, 128, False, True),   # decode
    (1, 1, 2, 1100, 64, True, False),   # decode with key-range splits
]


@pytest.mark.parametrize("b,h,lq,lk,d,causal,masked", PARITY_SHAPES)
def test_isa_paths_agree(each_isa, b, h, lq, lk, d, causal, masked):
    q, k, v, mask = _inputs(b, h, lq, lk, d, masked=masked, seed=lq + lk)
    got = attention(q, k, v, causal=causal, key_padding_mask=mask)
    tallow.set_isa(tallow.native().best_isa())
    try:
        best = attention(q, k, v, causal=causal, key_padding_mask=mask)
    finally:
        tallow.set_isa(each_isa)
    tol = PARITY_ULPS * 2.0**-23 * max(1.0, float(best.abs().max()))
    assert_close(got, best, atol=tol, what=f"{each_isa} vs {tallow.native().best_isa()}")
    # And each ISA on its own is right.
    assert_close(got, _oracle(q, k, v, causal, mask), atol=1e-5, what=each_isa)


def test_forced_ref_backend(force_backend):
    q, k, v, mask = _inputs(2, 2, 20, 30, 64, masked=True)
    force_backend("ref")
    out = attention(q, k, v, causal=True, key_padding_mask=mask)
    assert torch.equal(out, attention_ref(q, k, v, causal=True, key_padding_mask=mask, scale=1 / 8))
    force_backend("cpu")
    cpu = attention(q, k, v, causal=True, key_padding_mask=mask)
    assert_close(cpu, out, atol=1e-5, what="cpu vs ref")


def test_empty_inputs():
    q = torch.randn(2, 3, 0, 64)
    k = torch.randn(2, 3, 5, 64)
    assert attention(q, k, k).shape == (2, 3, 0, 64)


@pytest.mark.parametrize("lq,lk", [(3, 1), (3, 2), (7, 5), (12, 9)])
def test_more_queries_than_keys_without_causal_mask(each_isa, lq, lk):
    """Grouped-query decode reads a KV head's query heads as query rows: at
    position 0 or 1 there are fewer keys than rows (no causal mask needed)."""
    require_native()
    q, k, v, _ = _inputs(2, 3, lq, lk, 16)
    assert_close(attention(q, k, v), attention_ref(q, k, v), atol=2e-6, rtol=1e-5)
    kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
    if lq <= 4:  # the bf16 decode path
        assert_close(attention(q, kb, vb), attention_ref(q, kb, vb), atol=2e-6, rtol=1e-5)


# --- bad input: errors name the argument --------------------------------------

@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda q, k, v: (q.double(), k, v, {}), TypeError, "dtype"),
        (lambda q, k, v: (q[0], k, v, {}), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k[:, :1], v[:, :1], {}), ValueError, "k shape"),
        (lambda q, k, v: (q, k, v[:, :, :3], {}), ValueError, "v shape"),
        (lambda q, k, v: (q, k[:, :, :2], v[:, :, :2], {"causal": True}), ValueError, "causal attention needs Lk >= Lq"),
        (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.zeros(2, 6)}), TypeError, "key_padding_mask must be bool"),
        (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}), ValueError,
         "key_padding_mask must have shape"),
        (lambda q, k, v: (q, k, v, {"scale": float("nan")}), ValueError, "scale"),
        (lambda q, k, v: ("q", k, v, {}), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_python_errors_name_the_argument(make, exc, pattern):
    q, k, v, _ = _inputs(2, 2, 4, 6, 16)
    q_, k_, v_, kw = make(q, k, v)
    with pytest.raises(exc, match=pattern):
        attention(q_, k_, v_, **kw)


def _native_args():
    q = np.zeros((2, 3, 4, 16), np.float32)
    k = np.zeros((2, 3, 6, 16), np.float32)
    v = np.zeros((2, 3, 6, 16), np.float32)
    out = np.zeros((2, 3, 4, 16), np.float32)
    return {"q": q, "k": k, "v": v, "out": out, "mask": None, "causal": False, "scale": 0.25}


@pytest.mark.parametrize(
    "change, exc, pattern",
    [
        ({"q": np.zeros((2, 3, 4, 16), np.float64)}, TypeError, "attention: q must be float32"),
        ({"k": np.zeros((2, 3, 6), np.float32)}, ValueError, "attention: k must have 4 dimensions"),
        ({"k": np.zeros((2, 4, 6, 16), np.float32)}, ValueError, r"attention: k.shape\[1\] must be 3"),
        ({"v": np.zeros((2, 3, 5, 16), np.float32)}, ValueError, r"attention: v.shape\[2\] must be 6"),
        ({"out": np.zeros((2, 3, 4, 8), np.float32)}, ValueError, r"attention: out.shape\[3\] must be 16"),
        ({"k": np.zeros((2, 3, 3, 16), np.float32), "v": np.zeros((2, 3, 3, 16), np.float32), "causal": True},
         ValueError, "causal attention needs Lk >= Lq"),
        ({"v": np.zeros((2, 3, 6, 32), np.float32)[..., ::2]}, ValueError, "v must be contiguous over its last"),
        ({"mask": np.zeros((2, 6), np.int32)}, TypeError, "key_padding_mask must be bool"),
        ({"mask": np.zeros((2, 7), bool)}, ValueError, r"key_padding_mask.shape\[1\] must be 6"),
        ({"mask": np.zeros((6, 2), bool).T}, ValueError, "key_padding_mask must be C-contiguous"),
        ({"mask": [[0] * 6] * 2}, TypeError, "key_padding_mask must be a numpy bool array"),
        ({"scale": float("inf")}, ValueError, "scale must be finite"),
    ],
)
def test_native_errors_name_the_argument(change, exc, pattern):
    args = {**_native_args(), **change}
    with pytest.raises(exc, match=pattern):
        tallow.native().attention_forward(**args)


def test_native_rejects_read_only_out():
    args = _native_args()
    args["out"].setflags(write=False)
    with pytest.raises(ValueError, match="out must be writeable"):
        tallow.native().attention_forward(**args)


@pytest.mark.parametrize("b,h,lq,lk,d,causal,masked", [
    (8, 12, 128, 128, 64, False, True),     # BERT-base prefill, padded batch
    (1, 12, 1024, 1024, 64, True, False),   # GPT-2 prefill
    (8, 12, 1, 1024, 64, True, True),       # GPT-2 decode, left-padded batch
    (2, 4, 1025, 2049, 128, True, True),
])
def test_model_shapes(b, h, lq, lk, d, causal, masked):
    q, k, v, mask = _inputs(b, h, lq, lk, d, masked=masked)
    _check_against_oracle(q, k, v, causal, mask)


def test_custom_op_registration():
    """Schema, fake (meta) implementation and dynamic-shape tracing of the
    torch.library op that wraps the kernel."""
    mod = importlib.import_module("tallow.ops.attention")
    q, k, v, mask = _inputs(2, 2, 5, 7, 16, masked=True)
    torch.library.opcheck(mod._attention_op, (q, k, v, True, mask, 0.25))


def test_thread_count_changing_while_running():
    """set_num_threads from another thread between/while calls: each call's
    per-thread scratch must still cover every pool thread."""
    q, k, v, mask = _inputs(2, 3, 70, 90, 64, masked=True)
    expected = attention(q, k, v, causal=True, key_padding_mask=mask)
    threads = tallow.get_num_threads()
    stop = threading.Event()

    def toggle():
        n = 0
        while not stop.is_set():
            tallow.set_num_threads(1 + n % 4)
            n += 1

    t = threading.Thread(target=toggle)
    t.start()
    try:
        for _ in range(100):
            assert torch.equal(attention(q, k, v, causal=True, key_padding_mask=mask), expected)
    finally:
        stop.set()
        t.join()
        tallow.set_num_threads(threads)


# -- bf16 KV cache --------------------------------------------------------------------

@pytest.mark.parametrize("b,h,lq,lk,d", [(2, 3, 1, 97, 64), (1, 2, 3, 1025, 80), (3, 1, 4, 7, 128),
                                         (2, 12, 1, 600, 64), (1, 1, 2, 2, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_bf16_kv_decode_matches_oracle_on_the_same_values(each_isa, b, h, lq, lk, d, masked):
    """float32 q against bfloat16 k/v (the decode path reads them directly):
    the oracle gets the same bf16 values in float64, so the only error left
    is the kernel's float32 arithmetic — the usual 2x-SDPA rule applies."""
    q, k, v, mask = _inputs(b, h, lq, lk, d, masked=masked, seed=lk)
    k16, v16 = k.bfloat16(), v.bfloat16()
    got = attention(q, k16, v16, causal=True, key_padding_mask=mask)
    oracle = attention_ref(q.double(), k16.double(), v16.double(), causal=True, key_padding_mask=mask)
    sdpa_err = float((attention_ref(q, k16.float(), v16.float(), causal=True, key_padding_mask=mask).double()
                      - oracle).abs().max())
    err = float((got.double() - oracle).abs().max())
    assert got.dtype == torch.float32
    assert err <= 2 * sdpa_err + ERR_FLOOR, f"{each_isa}: {err:.3e} vs reference {sdpa_err:.3e}"


def test_bf16_kv_strided_cache_view_and_prefill():
    """A slice of a preallocated bf16 cache is read in place; a prefill
    (Lq > 4) against bf16 k/v is converted to float32 first."""
    cache = torch.randn(2, 4, 64, 32).bfloat16()
    q1 = torch.randn(2, 4, 1, 32)
    got = attention(q1, cache[:, :, :40], cache[:, :, :40])
    ref = attention_ref(q1, cache[:, :, :40].float(), cache[:, :, :40].float())
    assert_close(got, ref, atol=1e-5, rtol=1e-5, what="bf16 decode on a cache slice")
    q8 = torch.randn(2, 4, 8, 32)
    got = attention(q8, cache[:, :, :40], cache[:, :, :40], causal=True)
    ref = attention(q8, cache[:, :, :40].float(), cache[:, :, :40].float(), causal=True)
    assert torch.equal(got, ref)


def test_mixed_dtypes_other_than_a_bf16_cache_are_refused():
    q = torch.randn(1, 1, 1, 8)
    with pytest.raises(TypeError, match="float32 q with bfloat16 k and v"):
        attention(q, torch.randn(1, 1, 4, 8).half(), torch.randn(1, 1, 4, 8).half())
    with pytest.raises(TypeError, match="must share a dtype"):
        attention(q, torch.randn(1, 1, 4, 8).bfloat16(), torch.randn(1, 1, 4, 8))


def test_inputs_that_require_grad_are_detached_as_int8_does():
    """Forward-only kernels: numpy() refused tensors that require grad (issue 14).
    Like QuantizedLinear, the cpu backend detaches them; the output has no grad."""
    q, k, v = (torch.randn(1, 2, 7, 16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, causal=True)
    assert not out.requires_grad
    torch.testing.assert_close(out, attention(q.detach(), k.detach(), v.detach(), causal=True), rtol=0, atol=0)
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True).detach(), rtol=1e-5, atol=1e-5)
