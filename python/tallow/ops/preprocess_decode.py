"""Decoding for ``preprocess``: encoded bytes, paths, PIL images or uint8
arrays to H x W x 3 uint8 pixels — Pillow with a format allow-list, the
pixel limit checked from the header, EXIF orientation as a zero-copy numpy
view, and Pillow's pixel buffer read without a copy (Arrow C export).
"""

from __future__ import annotations

import ctypes
import io
import os
import warnings
from typing import Any

import numpy as np
import torch

_JPEG_FORMATS = ("JPEG", "MPO")


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """torchvision ``Resize(resize)`` output (h, w): the shorter side becomes
    ``resize``, the longer ``int(resize * long / short)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)



class _ImageError(Exception):
    """A per-image failure; the message names the problem (not the index)."""


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
