"""Batched ImageNet preprocessing: torchvision's eval transform, fused.

For every image (encoded JPEG/PNG/WebP/... bytes or a file path, a PIL
image, or an ``H x W x 3`` / ``H x W`` uint8 array)::

    RGB  = exif_transpose(decode(bytes)).convert("RGB")
    R    = Resize(resize)(RGB)       # shorter side -> resize, longer side
                                     # int(resize * long / short); Pillow's
                                     # antialiased bilinear (triangle filter
                                     # whose support grows with the scale)
    C    = CenterCrop(crop)(R)       # top = int(round((h - crop) / 2)), ditto left
    out[n, c] = (C[..., c] / 255 - mean[c]) / std[c]      # float32, NCHW

Backends: ``cpu`` (tallow._C) computes only the cropped rows/columns of the
resize with Pillow's own fixed-point coefficients (libImaging/Resample.c:
separable, horizontal pass into a uint8 intermediate, then vertical, 22-bit
coefficients, clip8), fused with the normalisation (a float32 look-up table
built with torchvision's exact float32 operations) and the HWC -> CHW write
into the preallocated batch; images run in parallel (decode in a thread pool,
Pillow releases the GIL; the native stage releases it too). ``ref`` does the
same decode, then Pillow's resize/crop and torch's normalisation.

Modes:

- ``"exact"``: full-resolution decode, then the resize above: bit-identical
  float32 output to the PIL pipeline (:func:`preprocess_ref`), tested on
  random sizes, formats, modes and EXIF orientations. Note (measured with
  Pillow 13.0.0, not in upstream Pillow's Resample.c): Pillow runs the
  *vertical* pass first when the image is more than twice as tall as wide
  and shrinks; the uint8 intermediate makes the order visible (±1 level),
  so tallow does the same.
- ``"fast"``: JPEGs at least twice the resized size are decoded with
  libjpeg's DCT-domain downscaling (``Image.draft``: 1/2, 1/4 or 1/8 scale,
  never below the resized size), then resized the same way. Mean absolute
  error vs exact, in uint8 levels: 0.3-0.5 on photo-like images from
  1024x768 to 4000x3000 (p99 <= 2, max 7), asserted <= 2.5 in the tests.
  Smaller JPEGs, other formats and arrays are processed as in exact mode.

Errors: corrupt/truncated data, unsupported item types, empty images, images
above ``max_megapixels`` (checked from the header, before decoding: a
decompression bomb is never decoded; Pillow's own DecompressionBombError and
DecompressionBombWarning are turned into the same per-image error) and
arrays of the wrong dtype/shape are per-image errors. ``errors="raise"``
raises :class:`PreprocessError` (a ValueError naming the first bad index;
``.errors`` lists every image's message or None, ``.output`` holds the batch
with the good images done and bad rows zero-filled; with ``out=`` the good
rows are written there too). ``errors="return"`` returns
``(batch, errors)`` instead of raising.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import io
import math
import os
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .._dispatch import dispatch
from ..errors import InputError
from .._native import native

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ORDER = {"cpu": ("cpu", "ref")}
_MODES = ("exact", "fast")
_ERRORS = ("raise", "return")
_JPEG_FORMATS = ("JPEG", "MPO")


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


class _ImageError(Exception):
    """A per-image failure; the message names the problem (not the index)."""


# ---------------------------------------------------------------- geometry


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """torchvision ``Resize(resize)`` output (h, w): the shorter side becomes
    ``resize``, the longer ``int(resize * long / short)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


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


# ---------------------------------------------------------------- loading

# EXIF orientation -> the same pixel permutation as ImageOps.exif_transpose,
# as a numpy view of the H x W x C array (no copy).
_ORIENT_VIEWS = {
    2: lambda a: a[:, ::-1],                      # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],                   # ROTATE_180
    4: lambda a: a[::-1],                         # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),            # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],   # ROTATE_270
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],      # ROTATE_90
}


def _as_rgb_view(a: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) uint8 -> an (H, W, 3) view (grayscale
    is broadcast, not copied)."""
    if a.dtype != np.uint8:
        raise _ImageError(f"array must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.broadcast_to(a[:, :, None], (a.shape[0], a.shape[1], 3))
    elif a.ndim != 3 or a.shape[2] != 3:
        raise _ImageError(f"array must have shape (H, W, 3) or (H, W), got {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise _ImageError(f"image is empty, shape {tuple(a.shape)}")
    return a


def _check_pixels(w: int, h: int, max_pixels: float) -> None:
    if w <= 0 or h <= 0:
        raise _ImageError(f"image is empty ({w}x{h})")
    if w * h > max_pixels:
        raise _ImageError(
            f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, above max_megapixels={max_pixels / 1e6:g} "
            "(decompression bomb?)"
        )


def _open(item: Any, max_pixels: float):
    """First, cheap stage (main thread): open the header, check the size.

    Returns ("array", ndarray view) or ("image", PIL image (not yet decoded
    when we opened it), EXIF orientation or None when it must be read after
    decoding, whether we opened it)."""
    from PIL import Image

    if isinstance(item, torch.Tensor):
        if item.device.type != "cpu":
            raise _ImageError(f"tensor must be on the CPU, got {item.device}")
        item = item.detach().numpy()
    if isinstance(item, np.ndarray):
        a = _as_rgb_view(item)
        _check_pixels(a.shape[1], a.shape[0], max_pixels)
        return ("array", a)
    owned = True
    if isinstance(item, Image.Image):
        # The caller's image: decode it here, on the calling thread (the same
        # object may appear twice in the batch), and never draft() it.
        img, owned = item, False
        try:
            img.load()
        except Exception as exc:
            raise _ImageError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    elif isinstance(item, (bytes, bytearray, memoryview, str, os.PathLike)):
        if not isinstance(item, (str, os.PathLike)) and len(item) == 0:
            raise _ImageError("empty bytes")
        # Pillow warns (DecompressionBombWarning) or raises from open() itself;
        # the warning is turned into this image's error, never leaked. This
        # runs on the calling thread only (warnings filters are global).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(item if isinstance(item, (str, os.PathLike)) else io.BytesIO(bytes(item)))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _ImageError(f"decompression bomb: {exc}") from None
            except Exception as exc:  # UnidentifiedImageError, SyntaxError, ...
                raise _ImageError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    else:
        raise _ImageError(
            f"unsupported type {type(item).__name__}; expected encoded bytes, a file path, a PIL image, "
            "or a uint8 numpy array / torch tensor of shape (H, W, 3) or (H, W)"
        )
    w, h = img.size
    _check_pixels(w, h, max_pixels)
    orientation = None
    if not owned or img.format in _JPEG_FORMATS:
        # JPEG's EXIF sits in the header (and the caller's images are already
        # loaded): read it here, where warnings are caught; other formats may
        # keep it after the pixel data, read once decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:
                orientation = 1
    return ("image", img, orientation, owned)


def _decode(opened, fast: bool, resize: int):
    """Second, heavy stage (any thread): decode to an (H, W, 3) uint8 view,
    EXIF orientation applied; returns (view, object to keep alive with it)."""
    if opened[0] == "array":
        return opened[1], None
    _, img, orientation, owned = opened
    try:
        if fast and owned and img.format in _JPEG_FORMATS:
            w, h = img.size
            th, tw = resized_size(h, w, resize)
            if w >= 2 * tw and h >= 2 * th:
                img.draft("RGB", (tw, th))
        img.load()
        if orientation is None:
            orientation = img.getexif().get(0x0112, 1)
        if img.mode != "RGB":
            img = img.convert("RGB")
        a, keep = _rgb_pixels(img)
    except _ImageError:
        raise
    except Exception as exc:  # truncated data, broken streams, unsupported modes
        raise _ImageError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise _ImageError(f"decoded image has shape {a.shape}")
    view = _ORIENT_VIEWS.get(orientation)
    return (view(a) if view is not None else a), keep


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _rgb_pixels(img):
    """(H, W, 3) uint8 view of a loaded RGB PIL image and an object to keep
    alive while the view is used.

    Pillow stores RGB as 4 bytes per pixel (RGBX); ``np.asarray`` repacks it
    into a new buffer (~1 ms for 1024x768). Through the Arrow C data
    interface (Pillow >= 11.2: a fixed-size list of 4 uint8 per pixel over
    the image's own memory) the kernel reads Pillow's buffer in place, with a
    column stride of 4. Falls back to ``np.asarray`` when the export is not
    available (older Pillow, an image stored in several blocks)."""
    w, h = img.size
    try:
        schema, array = img.__arrow_c_array__()
        s = _ArrowSchema.from_address(_capsule_pointer(schema, b"arrow_schema"))
        a = _ArrowArray.from_address(_capsule_pointer(array, b"arrow_array"))
        if (s.format == b"+w:4" and s.n_children == 1 and s.children[0].contents.format == b"C"
                and a.n_children == 1 and a.length == w * h and a.offset == 0):
            child = a.children[0].contents
            if child.n_buffers == 2 and child.buffers[1] and child.length == 4 * w * h:
                base = child.buffers[1] + child.offset
                buf = (ctypes.c_uint8 * (4 * w * h)).from_address(base)
                rgbx = np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 4)
                # The capsules' release callbacks drop Pillow's reference to
                # the pixels: keep them (and the image) alive with the view.
                return rgbx[:, :, :3], (schema, array, img)
    except Exception:  # no Arrow export here: copy instead
        pass
    return np.asarray(img), None


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
