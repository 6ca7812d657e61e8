"""Benchmark: tallow.ops.preprocess vs the PIL+numpy pipeline (torchvision's
ImageNet eval transform done with PIL: tallow.ops.preprocess_ref), vs the same
PIL pipeline decoding with ``Image.draft()`` (libjpeg's DCT scaling to 1/2,
1/4 or 1/8 size while the result stays >= the resize target: the fair peer of
tallow's fast mode, which does the same) and vs an OpenCV pipeline, on batches
of generated photo-like JPEGs (1024x768 and 500x375), one thread and all
threads. Resize/crop from the ResNet-50 entry of the model registry.
Unit: images/s.

Agreement before timing (per image, 1 - cosine vs the plain PIL pipeline):
tallow-exact matches PIL to +-1 LSB; the draft-decoding pipelines (tallow-fast,
pil+draft) and OpenCV's INTER_AREA resample other pixels, so they get looser
stated tolerances.

    .venv/bin/python benchmarks/bench_preprocess.py [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import sys
from pathlib import Path

import tallow  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp  # noqa: F401
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Agreement, Case, run_suite  # noqa: E402
from registry import RESNET50  # noqa: E402

from tallow.ops import IMAGENET_MEAN, IMAGENET_STD, preprocess, preprocess_ref  # noqa: E402
from tallow.ops.preprocess import resized_size  # noqa: E402

RESIZE, CROP = RESNET50["resize"], RESNET50["crop"]
# 1 - cosine per image allowed for the pipelines that decode or resample
# differently from PIL's full-size decode. Measured on these JPEGs: 1.3e-4
# for tallow-fast and pil+draft (bit-identical to each other), 1.6e-4 for
# OpenCV; tallow-exact 3e-14.
DRAFT_TOL = 1e-3


def photo_jpeg(w: int, h: int, rng: np.random.Generator, quality: int = 90) -> bytes:
    """Photo-like content (smooth gradients, soft shapes, sensor noise) so the
    JPEG sizes and decode costs are realistic (~1.5-3 bits/pixel)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    fx, fy, ph = rng.uniform(20, 200, 3), rng.uniform(20, 200, 3), rng.uniform(0, 6, 3)
    for c in range(3):
        img[..., c] = 120 + 80 * np.sin(x / fx[c] + ph[c]) * np.cos(y / fy[c] - ph[c]) + 40 * (x / w - y / h)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] += rng.uniform(-70, 70, 3)
    img += rng.normal(0, 6, img.shape)
    b = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(b, "JPEG", quality=quality)
    return b.getvalue()


def opencv_pipeline(data: bytes) -> torch.Tensor:
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = bgr.shape[:2]
    nh, nw = resized_size(h, w, RESIZE)
    # INTER_AREA: OpenCV's antialiased downscale (its bilinear does not antialias).
    r = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA)
    top, left = int(round((nh - CROP) / 2.0)), int(round((nw - CROP) / 2.0))
    c = cv2.cvtColor(r[top:top + CROP, left:left + CROP], cv2.COLOR_BGR2RGB)
    x = (c.astype(np.float32) / np.float32(255) - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(
        IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def pil_pipeline(data: bytes) -> torch.Tensor:
    return preprocess_ref([data], resize=RESIZE, crop=CROP)[0]


def pil_draft_pipeline(data: bytes) -> torch.Tensor:
    """preprocess_ref's steps, but decoding through Image.draft(): libjpeg
    decodes at the largest 1/2, 1/4 or 1/8 scale that stays >= the resized
    size, then the same antialiased bilinear resize, crop and normalize."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    w, h = img.size
    nh, nw = resized_size(h, w, RESIZE)
    img.draft("RGB", (nw, nh))
    ImageOps.exif_transpose(img, in_place=True)
    img = img.convert("RGB")
    w, h = img.size
    nh, nw = resized_size(h, w, RESIZE)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - CROP) / 2.0)), int(round((nw - CROP) / 2.0))
    img = img.crop((left, top, left + CROP, top + CROP))
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).to(torch.float32).div(255)
    m = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    s = torch.as_tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return x.sub_(m).div_(s)


def batched(fn, pool):
    """Runs a per-image pipeline over a batch, in a thread pool if given
    (Pillow and OpenCV release the GIL while decoding/resizing)."""
    def run(batch):
        if pool is None:
            return torch.stack([fn(d) for d in batch])
        return torch.stack(list(pool.map(fn, batch)))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 images per batch, short timing (smoke run)")
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    import cv2

    n = 16 if args.quick else args.images
    # The peers parallelise across images (thread pool), like tallow; torch's
    # own intra-op threads inside each image's ToTensor/Normalize would only
    # oversubscribe the cores (measured: 3x slower PIL pipeline on 2 cores).
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    all_threads = tallow.get_num_threads()
    cases = []
    for w, h in ((1024, 768), (500, 375)):
        batch = [photo_jpeg(w, h, rng) for _ in range(n)]
        kb = sum(map(len, batch)) / len(batch) / 1024
        for threads in sorted({1, all_threads}):
            pool = None if threads == 1 else concurrent.futures.ThreadPoolExecutor(threads)
            cv2.setNumThreads(1)  # parallel across images, like the others

            def tallow_fast(batch=batch, threads=threads):
                return preprocess(batch, resize=RESIZE, crop=CROP, mode="fast", num_threads=threads)

            def tallow_exact(batch=batch, threads=threads):
                return preprocess(batch, resize=RESIZE, crop=CROP, mode="exact", num_threads=threads)

            pil = batched(pil_pipeline, pool)
            pil_draft = batched(pil_draft_pipeline, pool)
            ocv = batched(opencv_pipeline, pool)
            cases.append(Case(
                name=f"{w}x{h} x{n} jpeg, {threads} thr",
                providers={
                    "tallow-fast": tallow_fast,
                    "tallow-exact": tallow_exact,
                    "pil+numpy": lambda b=batch, f=pil: f(b),
                    "pil+draft": lambda b=batch, f=pil_draft: f(b),
                    "opencv": lambda b=batch, f=ocv: f(b),
                },
                agreement=Agreement(
                    reference="pil+numpy", metric="cosine",
                    tol={"tallow-exact": 1e-5, "tallow-fast": DRAFT_TOL, "pil+draft": DRAFT_TOL,
                         "opencv": DRAFT_TOL},
                    why="tallow-exact is PIL's maths (+-1 LSB); DCT-scaled decoding (draft) and OpenCV's "
                        "INTER_AREA sample other pixels"),
                work=n, unit="images/s",
                params={"width": w, "height": h, "images": n, "threads": threads, "jpeg_kb": round(kb, 1),
                        "resize": RESIZE, "crop": CROP},
            ))
    run_suite("preprocess", cases, min_time=0.15 if args.quick else 0.5, chart=not args.quick)


if __name__ == "__main__":
    main()
