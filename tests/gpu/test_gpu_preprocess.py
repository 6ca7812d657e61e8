"""preprocess_tensors on CUDA tensors (cuda and triton backends): bit-exact
with the PIL + torchvision oracle, several sizes per launch."""

from __future__ import annotations

import pytest
import torch

from tallow.ops import preprocess_ref, preprocess_tensors

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
SIZES = [(768, 1024), (1024, 768), (256, 256), (300, 97), (97, 300), (2000, 600), (224, 256), (50, 40)]


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in sizes]


@pytest.mark.parametrize("backend", BACKENDS)
def test_preprocess_gpu_bit_exact(force_backend, backend):
    force_backend(backend)
    imgs = _images(SIZES)
    out = preprocess_tensors([i.cuda() for i in imgs])
    ref = preprocess_ref([i.numpy() for i in imgs])
    assert out.is_cuda and out.shape == ref.shape
    for i in range(len(imgs)):
        assert torch.equal(out[i].cpu(), ref[i]), f"image {i} {SIZES[i]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_preprocess_gpu_packed_float16(force_backend, backend):
    force_backend(backend)
    imgs = _images(SIZES[:4], seed=1)
    packed = torch.cat([i.reshape(-1) for i in imgs]).cuda()
    offsets, pos = [], 0
    for i in imgs:
        offsets.append(pos)
        pos += i.numel()
    out = preprocess_tensors(packed=packed, offsets=offsets, sizes=[tuple(i.shape[:2]) for i in imgs],
                             resize=160, crop=128, out_dtype=torch.float16)
    ref = preprocess_ref([i.numpy() for i in imgs], resize=160, crop=128)
    assert out.dtype == torch.float16
    assert torch.equal(out.cpu(), ref.to(torch.float16))
