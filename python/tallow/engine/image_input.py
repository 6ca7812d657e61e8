"""Checks of image-search input, before anything is decoded or written:
ids, payloads, the encoded bytes, and the image header (format, size,
megapixels). Bad input raises ``ImageInputError`` (an ``InputError``) with
``kind`` "unsupported" (not an image in a supported format: the server's 415),
"too_large" (above ``max_megapixels``, read from the header) or "invalid"
(422), and ``param`` "image" when the image is at fault.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from ..errors import InputError

RESERVED_PREFIX = "_tallow"
MAX_ID_CHARS = 256
# Payloads live in the index's memory and its snapshot as well as in the store:
# bound them so one client cannot bloat every later save.
MAX_PAYLOAD_BYTES = 64 * 1024
# Formats Image.open may pick. Restricting them matters for a server: Pillow's
# EPS plugin runs Ghostscript, and other exotic decoders widen the attack surface.
# (MPO, multi-picture JPEG, is opened by the JPEG plugin and needs no entry.)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
KINDS = ("unsupported", "too_large", "invalid")


class ImageInputError(InputError):
    """Bad input: ``kind`` is "unsupported" (415), "too_large" or "invalid" (422);
    ``param`` is "image" when the image (its data, id or payload) is at fault."""

    def __init__(self, message: str, kind: str = "invalid", *, param: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"ImageInputError kind must be one of {KINDS}, got {kind!r}")
        super().__init__(message, param=param, kind=kind)


class ImageSearchError(RuntimeError):
    """The pipeline cannot run: closed, a model that does not fit the stored features, ..."""


def check_id(id: Any) -> str:
    if not isinstance(id, str):
        raise ImageInputError(f"image id must be a str, got {type(id).__name__}", param="image")
    if not id:
        raise ImageInputError("image id is empty", param="image")
    if len(id) > MAX_ID_CHARS:
        raise ImageInputError(f"image id is {len(id)} characters long, the limit is {MAX_ID_CHARS}", param="image")
    if any(ord(c) < 32 or ord(c) == 127 for c in id):
        # Ids end up in URLs (DELETE /v1/images/{id}) and logs.
        raise ImageInputError(f"image id {id!r} contains control characters", param="image")
    return id


def check_payload(payload: Any, id: str) -> dict:
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise ImageInputError(f"image {id!r}: payload must be a JSON object (dict), got {type(payload).__name__}", param="image")
    for key in payload:
        if not isinstance(key, str):
            raise ImageInputError(f"image {id!r}: payload keys must be str, got {key!r}", param="image")
        if key.startswith(RESERVED_PREFIX):
            raise ImageInputError(f"image {id!r}: payload key {key!r} is reserved (keys starting with "
                                  f"{RESERVED_PREFIX!r} are tallow's own)", param="image")
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ImageInputError(f"image {id!r}: payload is not JSON-serialisable: {exc}", param="image") from None
    if len(text.encode()) > MAX_PAYLOAD_BYTES:
        raise ImageInputError(f"image {id!r}: payload is {len(text.encode())} bytes as JSON, the limit is "
                              f"{MAX_PAYLOAD_BYTES}", param="image")
    return json.loads(text)  # a deep copy in canonical JSON types (tuples -> lists)


def check_data(data: Any, what: str = "image") -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ImageInputError(f"{what}: expected encoded image bytes, got {type(data).__name__}", param="image")
    if not data:
        raise ImageInputError(f"{what}: the image data is empty", param="image")
    return data


def probe(data: bytes, max_megapixels: float, what: str = "image") -> tuple[int, int, str]:
    """(width, height, format) from the header alone (Image.open does not
    decode pixels), so an oversized image is refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit (~179 MP raises; the warning only under -W error).
        raise ImageInputError(f"{what}: too large ({exc})", "too_large", param="image") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{what}: not an image in a supported format (supported: {', '.join(FORMATS)}; "
                              f"got {len(data)} bytes starting {data[:8]!r})", "unsupported", param="image") from None
    except Exception as exc:  # a recognised header Pillow then cannot parse
        raise ImageInputError(f"{what}: corrupt image header: {type(exc).__name__}: {exc}", param="image") from None
    w, h = img.size
    fmt = img.format
    img.close()
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what}: the image is empty ({w}x{h})", param="image")
    if w * h > max_megapixels * 1e6:
        raise ImageInputError(f"{what}: {w}x{h} = {w * h / 1e6:.1f} megapixels, above the limit of "
                              f"{max_megapixels:g} megapixels", "too_large", param="image")
    return w, h, fmt


def check_threshold(score_threshold: Any) -> None:
    if score_threshold is not None and (isinstance(score_threshold, bool) or not isinstance(
            score_threshold, (int, float)) or not math.isfinite(score_threshold)):
        raise ImageInputError(f"score_threshold must be a finite number, got {score_threshold!r}")
