"""The GPU API of ``preprocess``: ``preprocess_tensors`` resizes, crops and
normalises uint8 images already on a device in one kernel launch per batch
(``cuda``: csrc/cuda/preprocess.cu, ``triton``: kernels/preprocess.py),
bit-exact with the CPU path; the taps are planned on the host (``gpu_plan``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .._dispatch import dispatch
from .preprocess_cpu import (IMAGENET_MEAN, IMAGENET_STD, _crop_offsets, _normalize_lut,
                             _pil_resize_crop_normalize, _resample_cpu, resized_size)

# ---------------------------------------------------------------- GPU entry point
#
# Decoding stays on the CPU (Pillow); images already decoded to uint8 HWC
# tensors on a CUDA device are resized/cropped/normalised by one kernel
# launch per batch (backends ``cuda``: csrc/cuda/preprocess.cu, ``triton``:
# kernels/preprocess.py), bit-exact with the CPU path. The taps of the
# cropped rows/columns are computed here, on the host, in float64 exactly
# like Pillow's precompute_coeffs (and like csrc/preprocess/preprocess.cpp).

_GPU_ORDER = {"cuda": ("cuda", "triton", "ref"), "cpu": ("cpu", "ref")}
_PRECISION_BITS = 22


def bilinear_taps(in_size: int, out_size: int, first: int, count: int):
    """Pillow's bilinear taps (support 1, antialiased: scaled by the shrink
    factor) for output indices [first, first + count) of an in_size ->
    out_size resize: (start int32 [count], taps int32 [count], coeff int32
    [count, ksize]) with 22-bit fixed-point coefficients."""
    scale = in_size / out_size
    filterscale = 1.0 if scale < 1.0 else scale
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    xx = np.arange(first, first + count, dtype=np.int64)
    center = (xx + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward 0
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    w = np.zeros((count, ksize), dtype=np.float64)
    ww = np.zeros(count, dtype=np.float64)
    for x in range(ksize):  # sequential sums, in Pillow's order
        t = np.abs(((x + xmin) - center + 0.5) * ss)
        v = np.where(t < 1.0, 1.0 - t, 0.0)
        v = np.where(x < xmax, v, 0.0)
        w[:, x] = v
        ww = ww + v
    v = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    coeff = np.where(v < 0, -0.5 + v * (1 << _PRECISION_BITS), 0.5 + v * (1 << _PRECISION_BITS)).astype(np.int32)
    return xmin.astype(np.int32), xmax.astype(np.int32), coeff


def _vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    # Pillow 13 runs the vertical pass first exactly when the image is more
    # than twice as tall as wide and both sides shrink (see the CPU kernel).
    return in_h > 2 * in_w and out_w < in_w and out_h < in_h


def gpu_plan(sizes: Sequence[tuple[int, int]], offsets: Sequence[int], resize: int, crop: int):
    """Per-image geometry and taps for the GPU kernels.

    Returns ``meta`` int64 [N, 8] = (src_offset, in_h, in_w, vfirst,
    taps_x_offset, kx, taps_y_offset, ky) and ``taps`` int32: per image and
    axis, ``start[crop]``, ``count[crop]``, ``coeff[crop, k]`` back to back."""
    meta = np.zeros((len(sizes), 8), dtype=np.int64)
    chunks: list = []
    pos = 0
    for i, ((h, w), off) in enumerate(zip(sizes, offsets)):
        nh, nw = resized_size(h, w, resize)
        top, left = _crop_offsets(nh, nw, crop)
        if top < 0 or left < 0 or top + crop > nh or left + crop > nw:
            raise ValueError(f"preprocess_tensors: crop {crop} does not fit image {i} resized to {nh}x{nw}")
        row = [int(off), h, w, int(_vertical_first(h, w, nh, nw))]
        for in_size, out_size, first in ((w, nw, left), (h, nh, top)):
            start, count, coeff = bilinear_taps(in_size, out_size, first, crop)
            row += [pos, coeff.shape[1]]
            chunks += [start, count, coeff.reshape(-1)]
            pos += 2 * crop + coeff.size
        meta[i] = row
    taps = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return meta, taps


def _preprocess_gpu_ref(packed, meta, taps, lut, out, sizes, resize, crop):
    """Fallback: Pillow on the CPU per image (the oracle), copied back."""
    from PIL import Image

    host = packed.cpu().numpy()
    for i, (h, w) in enumerate(sizes):
        off = int(meta[i, 0])
        a = host[off:off + h * w * 3].reshape(h, w, 3)
        out[i].copy_(_pil_resize_crop_normalize(Image.fromarray(a), resize, crop, lut).to(out.dtype))
    return out


def _preprocess_gpu_cuda(packed, meta, taps, lut, out, sizes, resize, crop):
    from .. import _gpu

    mod = _gpu.cuda_backend(packed)
    dev = packed.device
    meta_d = torch.from_numpy(meta).to(dev, non_blocking=True)
    taps_d = torch.from_numpy(taps).to(dev, non_blocking=True)
    lut_d = lut.to(dev)
    with torch.cuda.device(dev):
        mod.preprocess_resample(packed.data_ptr(), meta_d.data_ptr(), taps_d.data_ptr(), lut_d.data_ptr(),
                                out.data_ptr(), out.shape[0], crop, 0 if out.dtype == torch.float32 else 1,
                                _gpu.stream_of(packed))
    return out


def _preprocess_gpu_triton(packed, meta, taps, lut, out, sizes, resize, crop):
    from .. import _gpu

    kern = _gpu.triton_kernels("preprocess", packed)
    dev = packed.device
    with torch.cuda.device(dev):
        kern.resample(packed, torch.from_numpy(meta).to(dev), torch.from_numpy(taps).to(dev), lut.to(dev), out)
    return out


def _preprocess_gpu_cpu(packed, meta, taps, lut, out, sizes, resize, crop):
    arrays = [packed[int(meta[i, 0]):int(meta[i, 0]) + h * w * 3].view(h, w, 3).numpy() for i, (h, w) in
              enumerate(sizes)]
    tmp = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
    errs = _resample_cpu(arrays, tmp, lut, resize, crop, True)
    bad = [e for e in errs if e is not None]
    if bad:
        raise RuntimeError(f"preprocess_tensors: {bad[0]}")
    if tmp is not out:
        out.copy_(tmp)
    return out


_GPU_IMPLS = {"cuda": _preprocess_gpu_cuda, "triton": _preprocess_gpu_triton, "cpu": _preprocess_gpu_cpu,
              "ref": _preprocess_gpu_ref}


def pack_images(images: Sequence[torch.Tensor]):
    """A list of uint8 ``(H, W, 3)`` tensors on one device -> (packed uint8
    buffer, offsets, sizes): one device copy of all images back to back."""
    sizes, offsets, pos = [], [], 0
    for i, t in enumerate(images):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"preprocess_tensors: image {i} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.uint8:
            raise TypeError(f"preprocess_tensors: image {i} must be uint8, got {t.dtype}")
        if t.dim() != 3 or t.shape[2] != 3 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"preprocess_tensors: image {i} must have shape (H, W, 3), got {tuple(t.shape)}")
        if t.device != images[0].device:
            raise ValueError(f"preprocess_tensors: image {i} is on {t.device}, image 0 on {images[0].device}")
        sizes.append((int(t.shape[0]), int(t.shape[1])))
        offsets.append(pos)
        pos += t.numel()
    if not images:
        return torch.empty(0, dtype=torch.uint8), [], []
    packed = torch.cat([t.reshape(-1) for t in images])
    return packed, offsets, sizes


def preprocess_tensors(
    images=None,
    *,
    packed: Optional[torch.Tensor] = None,
    offsets: Optional[Sequence[int]] = None,
    sizes: Optional[Sequence[tuple[int, int]]] = None,
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Resize (shorter side, Pillow's antialiased bilinear), center-crop and
    normalise already-decoded uint8 RGB images, on their device.

    Give either ``images``, a list of uint8 ``(H, W, 3)`` tensors (sizes may
    differ), or ``packed`` (1-D uint8, the images' HWC bytes back to back)
    with ``offsets`` (start of each image in ``packed``) and ``sizes``
    ((H, W) per image). Returns ``[N, 3, crop, crop]`` of ``out_dtype``
    (float32, or float16 for CUDA tensors) on the images' device, equal to
    :func:`preprocess` / :func:`preprocess_ref` of the same pixels (float16:
    the float32 values rounded). On CUDA: one kernel launch for the batch."""
    for name, v in (("resize", resize), ("crop", crop)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"preprocess_tensors: {name} must be an int >= 1, got {v!r}")
    if crop > resize:
        raise ValueError(f"preprocess_tensors: crop must be <= resize, got crop={crop} and resize={resize}")
    if out_dtype not in (torch.float32, torch.float16):
        raise TypeError(f"preprocess_tensors: out_dtype must be torch.float32 or torch.float16, got {out_dtype}")
    if images is not None:
        if packed is not None or offsets is not None or sizes is not None:
            raise ValueError("preprocess_tensors: give either images or packed/offsets/sizes, not both")
        if isinstance(images, torch.Tensor):
            raise TypeError("preprocess_tensors: images must be a list of (H, W, 3) tensors (wrap one in a list)")
        images = list(images)
        packed, offsets, sizes = pack_images(images)
        if images:
            packed = packed.to(images[0].device)
    else:
        if packed is None or offsets is None or sizes is None:
            raise ValueError("preprocess_tensors: give images, or all of packed, offsets and sizes")
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
            raise TypeError("preprocess_tensors: packed must be a 1-D uint8 tensor")
        packed = packed.contiguous()
        offsets = [int(o) for o in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]
        sizes = [(int(h), int(w)) for h, w in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
        if len(offsets) != len(sizes):
            raise ValueError(f"preprocess_tensors: {len(offsets)} offsets but {len(sizes)} sizes")
        for i, ((h, w), o) in enumerate(zip(sizes, offsets)):
            if h < 1 or w < 1 or o < 0 or o + h * w * 3 > packed.numel():
                raise ValueError(f"preprocess_tensors: image {i} (offset {o}, size {h}x{w}) is outside packed "
                                 f"({packed.numel()} bytes)")
    for name, v in (("mean", mean), ("std", std)):
        vals = [float(x) for x in v]
        if len(vals) != 3 or not all(math.isfinite(x) for x in vals) or (name == "std" and 0.0 in vals):
            raise ValueError(f"preprocess_tensors: {name} must be 3 finite numbers (std nonzero), got {v!r}")
    resize, crop = int(resize), int(crop)
    dev = packed.device
    if dev.type == "cpu" and out_dtype != torch.float32:
        raise TypeError("preprocess_tensors: float16 output is for CUDA tensors; CPU gives float32")
    if len(sizes) > 65535:  # a grid dimension of the kernels
        raise ValueError(f"preprocess_tensors: at most 65535 images per call, got {len(sizes)}")
    out = torch.empty((len(sizes), 3, crop, crop), dtype=out_dtype, device=dev)
    if not sizes:
        return out
    meta, taps = gpu_plan(sizes, offsets, resize, crop)
    lut = _normalize_lut(mean, std)
    return dispatch("preprocess", dev.type, _GPU_ORDER, _GPU_IMPLS, packed, meta, taps, lut, out, sizes,
                    resize, crop)
