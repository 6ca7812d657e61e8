"""Triton batched ImageNet preprocessing: antialiased bilinear resize of the
shorter side + center crop + normalize, NCHW, one launch per batch.

Bit-exact with Pillow's ``Image.resize(BILINEAR)`` (libImaging/Resample.c:
separable, 22-bit fixed-point taps from ``precompute_coeffs``, a clip8'ed
uint8 intermediate) followed by torchvision's CenterCrop / ToTensor /
Normalize, i.e. with :func:`tallow.ops.preprocess_ref`. For output pixel
(i, j) of the crop and channel c, horizontal pass first::

    t[r]  = clip8(2^21 + sum_s src[r, xs_j + s, c] · kx[j, s])         r = ys_i + t
    v     = clip8(2^21 + sum_t t[ys_i + t] · ky[i, t])
    out   = lut[c, v]      (lut[c, v] = (v / 255 - mean[c]) / std[c], float32)

with clip8(s) = clamp(s >> 22, 0, 255); Pillow 13 runs the vertical pass first
when the image is more than twice as tall as wide and shrinks (the ``vfirst``
flag swaps the two sums). The taps (start, count, coefficients) of the
cropped rows/columns and per-image geometry are computed on the host by
``tallow.ops.preprocess`` (``gpu_plan``) in float64 exactly like Pillow; this
kernel takes the images packed in one uint8 buffer (HWC, per-image offsets,
so sizes may differ). Grid: (block of BLOCK_I crop rows, image n, block of
BLOCK_J columns); each program computes a BLOCK_I × BLOCK_J × 3 tile straight
from the source pixels (the intermediate values are recomputed per output
row/column: no shared state, one launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# meta columns (int64): see tallow.ops.preprocess.gpu_plan
META_COLS = 8  # src_offset, in_h, in_w, vfirst, taps_x_offset, kx, taps_y_offset, ky


@triton.jit
def _clip8(s):
    return tl.minimum(tl.maximum(s >> 22, 0), 255)


@triton.jit
def _resample(SRC, META, TAPS, LUT, OUT, CROP, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    n = tl.program_id(1)
    meta = META + n.to(tl.int64) * 8
    src = SRC + tl.load(meta + 0)
    in_w = tl.load(meta + 2)
    vfirst = tl.load(meta + 3)
    hx = tl.load(meta + 4)
    kx = tl.load(meta + 5).to(tl.int32)
    vy = tl.load(meta + 6)
    ky = tl.load(meta + 7).to(tl.int32)
    row_stride = in_w * 3
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.arange(0, 4)
    i_ok = i < CROP
    j_ok = j < CROP
    c3 = (c < 3)[None, None, :]
    xs = tl.load(TAPS + hx + j, mask=j_ok, other=0)
    xn = tl.load(TAPS + hx + CROP + j, mask=j_ok, other=0)
    ys = tl.load(TAPS + vy + i, mask=i_ok, other=0)
    yn = tl.load(TAPS + vy + CROP + i, mask=i_ok, other=0)
    cx = TAPS + hx + 2 * CROP + j * kx  # [BLOCK_J] pointers to each column's taps
    cy = TAPS + vy + 2 * CROP + i * ky  # [BLOCK_I]
    acc = tl.zeros([BLOCK_I, BLOCK_J, 4], tl.int32)
    if vfirst == 0:
        for t in range(0, ky):
            t_ok = i_ok & (t < yn)
            wy = tl.load(cy + t, mask=t_ok, other=0)
            row = ((ys + t).to(tl.int64) * row_stride)[:, None, None]
            h = tl.zeros([BLOCK_I, BLOCK_J, 4], tl.int32)
            for s in range(0, kx):
                s_ok = j_ok & (s < xn)
                wx = tl.load(cx + s, mask=s_ok, other=0)
                ok = t_ok[:, None, None] & s_ok[None, :, None] & c3
                px = tl.load(src + row + ((xs + s) * 3)[None, :, None] + c[None, None, :], mask=ok, other=0)
                h += px.to(tl.int32) * wx[None, :, None]
            acc += _clip8(h + (1 << 21)) * wy[:, None, None]
    else:
        for s in range(0, kx):
            s_ok = j_ok & (s < xn)
            wx = tl.load(cx + s, mask=s_ok, other=0)
            col = ((xs + s) * 3)[None, :, None] + c[None, None, :]
            v = tl.zeros([BLOCK_I, BLOCK_J, 4], tl.int32)
            for t in range(0, ky):
                t_ok = i_ok & (t < yn)
                wy = tl.load(cy + t, mask=t_ok, other=0)
                row = ((ys + t).to(tl.int64) * row_stride)[:, None, None]
                ok = t_ok[:, None, None] & s_ok[None, :, None] & c3
                px = tl.load(src + row + col, mask=ok, other=0)
                v += px.to(tl.int32) * wy[:, None, None]
            acc += _clip8(v + (1 << 21)) * wx[None, :, None]
    val = _clip8(acc + (1 << 21))
    out = tl.load(LUT + c[None, None, :] * 256 + val, mask=c3, other=0.0)
    plane = CROP * CROP
    offs = c[None, None, :] * plane + i[:, None, None] * CROP + j[None, :, None]
    ok = i_ok[:, None, None] & j_ok[None, :, None] & c3
    tl.store(OUT + n.to(tl.int64) * 3 * plane + offs.to(tl.int64), out.to(OUT.dtype.element_ty), mask=ok)


def resample(packed: torch.Tensor, meta: torch.Tensor, taps: torch.Tensor, lut: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    """packed uint8 [total], meta int64 [N, 8], taps int32, lut float32 [3, 256],
    out [N, 3, crop, crop] (float32 or float16, contiguous) — one launch."""
    n, crop = out.shape[0], out.shape[-1]
    if n == 0:
        return out
    if out.device.type == "cuda":
        block_i, block_j = 4, 32
    else:  # interpreter: few, large programs (each op costs the same at any size)
        block_i = block_j = min(32, max(2, triton.next_power_of_2(crop)))
    grid = (triton.cdiv(crop, block_i), n, triton.cdiv(crop, block_j))
    # integer maths only; the option is explicit so Triton 3.9 does not warn
    _resample[grid](packed, meta, taps, lut, out, crop, BLOCK_I=block_i, BLOCK_J=block_j, enable_fp_fusion=True)
    return out
