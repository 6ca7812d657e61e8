"""attention on CUDA tensors: the cuda (tallow._C_cuda) and triton backends
against the float64 oracle, rule: error <= 2x torch SDPA's in the same dtype
(tallow.testing.attention_error_bound), over the CPU tests' awkward shapes."""

from __future__ import annotations

import pytest
import torch

from tallow.testing import ATTENTION_SHAPES

from tallow.ops import attention, attention_ref
from tallow.testing import attention_error_bound, compare

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f16", "bf16"]

# the CPU tests' shapes, plus a long decode
SHAPES = ATTENTION_SHAPES + [(1, 1, 1, 8192, 64, False, False)]


def _inputs(b, h, lq, lk, d, masked, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).cuda() for n in (lq, lk, lk))
    mask = None
    if masked:
        mask = torch.rand(b, lk, generator=g) < 0.3
        mask[0, lk // 2:] = True
        if b > 1:
            mask[-1, :] = True
        mask = mask.cuda()
    return q, k, v, mask


def _check(q, k, v, causal, mask):
    out = attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_cuda
    oracle = attention_ref(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=mask)
    ours = compare(out, oracle)
    assert ours.nonfinite_mismatch == 0, f"NaN/inf in the output: {ours}"
    bound = attention_error_bound(q, k, v, causal, mask, oracle)
    assert ours.max_abs <= bound, f"error {ours.max_abs:.3e} > bound {bound:.3e}; {ours}"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("b,h,lq,lk,d,causal,masked", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gpu(force_backend, backend, b, h, lq, lk, d, causal, masked, dtype):
    force_backend(backend)
    q, k, v, mask = _inputs(b, h, lq, lk, d, masked, dtype)
    out = _check(q, k, v, causal, mask)
    if masked and b > 1:
        assert torch.count_nonzero(out[-1]) == 0


@pytest.mark.parametrize("d", [1, 8, 33, 200, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gpu_odd_head_dims(force_backend, backend, d):
    force_backend(backend)
    for lq, causal in ((1, False), (19, True)):
        q, k, v, mask = _inputs(2, 2, lq, 40, d, True, torch.float16, seed=d)
        _check(q, k, v, causal, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gpu_strided(force_backend, backend):
    force_backend(backend)
    qkv = torch.randn(2, 97, 3, 4, 64, device="cuda", dtype=torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    _check(q, k, v, True, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gpu_unsupported_forced_raises(force_backend, backend):
    force_backend(backend)
    q = torch.randn(1, 1, 4, 300, device="cuda")
    with pytest.raises(Exception, match="256"):
        attention(q, q, q)


def test_attention_gpu_auto_uses_cuda_without_fallback():
    # warnings are errors: a fallback warning would fail this test
    q, k, v, mask = _inputs(2, 2, 129, 129, 64, True, torch.float16)
    _check(q, k, v, False, mask)
