"""kernels/attention.py (FlashAttention-2 forward + flash-decoding) against
the float64 oracle, with torch SDPA's error in the same dtype as the
yardstick (tallow.testing.attention_error_bound)."""

from __future__ import annotations

import math

import pytest
import torch

from tallow.ops import attention_ref
from tallow.testing import attention_error_bound, compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, H, Lq, Lk, D, causal, masked): prefill (with Lq < Lk), decode (Lq = 1,
# with and without a key-range split), head dims 64/80/128 and odd ones,
# a batch row whose keys are all padding (B > 1 and masked).
SHAPES = [
    (1, 1, 1, 1, 64, False, False),
    (2, 2, 7, 7, 64, False, True),
    (1, 2, 17, 33, 80, True, True),
    (2, 1, 20, 20, 128, True, False),
    (2, 1, 3, 40, 64, True, True),
    (2, 1, 1, 97, 80, True, True),
    (1, 2, 1, 1025, 64, False, True),
    (1, 1, 9, 9, 33, False, False),
]


def _inputs(b, h, lq, lk, d, masked, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).to(device) for n in (lq, lk, lk))
    mask = None
    if masked:
        mask = torch.rand(b, lk, generator=g) < 0.3
        mask[0, lk // 2:] = True
        if b > 1:
            mask[-1, :] = True
        mask = mask.to(device)
    return q, k, v, mask


def _check(q, k, v, causal, mask):
    from tallow.kernels.attention import attention_fwd

    scale = 1.0 / math.sqrt(q.shape[-1])
    out = attention_fwd(q, k, v, causal, mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    oracle = attention_ref(q.double(), k.double(), v.double(), causal, mask, scale)
    ours = compare(out, oracle)
    assert ours.nonfinite_mismatch == 0, f"NaN/inf in the output: {ours}"
    bound = attention_error_bound(q, k, v, causal, mask, oracle)
    assert ours.max_abs <= bound, f"error {ours.max_abs:.3e} > bound {bound:.3e}; {ours}"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("b,h,lq,lk,d,causal,masked", SHAPES)
def test_attention_matches_oracle(device, b, h, lq, lk, d, causal, masked, dtype):
    q, k, v, mask = _inputs(b, h, lq, lk, d, masked, dtype, device)
    out = _check(q, k, v, causal, mask)
    if masked and b > 1:
        assert torch.count_nonzero(out[-1]) == 0  # every key padded: zeros, not NaN


def test_decode_splits_the_key_range():
    from tallow.kernels.attention import decode_splits

    assert decode_splits(2, 1025, 64, 132) == 4  # the (1, 2, 1, 1025) case above runs split
    assert decode_splits(8 * 12, 1024, 64, 132) == 3
    assert decode_splits(1000, 4096, 64, 132) == 1  # enough programs already
    assert decode_splits(1, 10, 64, 132) == 1


def test_attention_strided_inputs(device):
    """q/k/v as views of a fused [B, L, 3, H, D] QKV projection."""
    b, l, h, d = 2, 19, 2, 64
    qkv = torch.randn(b, l, 3, h, d).to(device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check(q, k, v, True, None)
