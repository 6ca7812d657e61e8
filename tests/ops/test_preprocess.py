"""preprocess: torchvision's ImageNet eval transform, fused, vs the PIL oracle.

Values are compared in uint8 "levels" (the resized pixel before
normalisation), recovered from the float output through the normalisation
table, so "±1 LSB" means what the issue says.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import tallow
from tallow.testing import assert_close
from tallow.ops import IMAGENET_MEAN, IMAGENET_STD, preprocess, preprocess_ref
from tallow.ops.preprocess import PreprocessError, _normalize_lut, resized_size

pytestmark = pytest.mark.native  # fails, not skips, without tallow._C (conftest.py)

LUT = _normalize_lut(IMAGENET_MEAN, IMAGENET_STD)


def levels(x: torch.Tensor) -> torch.Tensor:
    """float output [N, 3, c, c] -> the uint8 level each value came from."""
    n = x.shape[0]
    flat = x.permute(1, 0, 2, 3).reshape(3, -1).contiguous()
    idx = torch.stack([torch.searchsorted(LUT[c].contiguous(), flat[c].contiguous()) for c in range(3)])
    idx = idx.clamp(0, 255)
    # searchsorted gives the insertion point; pick the nearest table entry.
    lo = (idx - 1).clamp(0, 255)
    pick = torch.where((torch.gather(LUT, 1, lo) - flat).abs() < (torch.gather(LUT, 1, idx) - flat).abs(), lo, idx)
    return pick.reshape(3, n, *x.shape[2:]).permute(1, 0, 2, 3).to(torch.int32)


def check_close(actual: torch.Tensor, expected: torch.Tensor, *, exact: bool, what: str = "") -> float:
    """Asserts ±1 level on >= 99.9 % of values (bit-exact floats if `exact`);
    returns the fraction of values that are bit-identical."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == torch.float32
    if exact:
        assert_close(actual, expected, atol=0.0, what=what)
        return 1.0
    d = (levels(actual) - levels(expected)).abs()
    within = (d <= 1).float().mean().item()
    assert within >= 0.999, f"{what}: only {within:.5f} of values within ±1 level (max diff {int(d.max())})"
    return (actual == expected).float().mean().item()


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like test image: smooth gradients + shapes + noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / (37 + 11 * c) + c) * np.cos(y / (23 + 7 * c) - c) for c in range(3)], -1)
    img[(x - w / 3) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 4) ** 2] += 60
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def jpeg(h: int, w: int, seed: int = 0, **kw) -> bytes:
    return encode(Image.fromarray(photo(h, w, seed)), "JPEG", quality=90, **kw)


# Sizes on purpose: common photo shapes, odd sizes, tiny (upscaled), extreme
# aspect ratios, a short side of exactly 256 (no resize) and exactly 224.
COMMON = [(768, 1024), (1024, 768), (375, 500), (500, 375), (480, 640), (333, 500), (600, 500)]
AWKWARD = [(256, 256), (256, 341), (224, 300), (257, 999), (100, 80), (7, 5), (1, 300), (300, 1),
           (97, 1025), (2000, 300), (300, 2000), (255, 257), (1080, 1920)]


def test_geometry_matches_torchvision_rule():
    mod = tallow.native()
    rng = np.random.default_rng(1)
    sizes = [(h, w) for h, w in rng.integers(1, 5000, (400, 2))] + COMMON + AWKWARD
    for h, w in sizes:
        for resize, crop in ((256, 224), (232, 224), (224, 224), (300, 17)):
            nh, nw = resized_size(int(h), int(w), resize)
            top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
            assert mod.preprocess_geometry(int(h), int(w), resize, crop) == (nh, nw, top, left), (h, w)


@pytest.fixture(scope="module")
def arrays_and_refs():
    common = [photo(h, w, i) for i, (h, w) in enumerate(COMMON)]
    awkward = [photo(h, w, 3) for h, w in AWKWARD]
    return common, preprocess_ref(common), awkward, preprocess_ref(awkward)


def test_exact_arrays_match_pil(each_isa, arrays_and_refs):
    common, common_ref, awkward, awkward_ref = arrays_and_refs
    check_close(preprocess(common), common_ref, exact=True, what=f"common sizes {each_isa}")
    out = preprocess(awkward)
    for i, (h, w) in enumerate(AWKWARD):
        check_close(out[i:i + 1], awkward_ref[i:i + 1], exact=True, what=f"{h}x{w} {each_isa}")


def test_exact_random_sizes_bit_identical():
    """Random sizes and targets of torchvision's Resize family, portrait and
    landscape, up- and downscaled, including the > 2:1 portrait images that
    Pillow resizes vertical pass first."""
    rng = np.random.default_rng(42)
    for resize, crop in ((256, 224), (232, 224), (64, 48), (300, 299)):
        imgs = []
        for _ in range(10):
            short = int(rng.integers(8, 700))
            long = max(short, int(short * np.exp(rng.uniform(0, np.log(6)))))
            h, w = (long, short) if rng.random() < 0.6 else (short, long)
            imgs.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        check_close(preprocess(imgs, resize=resize, crop=crop), preprocess_ref(imgs, resize=resize, crop=crop),
                    exact=True, what=f"random sizes resize={resize} crop={crop}")


def test_exact_encoded_each_isa(each_isa):
    # Decoded images are read in Pillow's own RGBX layout (column stride 4);
    # 700x301 takes the vertical-first path.
    data = [jpeg(h, w, i) for i, (h, w) in enumerate([(480, 640), (333, 500), (301, 700), (700, 301)])]
    check_close(preprocess(data), preprocess_ref(data), exact=True, what=f"jpeg {each_isa}")


def test_pillow_pixels_in_place():
    from tallow.ops.preprocess import _rgb_pixels

    img = Image.fromarray(photo(37, 53, 4))
    view, keep = _rgb_pixels(img)
    assert np.array_equal(view, np.asarray(img))
    if keep is not None:  # Arrow export available: Pillow's buffer, stride 4
        assert view.strides[1] == 4


def test_pil_image_inputs_are_not_modified():
    img = Image.open(io.BytesIO(jpeg(1200, 1600, 3)))
    out = preprocess([img, img], mode="fast", num_threads=2)
    assert img.size == (1600, 1200)  # no draft() on the caller's image
    check_close(out, preprocess_ref([img, img]), exact=True, what="PIL input, fast mode")


def test_exact_other_resize_crop():
    imgs = [photo(h, w, 5) for h, w in [(480, 640), (331, 517), (100, 90)]]
    for resize, crop in ((232, 224), (224, 224), (64, 31)):
        check_close(preprocess(imgs, resize=resize, crop=crop), preprocess_ref(imgs, resize=resize, crop=crop),
                    exact=True, what=f"resize={resize} crop={crop}")


def _modes() -> list[tuple[str, bytes]]:
    base = Image.fromarray(photo(300, 420, 7))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(photo(300, 420, 8)[:, :, 0]))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    i16 = Image.fromarray(photo(300, 420, 9)[:, :, 0].astype(np.uint16) * 200)
    return [
        ("jpeg-rgb", encode(base, "JPEG", quality=85)),
        ("jpeg-l", encode(base.convert("L"), "JPEG", quality=85)),
        ("jpeg-cmyk", encode(base.convert("CMYK"), "JPEG", quality=85)),
        ("jpeg-progressive", encode(base, "JPEG", quality=85, progressive=True)),
        ("png-rgb", encode(base, "PNG")),
        ("png-rgba", encode(rgba, "PNG")),
        ("png-l", encode(base.convert("L"), "PNG")),
        ("png-la", encode(rgba.convert("LA"), "PNG")),
        ("png-p", encode(pal, "PNG")),
        ("png-p-transparency", encode(pal_t, "PNG")),
        ("png-i16", encode(i16, "PNG")),
        ("webp", encode(base, "WEBP", quality=80)),
        ("bmp", encode(base, "BMP")),
    ]


def test_encoded_formats_and_modes_match_pil():
    named = _modes()
    data = [d for _, d in named]
    out = preprocess(data)
    ref = preprocess_ref(data)
    for i, (name, _) in enumerate(named):
        check_close(out[i:i + 1], ref[i:i + 1], exact=True, what=name)
    # Pillow images are accepted as they are.
    imgs = [Image.open(io.BytesIO(d)) for d in data[:3]]
    check_close(preprocess(imgs), ref[:3], exact=True, what="PIL images")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation(fmt):
    base = Image.fromarray(photo(300, 400, 11))
    data = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data.append(encode(base, fmt, exif=exif.tobytes(), **({"quality": 90} if fmt == "JPEG" else {})))
    out = preprocess(data)
    ref = preprocess_ref(data)
    check_close(out, ref, exact=True, what=f"{fmt} orientations")
    # Orientations 5-8 swap the axes: the crop sees a portrait image.
    assert not torch.equal(out[0], out[5])


def test_fast_mode_error_bounded():
    sizes = [(768, 1024), (1500, 2000), (1024, 768), (480, 640)]
    data = [jpeg(h, w, i) for i, (h, w) in enumerate(sizes)]
    fast = levels(preprocess(data, mode="fast")).float()
    exact = levels(preprocess_ref(data)).float()
    mae = (fast - exact).abs().mean(dim=(1, 2, 3))
    # Measured ~0.7 levels at 1024x768 (1/2 scale) and ~1 level at 2000x1500
    # (1/4 scale): DCT downscaling then a shorter bilinear filter.
    assert float(mae.max()) <= 2.5, mae
    assert float(mae[0]) > 0, "fast mode did not use DCT downscaling"
    # 640x480 is < 2x the resized 341x256: decoded at full size, exact.
    assert float(mae[3]) == 0.0


def test_fast_mode_modes_and_orientation():
    base = Image.fromarray(photo(900, 1200, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = [encode(base.convert("CMYK"), "JPEG", quality=90), encode(base.convert("L"), "JPEG", quality=90),
            encode(base, "JPEG", quality=90, exif=exif.tobytes()), encode(base, "JPEG", quality=90, progressive=True)]
    mae = (levels(preprocess(data, mode="fast")).float() - levels(preprocess_ref(data)).float()).abs()
    mae = mae.mean(dim=(1, 2, 3))
    assert float(mae.max()) <= 2.5 and float(mae.min()) > 0, mae


def test_fast_mode_small_and_non_jpeg_are_exact():
    data = [jpeg(375, 500, 1), encode(Image.fromarray(photo(900, 1200, 2)), "PNG")]
    check_close(preprocess(data, mode="fast"), preprocess_ref(data), exact=True, what="fast small/PNG")


def test_array_inputs_views_tensors_grayscale(each_isa):
    a = photo(400, 600, 12)
    gray = photo(350, 280, 13)[:, :, 0]
    tall = photo(900, 400, 14)  # > 2:1: Pillow's vertical-first order
    items = [
        a[:, ::-1],                          # negative stride
        a[::2, 1::2],                        # strided
        np.asfortranarray(a),                # non-C layout
        torch.from_numpy(a.copy()),          # tensor
        gray,                                # (H, W)
        gray[:, :, None],                    # (H, W, 1)
        tall[:, ::-1],                       # vertical first, generic strides
        tall[:, :, 0],                       # vertical first, grayscale
        np.ascontiguousarray(tall[:, 3:]),   # vertical first, packed RGB
    ]
    ref = preprocess_ref([np.ascontiguousarray(x if not isinstance(x, torch.Tensor) else x.numpy()).squeeze()
                          if (not isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[2] == 1)
                          else (x.numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x))
                          for x in items])
    check_close(preprocess(items), ref, exact=True, what="array views")


def test_out_threads_and_backends(force_backend):
    data = [jpeg(480, 640, i) for i in range(5)] + [photo(300, 300, 9)]
    ref = preprocess_ref(data)
    out = torch.full((6, 3, 224, 224), 7.0)
    res = preprocess(data, out=out)
    assert res is out
    check_close(out, ref, exact=True, what="out=")
    check_close(preprocess(data, num_threads=1), ref, exact=True, what="one thread")
    force_backend("ref")
    check_close(preprocess(data), ref, exact=True, what="ref backend")


def test_file_paths(tmp_path):
    data = jpeg(300, 400, 6)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    out, errs = preprocess([path, str(path), data, tmp_path / "missing.jpg"], errors="return")
    assert errs[:3] == [None, None, None] and "cannot decode" in errs[3]
    ref = preprocess_ref([data])
    check_close(out[:3], ref.expand(3, -1, -1, -1), exact=True, what="paths")


def test_empty_batch():
    assert preprocess([]).shape == (0, 3, 224, 224)
    res, errs = preprocess([], errors="return")
    assert res.shape == (0, 3, 224, 224) and errs == []


# ------------------------------------------------------------- bad input


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (no pixel data): a decompression bomb
    that must be refused before any decoding."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND") & 0xFFFFFFFF))


def _bad_items() -> list[tuple[str, object, str]]:
    good = jpeg(200, 300, 1)
    return [
        ("corrupt", b"this is not an image at all", "cannot decode"),
        ("truncated", good[: len(good) // 2], "cannot decode"),
        ("empty bytes", b"", "empty"),
        ("bomb", _png_header(9000, 9000), "megapixels"),
        ("zero-size array", np.zeros((0, 5, 3), np.uint8), "empty"),
        ("float array", np.zeros((10, 10, 3), np.float32), "uint8"),
        ("4 channels", np.zeros((10, 10, 4), np.uint8), "shape"),
        ("4-D array", np.zeros((2, 10, 10, 3), np.uint8), "shape"),
        ("wrong type", 12345, "unsupported type"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_items())), ids=[c[0] for c in _bad_items()])
def test_bad_input_names_index_and_keeps_others(case):
    name, item, needle = _bad_items()[case]
    good = [jpeg(240, 320, 2), photo(300, 260, 3)]
    batch = [good[0], item, good[1]]
    ref = preprocess_ref(good)
    with pytest.raises(ValueError, match=r"image 1: .*" + needle) as info:
        preprocess(batch)
    exc = info.value
    assert isinstance(exc, PreprocessError) and exc.index == 1
    assert exc.errors[0] is None and exc.errors[2] is None and needle in exc.errors[1]
    check_close(exc.output[[0, 2]], ref, exact=True, what=f"{name}: the others")
    assert torch.count_nonzero(exc.output[1]) == 0
    res, errs = preprocess(batch, errors="return")
    assert errs[0] is None and errs[2] is None and needle in errs[1]
    check_close(res[[0, 2]], ref, exact=True, what=f"{name}: errors=return")
    assert torch.count_nonzero(res[1]) == 0


def test_megapixel_limit_and_pillow_bomb_checks():
    data = [jpeg(300, 400, 1), jpeg(100, 100, 2)]
    _, errs = preprocess(data, max_megapixels=0.05, errors="return")
    assert "megapixels" in errs[0] and errs[1] is None
    # Above our limit's reach: Pillow's own checks (a warning above
    # MAX_IMAGE_PIXELS, an error above twice that) become a clean error,
    # and no warning leaks (pytest turns warnings into errors).
    warn = _png_header(10000, 9500)     # 95 MP: DecompressionBombWarning
    bomb = _png_header(100000, 100000)  # 10^10 pixels: DecompressionBombError
    _, errs = preprocess([warn, bomb, data[1]], max_megapixels=1e6, errors="return")
    assert "decompression bomb" in errs[0] and "decompression bomb" in errs[1] and errs[2] is None


def test_multiple_bad_images_message():
    with pytest.raises(PreprocessError, match=r"image 0: .*2 of 3 images failed: indices \[0, 2\]"):
        preprocess([b"x", photo(50, 50), b"y"])


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"crop": 300}, ValueError, "crop must be <= resize"),
        ({"resize": 0}, ValueError, "resize"),
        ({"crop": 2.5}, ValueError, "crop"),
        ({"mean": (0.5, 0.5)}, ValueError, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, ValueError, "std"),
        ({"mode": "quick"}, ValueError, "mode"),
        ({"errors": "ignore"}, ValueError, "errors"),
        ({"max_megapixels": 0}, ValueError, "max_megapixels"),
        ({"num_threads": 0}, ValueError, "num_threads"),
        ({"out": torch.empty(2, 3, 224, 224)}, ValueError, "shape"),
        ({"out": torch.empty(1, 3, 224, 224, dtype=torch.float64)}, ValueError, "float32"),
        ({"out": torch.empty(1, 3, 224, 448)[..., ::2]}, ValueError, "contiguous"),
        ({"out": np.empty((1, 3, 224, 224), np.float32)}, TypeError, "torch.Tensor"),
    ],
)
def test_argument_validation(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        preprocess([photo(64, 64)], **kwargs)


def test_images_must_be_a_list():
    with pytest.raises(TypeError, match="wrap it in a list"):
        preprocess(jpeg(64, 64))
    with pytest.raises(TypeError, match="list of images"):
        preprocess(5)


def test_native_boundary_checks():
    mod = tallow.native()
    out = np.zeros((1, 3, 224, 224), np.float32)
    lut = LUT.numpy()
    with pytest.raises(ValueError, match="out.shape"):
        mod.preprocess_resample([photo(10, 10), photo(10, 10)], out, lut, 256, 224)
    with pytest.raises(TypeError, match="image 0 must be uint8"):
        mod.preprocess_resample([np.zeros((10, 10, 3), np.int16)], out, lut, 256, 224)
    with pytest.raises(ValueError, match="resize must be >= crop"):
        mod.preprocess_resample([photo(10, 10)], out, lut, 100, 224)
