"""kernels/preprocess.py: bit-exact with the PIL + torchvision oracle
(preprocess_ref) on images of different sizes in one launch, including the
vertical-pass-first case and an image already at the resized size."""

from __future__ import annotations

import torch

from tallow.ops import preprocess_ref
from tallow.ops.preprocess import IMAGENET_MEAN, IMAGENET_STD, _normalize_lut, gpu_plan, pack_images


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in sizes]


def _run(device, imgs, resize, crop, dtype):
    from tallow.kernels.preprocess import resample

    packed, offsets, sizes = pack_images(imgs)
    meta, taps = gpu_plan(sizes, offsets, resize, crop)
    out = torch.empty(len(imgs), 3, crop, crop, dtype=dtype, device=device)
    resample(packed.to(device), torch.from_numpy(meta).to(device), torch.from_numpy(taps).to(device),
             _normalize_lut(IMAGENET_MEAN, IMAGENET_STD).to(device), out)
    return out.cpu()


def test_preprocess_bit_exact_mixed_sizes(device):
    # (40, 30) shrink; (17, 23) upscale one side; (100, 21) taller than 2x wide
    # and shrinking: Pillow's vertical pass first; (16, 16) = resize: identity;
    # (33, 90) wide.
    imgs = _images([(40, 30), (17, 23), (100, 21), (16, 16), (33, 90)])
    out = _run(device, imgs, 16, 12, torch.float32)
    ref = preprocess_ref([i.numpy() for i in imgs], resize=16, crop=12)
    for i in range(len(imgs)):
        assert torch.equal(out[i], ref[i]), f"image {i}: max diff {(out[i] - ref[i]).abs().max()}"


def test_preprocess_float16_output(device):
    imgs = _images([(30, 20), (9, 14)], seed=1)
    out = _run(device, imgs, 8, 7, torch.float16)
    ref = preprocess_ref([i.numpy() for i in imgs], resize=8, crop=7)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref.to(torch.float16))
