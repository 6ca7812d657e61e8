"""Triton attention forward: FlashAttention-2 and flash-decoding.

Same contract as :func:`tallow.ops.attention` (``q [B, H, Lq, D]``, ``k, v
[B, H, Lk, D]``, ``Lk >= Lq``, causal aligned bottom-right: query ``i`` sees
keys ``j <= Lk - Lq + i``, ``key_padding_mask [B, Lk]`` True = padding, a row
that sees no key returns zeros).

Prefill — FlashAttention-2 forward (Dao 2023, Algorithm 1): one program per
(block of BLOCK_M queries, b·h); the Q tile stays in registers/SRAM while K/V
tiles of BLOCK_N keys stream through. With s_ij = scale · q_i · k_j, in base 2
(``qk_scale = scale · log2 e``)::

    m' = max(m, max_j s_ij)     p_ij = 2^(s_ij - m')
    l' = 2^(m - m') l + sum_j p_ij
    O' = 2^(m - m') O + P V     out = O / l   (0 when l == 0)

Q·K^T and P·V run on ``tl.dot`` with fp32 accumulation; fp16/bf16 inputs feed
the tensor cores directly (P is rounded to the input dtype for P·V, as in
FlashAttention-2), fp32 inputs use ``input_precision="ieee"`` (no TF32, so
the fp32 error stays at SDPA's level). Head dims that are not a power of two
(80) are padded to the next one (128) with masked loads. Causal programs stop
at the diagonal block.

Decode — flash-decoding (Dao, Haziza, Massa, Sizov 2023): when Lq == 1 the
B·H programs of the prefill grid cannot fill a GPU, so the key range is
split over ``S`` programs per (b, h); each writes its partial (m, l, O) in
fp32 and a second small kernel combines them::

    M = max_s m_s,   out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s

These kernels run on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Explicit, so Triton 3.9 does not warn about its changing default (FMA
# contraction is harmless here: the accuracy rule is 2x SDPA's error).
_OPTS = {"enable_fp_fusion": True}


# causal / has_mask are run-time flags (not constexpr, not specialised): one
# compiled variant per dtype and head-dim block instead of four.
@triton.jit(do_not_specialize=["causal", "has_mask"])
def _attn_fwd(
    Q, K, V, O, MASK,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, smb,
    H, LQ, LK, D, qk_scale, causal, has_mask,
    FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)  # grid (query blocks, H, B): B and H up to 65535 each
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < LQ
    d_ok = offs_d < D
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    shift = LK - LQ  # causal: query i sees keys j <= shift + i
    hi = LK
    if causal != 0:
        hi = tl.minimum(LK, shift + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < LK
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if FP32 or UPCAST:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        ok = n_ok[None, :] & m_ok[:, None]
        if causal != 0:
            ok = ok & (cols[None, :] <= shift + offs_m[:, None])
        if has_mask != 0:
            pad = tl.load(MASK + b.to(tl.int64) * smb + cols, mask=n_ok, other=1)
            ok = ok & (pad == 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf: subtract 0 instead
        # so that 2^(-inf - -inf) never makes a NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        elif UPCAST:  # P rounded to the input type as on the GPU, the product in fp32
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32),
                                                input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where((l_i == 0.0)[:, None], 0.0, acc / l_safe[:, None])
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * som + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["has_mask"])
def _decode_partial(
    Q, K, V, MASK, PM, PL, PO,
    sqb, sqh, skb, skh, skn, svb, svh, svn, smb,
    H, LK, D, qk_scale, CHUNK, S, has_mask,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Lq == 1: program (split s, h, b) folds keys [s·CHUNK, (s+1)·CHUNK)."""
    sid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    lo = sid * CHUNK
    hi = tl.minimum(LK, lo + CHUNK)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
        ok = n_ok
        if has_mask != 0:
            pad = tl.load(MASK + b.to(tl.int64) * smb + cols, mask=n_ok, other=1)
            ok = ok & (pad == 0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub)
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    idx = bh.to(tl.int64) * S + sid
    tl.store(PM + idx, m_i)
    tl.store(PL + idx, l_i)
    tl.store(PO + idx * BLOCK_D + offs_d, acc)


@triton.jit
def _decode_combine(PM, PL, PO, O, sob, soh, H, D, S, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    base = bh.to(tl.int64) * S
    m = tl.load(PM + base + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(PL + base + offs_s, mask=s_ok, other=0.0)
    po = tl.load(PO + (base + offs_s[:, None]) * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    mx = tl.max(m, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(m - mx)
    l_tot = tl.sum(w * l, 0)
    o = tl.sum(w[:, None] * po, 0)
    l_safe = tl.where(l_tot == 0.0, 1.0, l_tot)
    out = tl.where(l_tot == 0.0, 0.0, o / l_safe)
    tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: an H100/H200-sized GPU, so the split logic runs


def prefill_config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel on a
    GPU, sized so Q + the K/V pipeline stages fit in shared memory on sm_80
    (<= 163 KiB; tests/triton/test_triton_compile.py checks it)."""
    if dtype != torch.float32:
        return (128, 64, 8, 3) if block_d <= 128 else (64, 32, 4, 2)
    if block_d <= 64:
        return (64, 64, 4, 2)
    return (64, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)


def decode_config(block_d: int) -> int:
    """BLOCK_N of the decode kernel."""
    return 64 if block_d <= 128 else 32


def decode_splits(bh: int, lk: int, block_n: int, sms: int) -> int:
    """Key-range splits per (b, h): enough programs for ~2 waves of the GPU,
    each at least 4 key blocks long."""
    if bh >= 2 * sms:
        return 1
    by_occupancy = -(-2 * sms // bh)
    by_length = max(1, lk // (4 * block_n))
    return max(1, min(by_occupancy, by_length, 256))


def attention_fwd(q, k, v, causal: bool, key_padding_mask, scale: float) -> torch.Tensor:
    """q/k/v as in tallow.ops.attention (D-contiguous; other strides free)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton attention: dtype {q.dtype} not supported")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if d > 256:
        raise ValueError(f"triton attention: head dim {d} > 256")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    qk_scale = float(scale) * LOG2E
    if key_padding_mask is not None:
        mask = key_padding_mask.to(torch.uint8).contiguous()
        smb = mask.stride(0)
    else:
        mask = q  # never read (has_mask = 0)
        smb = 0
    if lq == 1:
        block_n = decode_config(block_d)
        splits = decode_splits(b * h, lk, block_n, _num_sms(q.device))
        chunk = -(-lk // splits)
        chunk = -(-chunk // block_n) * block_n
        splits = -(-lk // chunk)
        pm = torch.empty(b * h * splits, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        po = torch.empty(b * h * splits * block_d, dtype=torch.float32, device=q.device)
        _decode_partial[(splits, h, b)](
            q, k, v, mask, pm, pl, po,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), smb,
            h, lk, d, qk_scale, chunk, splits, int(key_padding_mask is not None),
            BLOCK_N=block_n, BLOCK_D=block_d, **_OPTS,
        )
        _decode_combine[(b * h,)](
            pm, pl, po, out, out.stride(0), out.stride(1), h, d, splits,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, **_OPTS,
        )
        return out
    fp32 = q.dtype == torch.float32
    if q.device.type == "cuda":
        block_m, block_n, num_warps, num_stages = prefill_config(q.dtype, block_d)
    else:  # interpreter: small tiles keep numpy fast
        block_m, block_n, num_warps, num_stages = 16, 16, 4, 1
    grid = (triton.cdiv(lq, block_m), h, b)
    _attn_fwd[grid](
        q, k, v, out, mask,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), smb,
        h, lq, lk, d, qk_scale, int(bool(causal)), int(key_padding_mask is not None),
        FP32=fp32,
        # Triton 3.9's interpreter computes tl.dot on bf16 wrongly (numpy has no
        # bf16): there, bf16 tiles are multiplied as the fp32 values they hold
        # (exact products, fp32 sums: what the tensor cores do).
        UPCAST=q.dtype == torch.bfloat16 and q.device.type != "cuda",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages, **_OPTS,
    )
    return out


__all__ = ["attention_fwd", "decode_splits", "SUPPORTED_DTYPES"]
