"""The CPU API of ``preprocess`` (see ``tallow.ops.preprocess`` for the maths
and the modes): argument checks, geometry (resized size, crop offsets), the
normalisation table, the decode thread pool and the native (or reference)
resample stage, and ``preprocess_ref``, the PIL + torch reference.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .._dispatch import dispatch
from .._native import native
from ..errors import InputError
from .preprocess_decode import _decode, _ImageError, _open, resized_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ORDER = {"cpu": ("cpu", "ref")}
_MODES = ("exact", "fast")
_ERRORS = ("raise", "return")


class PreprocessError(InputError):
    """Some images could not be preprocessed.

    ``index``: the first bad image; ``errors``: one message (or None) per
    image; ``output``: the batch with the good images done, bad rows zero.
    """

    def __init__(self, message: str, index: int, errors: list, output: torch.Tensor):
        super().__init__(message)
        self.index = index
        self.errors = errors
        self.output = output



# ---------------------------------------------------------------- geometry


def _crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """torchvision ``CenterCrop(crop)`` offsets (top, left); round half to even."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _normalize_lut(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[3, 256] float32: ``(v / 255 - mean[c]) / std[c]`` with torchvision's
    float32 operations (ToTensor's ``div(255)``, Normalize's ``sub_``/``div_``),
    so a table lookup gives bit-identical values."""
    v = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
    v = v[None, :].repeat(3, 1)
    m = torch.as_tensor(mean, dtype=torch.float32)[:, None]
    s = torch.as_tensor(std, dtype=torch.float32)[:, None]
    return v.sub_(m).div_(s).contiguous()


# ---------------------------------------------------------------- backends


def _resample_cpu(arrays: list, out: torch.Tensor, lut: torch.Tensor, resize: int, crop: int,
                  parallel: bool) -> list:
    """Native stage; returns None or an error message per image."""
    return native().preprocess_resample(arrays, out.numpy(), lut.numpy(), resize, crop, parallel)


def _resample_ref(arrays: list, out: torch.Tensor, lut: torch.Tensor, resize: int, crop: int,
                  parallel: bool) -> list:
    from PIL import Image

    errs: list = [None] * len(arrays)
    for i, a in enumerate(arrays):
        if a is None:
            out[i].zero_()
            continue
        try:
            img = Image.fromarray(np.ascontiguousarray(a))
            out[i].copy_(_pil_resize_crop_normalize(img, resize, crop, lut))
        except (MemoryError, OSError) as exc:
            errs[i] = f"resample failed: {type(exc).__name__}: {exc}"
            out[i].zero_()
    return errs


_IMPLS = {"cpu": _resample_cpu, "ref": _resample_ref}


def _pil_resize_crop_normalize(img, resize: int, crop: int, lut: torch.Tensor) -> torch.Tensor:
    """Resize/CenterCrop with Pillow as torchvision does, ToTensor + Normalize
    (as the table built with torchvision's float32 operations)."""
    from PIL import Image

    w, h = img.size
    nh, nw = resized_size(h, w, resize)
    if (nh, nw) != (h, w):  # torchvision skips the resize when sizes match
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = _crop_offsets(nh, nw, crop)
    img = img.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).to(torch.int64)
    return torch.gather(lut, 1, x.reshape(3, -1)).reshape(3, crop, crop)


# ---------------------------------------------------------------- validation


def _check_args(images, resize, crop, mean, std, out, mode, errors, max_megapixels, num_threads):
    if isinstance(images, (bytes, bytearray, memoryview, np.ndarray, torch.Tensor, str)):
        raise TypeError(
            f"preprocess: images must be a list of images, got a single {type(images).__name__} "
            "(wrap it in a list)"
        )
    try:
        images = list(images)
    except TypeError:
        raise TypeError(f"preprocess: images must be a list of images, got {type(images).__name__}") from None
    for name, v in (("resize", resize), ("crop", crop)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"preprocess: {name} must be an int >= 1, got {v!r}")
    if crop > resize:
        raise ValueError(f"preprocess: crop must be <= resize, got crop={crop} and resize={resize}")
    for name, v in (("mean", mean), ("std", std)):
        try:
            vals = [float(x) for x in v]
        except (TypeError, ValueError):
            raise ValueError(f"preprocess: {name} must be 3 numbers, got {v!r}") from None
        if len(vals) != 3 or not all(math.isfinite(x) for x in vals):
            raise ValueError(f"preprocess: {name} must be 3 finite numbers, got {v!r}")
        if name == "std" and any(x == 0 for x in vals):
            raise ValueError(f"preprocess: std must not contain 0, got {v!r}")
    if mode not in _MODES:
        raise ValueError(f"preprocess: mode must be one of {_MODES}, got {mode!r}")
    if errors not in _ERRORS:
        raise ValueError(f"preprocess: errors must be one of {_ERRORS}, got {errors!r}")
    if not isinstance(max_megapixels, (int, float)) or isinstance(max_megapixels, bool) or not max_megapixels > 0:
        raise ValueError(f"preprocess: max_megapixels must be a number > 0, got {max_megapixels!r}")
    if num_threads is not None and (not isinstance(num_threads, int) or isinstance(num_threads, bool)
                                    or num_threads < 1):
        raise ValueError(f"preprocess: num_threads must be an int >= 1 or None, got {num_threads!r}")
    shape = (len(images), 3, int(crop), int(crop))
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"preprocess: out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != torch.float32:
            raise ValueError(f"preprocess: out must be float32, got {out.dtype}")
        if tuple(out.shape) != shape:
            raise ValueError(f"preprocess: out must have shape {shape}, got {tuple(out.shape)}")
        if out.device.type != "cpu":
            raise ValueError(f"preprocess: out must be on the CPU, got {out.device}")
        if not out.is_contiguous():
            raise ValueError("preprocess: out must be contiguous")
        if out.requires_grad:
            raise ValueError("preprocess: out must not require grad")
    return images, shape


def _default_threads() -> int:
    try:
        from .. import get_num_threads

        return get_num_threads()
    except Exception:  # native module missing: the ref path still runs
        import os

        return max(1, len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------- public API


def preprocess(
    images: Sequence[Any],
    *,
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out: Optional[torch.Tensor] = None,
    mode: str = "exact",
    errors: str = "raise",
    max_megapixels: float = 64.0,
    num_threads: Optional[int] = None,
):
    """Decodes, resizes, center-crops and normalises a batch of images into
    one ``[N, 3, crop, crop]`` float32 tensor (see the module docstring).

    images: a list of encoded images (bytes of any format Pillow reads, or
        file paths), PIL images, or uint8 numpy arrays / CPU tensors of shape
        (H, W, 3) or (H, W).
    mode: ``"exact"`` (matches :func:`preprocess_ref`) or ``"fast"`` (JPEG
        DCT-domain downscaling when the image is >= 2x the resized size).
    out: optional preallocated contiguous float32 tensor of the output shape.
    errors: ``"raise"`` (PreprocessError, a ValueError naming the first bad
        index) or ``"return"`` (returns ``(batch, errors)`` with one message or
        None per image; bad rows are zero).
    max_megapixels: images with more pixels are refused before decoding.
    num_threads: decode threads (default: tallow.get_num_threads()).
    """
    images, shape = _check_args(images, resize, crop, mean, std, out, mode, errors, max_megapixels,
                                num_threads)
    resize, crop = int(resize), int(crop)
    result = out if out is not None else torch.empty(shape, dtype=torch.float32)
    n = len(images)
    errs: list = [None] * n
    if n:
        lut = _normalize_lut(mean, std)
        fast = mode == "fast"
        max_pixels = float(max_megapixels) * 1e6
        threads = num_threads if num_threads is not None else _default_threads()

        opened: list = [None] * n

        def open_one(i: int) -> None:
            try:
                opened[i] = _open(images[i], max_pixels)
            except _ImageError as exc:
                errs[i] = str(exc)

        def resample(arrays, rows, parallel):
            return dispatch("preprocess", "cpu", _ORDER, _IMPLS, arrays, rows, lut, resize, crop, parallel)

        if all(isinstance(item, (np.ndarray, torch.Tensor)) for item in images):
            # Nothing to decode: one native call, parallel across images.
            for i in range(n):
                open_one(i)
            for i, e in enumerate(resample([None if o is None else o[1] for o in opened], result, True)):
                if e is not None:
                    errs[i] = e
        else:
            def work(i: int) -> None:
                # Decode and resample image i on this thread (both release the
                # GIL), so the decoded pixels are still in cache.
                row = result[i:i + 1]
                if opened[i] is None:
                    row.zero_()
                    return
                try:
                    a, keep = _decode(opened[i], fast, resize)
                except _ImageError as exc:
                    errs[i] = str(exc)
                    row.zero_()
                    return
                opened[i] = None  # free the decoder state early
                e = resample([a], row, False)[0]
                if e is not None:
                    errs[i] = e
                del keep  # Pillow's pixels may be released now

            if threads <= 1 or n == 1:
                for i in range(n):
                    open_one(i)
                    work(i)
            else:
                # Headers are opened on this thread (cheap; Pillow's bomb
                # warnings are caught here), each image handed to the pool as
                # soon as it is open.
                with concurrent.futures.ThreadPoolExecutor(max_workers=min(threads, n)) as pool:
                    futures = []
                    for i in range(n):
                        open_one(i)
                        futures.append(pool.submit(work, i))
                    for f in futures:
                        f.result()
    if errors == "return":
        return result, errs
    bad = [i for i, e in enumerate(errs) if e is not None]
    if bad:
        i = bad[0]
        more = f" ({len(bad)} of {n} images failed: indices {bad[:10]}{'...' if len(bad) > 10 else ''}; " \
               "the others are done, see .errors and .output)" if len(bad) > 1 else \
               " (the other images are done: see .errors and .output)"
        raise PreprocessError(f"preprocess: image {i}: {errs[i]}{more}", i, errs, result)
    return result


def preprocess_ref(
    images: Sequence[Any],
    *,
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The plain PIL + numpy/torch pipeline (the oracle): for each image
    ``Image.open`` -> ``ImageOps.exif_transpose`` -> ``convert("RGB")`` ->
    torchvision's Resize(resize) -> CenterCrop(crop) -> ToTensor ->
    Normalize(mean, std), written out step by step; arrays go through
    ``Image.fromarray``. Raises on any bad image."""
    from PIL import Image, ImageOps

    m = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    outs = []
    for item in images:
        if isinstance(item, torch.Tensor):
            item = item.numpy()
        if isinstance(item, Image.Image):
            img = ImageOps.exif_transpose(item)  # a copy: the caller's image stays as it is
        else:
            if isinstance(item, np.ndarray):
                img = Image.fromarray(item)
            else:
                img = Image.open(item if isinstance(item, (str, os.PathLike)) else io.BytesIO(bytes(item)))
            ImageOps.exif_transpose(img, in_place=True)  # our own image: no extra copy
        img = img.convert("RGB")
        w, h = img.size
        nh, nw = resized_size(h, w, resize)
        if (nh, nw) != (h, w):
            img = img.resize((nw, nh), Image.BILINEAR)
        top, left = _crop_offsets(nh, nw, crop)
        img = img.crop((left, top, left + crop, top + crop))
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        x = x.to(torch.float32).div(255)
        outs.append(x.sub_(m).div_(s))
    if not outs:
        return torch.empty((0, 3, crop, crop), dtype=torch.float32)
    return torch.stack(outs)
