"""Triton INT8 GEMM and INT8 linear (same maths as tallow.ops.int8_matmul).

Quantization (one program per row, ``_quantize_rows``): dynamic asymmetric u8
per row with the float32 operations of :func:`tallow.ops.quantize_rows_ref`
(``x / 255`` and ``1 / scale`` correctly rounded with ``div_rn``,
round-half-even by the 1.5·2^23 trick, FMA contraction off), so q, scale and
zero point are bit-identical to the reference. The tensor cores multiply
s8·s8, so the kernel stores ``q - 128`` (s8) and the epilogue compensates::

    sum_k q[k] W[n,k] - zp colsum[n] = sum_k (q[k] - 128) W[n,k] + (128 - zp) colsum[n]

GEMM (``_int8_gemm``): ``tl.dot`` on int8 tiles with int32 accumulation
(``mma.sync`` s8·s8→s32 on sm_80+), tiles grouped along M for L2 reuse
(GROUP_M swizzle), block sizes autotuned per (M, N, K) on CUDA. The epilogue
fuses, for INT8 linear, ``float(acc) · (scale_x · scale_w[n]) + bias[n]`` and
the activation (ReLU, GELU erf, GELU tanh) and writes float32; for the raw
``int8_matmul`` it writes the int32 accumulator (wrapping modulo 2^32 like
the reference).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACT_CODES = {"none": 0, "relu": 1, "gelu_erf": 2, "gelu_tanh": 3}
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _quantize_rows(X, XQ, SX, ZP, sxm, sqm, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    x = tl.load(X + row * sxm + offs, mask=ok, other=0.0).to(tl.float32)
    # masked lanes hold 0, which the clamps below include anyway (mn <= 0 <= mx)
    mn = tl.minimum(tl.min(x, 0), 0.0)
    mx = tl.maximum(tl.max(x, 0), 0.0)
    bad = tl.max(tl.where(ok & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0), 0) > 0
    scale = tl.math.div_rn(mx - mn, 255.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    inv = tl.math.div_rn(1.0, scale)
    magic = 12582912.0  # 1.5 * 2^23: x + magic - magic rounds |x| < 2^22 half-to-even
    zp = tl.minimum(tl.maximum((-mn * inv + magic) - magic, 0.0), 255.0)
    r = (x * inv + magic) - magic
    q = tl.minimum(tl.maximum(r + zp, 0.0), 255.0)
    q = tl.where(bad, 0.0, q)
    zp = tl.where(bad, 0.0, zp)
    scale = tl.where(bad, float("nan"), scale)
    tl.store(XQ + row * sqm + offs, (q.to(tl.int32) - 128).to(tl.int8), mask=ok)
    tl.store(SX + row, scale)
    tl.store(ZP + row, zp.to(tl.int32))


@triton.jit
def _gelu_erf(y):
    return 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))


@triton.jit
def _gelu_tanh(y):
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) <= 1: no overflow
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0, -t, t)
    return 0.5 * y * (1.0 + t)


# has_bias / act are run-time arguments (not specialised): the autotuner
# compiles each config once per output kind (LINEAR) instead of 8 times.
@triton.jit(do_not_specialize=["has_bias", "act"])
def _int8_gemm(
    A, B, C, SX, ZP, COLSUM, SW, BIAS,
    M, N, K, sam, sak, sbk, sbn, scm, scn, M_BUCKET, has_bias, act,
    LINEAR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * sam + offs_k[None, :].to(tl.int64) * sak
    b_ptrs = B + offs_k[:, None].to(tl.int64) * sbk + offs_n[None, :].to(tl.int64) * sbn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    c_ptrs = C + offs_m[:, None].to(tl.int64) * scm + offs_n[None, :].to(tl.int64) * scn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if LINEAR:
        zp = tl.load(ZP + offs_m, mask=m_ok, other=0)
        sx = tl.load(SX + offs_m, mask=m_ok, other=0.0)
        colsum = tl.load(COLSUM + offs_n, mask=n_ok, other=0)
        sw = tl.load(SW + offs_n, mask=n_ok, other=0.0)
        acc = acc + (128 - zp)[:, None] * colsum[None, :]
        y = acc.to(tl.float32) * (sx[:, None] * sw[None, :])
        if has_bias != 0:
            y = y + tl.load(BIAS + offs_n, mask=n_ok, other=0.0)[None, :]
        if act == 1:
            y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, like torch.relu
        elif act == 2:
            y = _gelu_erf(y)
        elif act == 3:
            y = _gelu_tanh(y)
        tl.store(c_ptrs, y, mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


# Block sizes for the BERT-base / GPT-2 124M linear shapes (K, N in
# {768, 3072, 50257}, M from 1 (decode) to 8·512 tokens): autotuned per
# (M, N, K) bucket on CUDA; the interpreter runs one small config.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1}, num_stages=4, num_warps=4),
]


def _bucket(m: int) -> int:
    return 1 << max(0, (int(m) - 1).bit_length())  # next power of two: few autotune keys


_tuned = triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K", "LINEAR"])(_int8_gemm)
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}


def _launch(a, b, c, sx, zp, colsum, sw, bias, linear: bool, act: int):
    m, k = a.shape
    n = b.shape[1]
    # Unused pointers (int8_matmul has no epilogue vectors, a linear may have
    # no bias) get a real tensor: the kernel never reads them.
    sx, zp, colsum, sw = (t if t is not None else c for t in (sx, zp, colsum, sw))
    has_bias = bias is not None and linear
    args = (a, b, c, sx, zp, colsum, sw, bias if has_bias else c, m, n, k, a.stride(0), a.stride(1),
            b.stride(0), b.stride(1), c.stride(0), c.stride(1), _bucket(m), int(has_bias), int(act))
    meta = dict(LINEAR=linear)
    if _INTERPRET or a.device.type != "cuda":
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
        _int8_gemm[grid](*args, **meta, **_INTERPRET_META, enable_fp_fusion=False)
    else:
        def grid(META):
            return (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)

        # no FMA contraction: the epilogue rounds like the reference (mul, then add)
        _tuned[grid](*args, **meta, enable_fp_fusion=False)


def quantize_rows(x: torch.Tensor):
    """float32 [M, K] (unit stride in K) -> (q - 128 as int8 [M, K], scale [M], zp int32 [M])."""
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    sx = torch.empty(m, dtype=torch.float32, device=x.device)
    zp = torch.empty(m, dtype=torch.int32, device=x.device)
    if m == 0:
        return xq, sx, zp
    block_k = max(16, triton.next_power_of_2(k))
    _quantize_rows[(m,)](x, xq, sx, zp, x.stride(0), xq.stride(0), k, BLOCK_K=block_k, enable_fp_fusion=False,
                         num_warps=8 if block_k >= 2048 else 4)
    return xq, sx, zp


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] @ int8 [K, N] -> int32 [M, N], any strides."""
    m, n = a.shape[0], b.shape[1]
    c = torch.empty(m, n, dtype=torch.int32, device=a.device)
    _launch(a, b, c, None, None, None, None, None, False, 0)
    return c


def int8_linear(x: torch.Tensor, wq_t: torch.Tensor, colsum, weight_scale, bias, activation: str) -> torch.Tensor:
    """float32 x [M, K] -> float32 [M, N]; ``wq_t`` is the int8 weight as a
    [K, N] view (W^T, any strides), colsum int32 [N], weight_scale float32 [N]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    xq, sx, zp = quantize_rows(x)
    m, n = x.shape[0], wq_t.shape[1]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    _launch(xq, wq_t, y, sx, zp, colsum, weight_scale, bias, True, ACT_CODES[activation])
    return y
