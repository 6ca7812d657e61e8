"""Fused scaled-dot-product attention (FlashAttention-2 forward).

    out[b, h, i] = sum_j softmax_j(scale * q[b,h,i] . k[b,h,j] + mask[b,i,j]) * v[b,h,j]

q is ``[B, H, Lq, D]``, k and v ``[B, H, Lk, D]`` (``Lk >= Lq`` when causal), so a
decode step against a KV cache is the same call. With ``causal=True`` query
``i`` sees keys ``j <= Lk - Lq + i`` (the queries are the last Lq positions).
``key_padding_mask`` is ``[B, Lk]`` bool, **True marks padding** (keys to
ignore), the ``nn.MultiheadAttention`` convention; a Hugging Face
``attention_mask`` (1 = keep) is ``attention_mask == 0``. A query row that sees
no key at all returns zeros, not NaN.

Backends: ``cpu`` (tallow._C) and ``ref`` (eager torch maths, materialises
the Lq x Lk scores; any float dtype) for CPU tensors; ``cuda``
(tallow._C_cuda, csrc/cuda/attention.cu: tensor-core FlashAttention-2 for
fp16/bf16 with D in {64, 80, 128}, a warp kernel with flash-decoding for the
rest, D <= 256) and ``triton`` (kernels/attention.py: FlashAttention-2 with
``tl.dot``, flash-decoding for Lq = 1; fp16/bf16/fp32, D <= 256) for CUDA
tensors, in that order; both accumulate in fp32 and return q's dtype.
The kernels are forward only (inference): inputs that require grad are
detached and the output carries no gradient, as with the int8 ops; for
gradients use ``attention_ref`` (``TALLOW_BACKEND=ref``) or torch's SDPA.

The cpu kernel (csrc/attention/) is the FlashAttention-2 forward pass (Dao
2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", Algorithm 1), float32, never materialising Lq x Lk. With
s_ij = (scale q_i) . k_j, per query row and block of keys (exp computed as
2^((x) log2 e) with simd.h's exp2)::

    m' = max(m, max_j s_ij)      p_ij = exp(s_ij - m')
    l' = exp(m - m') l + sum_j p_ij
    O' = exp(m - m') O + sum_j p_ij v_j          out_i = O / l  (0 if l == 0)

Dot products and P.V sums are accumulated in blocks (two-level summation),
which keeps the error vs a float64 oracle at or below torch SDPA's.

- Prefill (Lq > 4): tasks (b, h, query chunk) over all cores; per tile of 48
  queries x 64 keys the scores are computed transposed (a vector holds 16
  queries, so the online softmax is vertical, without horizontal
  reductions), with AVX-512 FMA register tiles for Q K^T and P V. Causal runs
  skip key blocks above the diagonal and mask only the diagonal ones; fully
  padded key blocks are skipped.
- Decode (Lq <= 4, e.g. one token against a KV cache): memory-bound, K and V
  are read once; when B*H is too small to keep every core busy the key range
  is split and the partial (m, l, O) combined (flash-decoding, Dao et al.
  2023).

q, k, v may be strided views (a fused QKV projection, a KV-cache slice): the
kernel takes any strides over B, H and L as long as D is contiguous, so no
copy is made. AVX-512, AVX2 and scalar builds are chosen at run time.

**Low-precision KV cache.** On CPU, k and v may be ``torch.bfloat16`` while q
is float32 (a bf16 KV cache: half the bytes a decode step streams). The
decode path (Lq <= 4) reads the bf16 values directly, widening them to
float32 in registers (exact: a bf16 is the high half of a float32); all
arithmetic stays float32. A prefill (Lq > 4) against bf16 k/v converts them
to float32 first. The reference does ``k.float()``, ``v.float()``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _gpu
from .._dispatch import BackendUnavailable, dispatch, eager_call
from .._native import native

_ORDER = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Eager reference: materialises the score matrix; any float dtype (k and
    v in another dtype than q — a bf16 KV cache — are converted to q's)."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        allowed = j <= (lk - lq) + i
    allowed = allowed[None, None]  # [1, 1, Lq, Lk]
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.to(torch.bool)[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Rows with no visible key: softmax gives NaN; the contract says zeros.
    probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.matmul(probs, v)


def _attention_cpu(q, k, v, causal, key_padding_mask, scale):
    if q.dtype != torch.float32:
        raise BackendUnavailable(f"cpu attention takes float32, got {q.dtype}")
    mod = native()
    bf16 = k.dtype == torch.bfloat16
    if bf16 and q.shape[2] > 4:  # the kernel reads bf16 on its decode path only
        k, v, bf16 = k.float(), v.float(), False
    # The kernel takes any strides over (B, H, L) but needs D contiguous:
    # copy only the tensors that are not. Forward only, as the int8 ops:
    # inputs that require grad are detached (numpy() refuses them), and the
    # output carries no gradient.
    q, k, v = (t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous().numpy()
    # numpy has no bfloat16: the bits travel as uint16 (same strides, in elements)
    kn, vn = (k.view(torch.uint16).numpy(), v.view(torch.uint16).numpy()) if bf16 else (k.numpy(), v.numpy())
    mod.attention_forward(q.numpy(), kn, vn, out.numpy(), mask, bool(causal), float(scale))
    return out


def _gpu_check(q, backend: str) -> None:
    if q.dtype not in _gpu.DTYPE_CODES:
        raise BackendUnavailable(f"{backend} attention takes float32/float16/bfloat16, got {q.dtype}")
    if q.shape[-1] > 256:
        raise BackendUnavailable(f"{backend} attention takes head dims up to 256, got {q.shape[-1]}")


def _attention_cuda(q, k, v, causal, key_padding_mask, scale):
    mod = _gpu.cuda_backend(q)
    _gpu_check(q, "cuda")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    with torch.cuda.device(q.device):
        splits = mod.attention_splits(b * h, lq, lk, _gpu.sm_count(q.device))
        ws = torch.empty(b * h * lq * splits * (d + 2), dtype=torch.float32, device=q.device) if splits > 1 else None
        mod.attention_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), 0 if mask is None else mask.data_ptr(),
            b, h, lq, lk, d, list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]),
            list(out.stride()[:3]), 0 if mask is None else mask.stride(0), _gpu.DTYPE_CODES[q.dtype],
            bool(causal), float(scale), splits, 0 if ws is None else ws.data_ptr(), _gpu.stream_of(q),
        )
    return out


def _attention_triton(q, k, v, causal, key_padding_mask, scale):
    kern = _gpu.triton_kernels("attention", q)
    _gpu_check(q, "triton")
    with torch.cuda.device(q.device):
        return kern.attention_fwd(q, k, v, causal, key_padding_mask, scale)


_IMPLS = {"cpu": _attention_cpu, "cuda": _attention_cuda, "triton": _attention_triton, "ref": attention_ref}


@torch.library.custom_op("tallow::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    return dispatch("attention", q.device.type, _ORDER, _IMPLS, q, k, v, causal, key_padding_mask, scale)


@_attention_op.register_fake
def _(q, k, v, causal, key_padding_mask, scale):
    return q.new_empty(q.shape)


def _bf16_cache(q, k, v) -> bool:
    """float32 q against a bfloat16 K/V cache (CPU)."""
    return (q.dtype == torch.float32 and k.dtype == torch.bfloat16 and v.dtype == torch.bfloat16
            and q.device.type == "cpu")


def _check(q, k, v, key_padding_mask, scale, causal) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype and not _bf16_cache(q, k, v):
            raise TypeError(f"attention: q, k, v must share a dtype (or, on CPU, float32 q with bfloat16 k and v), "
                            f"got q {q.dtype} and {name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: q, k, v must be on one device, got q on {q.device} and {name} on {t.device}")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"attention: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, H or D")
    if v.shape != k.shape:
        raise ValueError(f"attention: v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if causal and k.shape[2] < lq:  # the queries are the last Lq of the Lk positions
        raise ValueError(f"attention: causal attention needs Lk >= Lq, got Lq={lq} and Lk={k.shape[2]}")
    if d == 0:
        raise ValueError("attention: head dim D must be >= 1, got 0")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"attention: key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"attention: key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, k.shape[2]):
            raise ValueError(
                f"attention: key_padding_mask must have shape [B, Lk] = {(b, k.shape[2])}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Scaled dot-product attention; see the module docstring for the contract.

    Returns a new ``[B, H, Lq, D]`` tensor of q's dtype. ``scale`` defaults to
    ``1/sqrt(D)``.
    """
    _check(q, k, v, key_padding_mask, scale, causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.numel() == 0:
        return q.new_zeros(q.shape)
    if eager_call(q, k, v, key_padding_mask):
        return dispatch("attention", q.device.type, _ORDER, _IMPLS, q, k, v, bool(causal), key_padding_mask,
                        float(scale))
    return _attention_op(q, k, v, bool(causal), key_padding_mask, float(scale))
