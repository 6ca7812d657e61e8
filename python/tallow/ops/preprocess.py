"""Batched ImageNet preprocessing: torchvision's eval transform, fused — the
op's public module. Code: ``preprocess_decode`` (Pillow, EXIF, zero-copy
pixel access), ``preprocess_cpu`` (the CPU API), ``preprocess_gpu`` (the GPU
API); this module documents the op and re-exports them.

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

# The private helpers are re-exported for the tests and benchmarks that import them from here.
from .preprocess_cpu import (IMAGENET_MEAN, IMAGENET_STD, PreprocessError, _crop_offsets,  # noqa: F401
                             _normalize_lut, preprocess, preprocess_ref)
from .preprocess_decode import _rgb_pixels, resized_size  # noqa: F401
from .preprocess_gpu import bilinear_taps, gpu_plan, pack_images, preprocess_tensors

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PreprocessError", "bilinear_taps", "gpu_plan", "pack_images",
           "preprocess", "preprocess_ref", "preprocess_tensors", "resized_size"]
