"""The native ResNet forward (tallow._C.ResNet, csrc/vision/) against the
per-op path it replaces and against transformers: the default fp32 model
runs natively, Winograd or direct, any batch, any image size, from several
threads at once."""

from __future__ import annotations

import threading

import pytest
import torch
from model_checkpoints import synthetic_torchvision_resnet50

from tallow.models import load
from tallow.models.resnet_native import winograd_tile
from tallow.testing import require_native



def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double()).min().item()


@pytest.fixture(scope="module")
def resnet50_pth(tmp_path_factory):
    """ResNet-50's real shapes (random weights, batch norms randomised so the
    folding is exercised): the native path's Winograd F(4,3) (64, 128
    channels) and F(2,3) (256, 512) layers and its per-stage image chunks."""
    torch.manual_seed(11)
    sd = synthetic_torchvision_resnet50()
    for k in list(sd):
        if k.endswith("running_var"):
            sd[k] = torch.rand_like(sd[k]) + 0.5
        elif k.endswith("running_mean") or (k.endswith(".bias") and not k.startswith("fc")):
            sd[k] = torch.randn_like(sd[k]) * 0.1
    path = tmp_path_factory.mktemp("resnet50") / "resnet50.pth"
    torch.save(sd, path)
    return path


def test_fp32_model_runs_natively_and_int8_per_op(resnet_dir):
    require_native()
    assert load(resnet_dir).native is not None
    assert load(resnet_dir, quantize="int8").native is None  # INT8 stays per-op (issue 27, item 2)


@pytest.mark.parametrize("winograd", ["1", "0"], ids=["winograd", "direct"])
def test_native_matches_transformers_and_the_per_op_path(resnet_dir, monkeypatch, winograd):
    require_native()
    from transformers import ResNetForImageClassification

    monkeypatch.setenv("TALLOW_WINOGRAD", winograd)
    native = load(resnet_dir)
    monkeypatch.setenv("TALLOW_RESNET", "ops")
    per_op = load(resnet_dir)
    assert native.native is not None and per_op.native is None
    hf = ResNetForImageClassification.from_pretrained(resnet_dir).eval()
    images = torch.randn(3, 3, 97, 131, generator=torch.Generator().manual_seed(5))  # odd sizes
    with torch.no_grad():
        expected = hf.resnet(pixel_values=images).pooler_output.flatten(1)
    torch.testing.assert_close(native.features(images), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native.features(images), per_op.features(images), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native(images), per_op(images), rtol=1e-4, atol=1e-4)  # fc on the native features


def test_resnet50_native_agrees_with_per_op_at_real_shapes(resnet50_pth, monkeypatch):
    require_native()
    native = load(resnet50_pth)
    monkeypatch.setenv("TALLOW_RESNET", "ops")
    per_op = load(resnet50_pth)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    got, want = native.features(images), per_op.features(images)
    # the bound for a faster path's features (fp32: cosine >= 0.9999)
    assert _cosine(got, want) >= 0.99999
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()


def test_native_model_holds_no_second_copy_of_the_weights(resnet50_pth, monkeypatch):
    """The native fp32 model keeps no torch convolutions (their weights would
    be a second ~94 MB copy), yet reports the same parameters and logits head."""
    require_native()
    from tallow.models.layers import Conv, Dense

    native = load(resnet50_pth)
    monkeypatch.setenv("TALLOW_RESNET", "ops")
    per_op = load(resnet50_pth)
    assert [m for m in native.modules() if isinstance(m, (Conv, Dense))] == [native.fc]
    assert native.num_parameters() == per_op.num_parameters()
    assert sum(p.numel() for p in native.parameters()) + sum(b.numel() for b in native.buffers()) <= 2_100_000
    assert native.native.owned_bytes > 90e6  # the packed weights live in the native object


def test_an_image_gets_the_same_features_alone_or_in_a_batch(resnet50_pth):
    """Bit for bit: the server batches concurrent requests, and a user's
    features must not depend on who else was in the batch (the stages run
    in image chunks, the GEMM rows and Winograd tiles are per image)."""
    require_native()
    model = load(resnet50_pth)
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    batch = model.features(images)
    for i in (0, 3, 7):
        assert torch.equal(model.features(images[i:i + 1]), batch[i:i + 1])
    assert torch.equal(model.features(images[2:5]), batch[2:5])


def test_concurrent_callers_get_their_own_results(resnet_dir):
    require_native()
    model = load(resnet_dir)
    inputs = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    expected = [model.features(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(3):
            results[i] = model.features(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        assert torch.equal(results[i], want)


def test_winograd_tiles_by_layer():
    # F(4,3) up to 128 channels, F(2,3) beyond, strided convolutions direct
    assert [winograd_tile(1, c) for c in (64, 128, 256, 512)] == [4, 4, 2, 2]
    assert winograd_tile(2, 128) == 0


def test_native_model_rejects_bad_images_like_the_per_op_one(resnet_dir):
    require_native()
    model = load(resnet_dir)
    with pytest.raises(ValueError, match="at least 32x32"):
        model.features(torch.zeros(1, 3, 31, 64))
    with pytest.raises(ValueError, match="NaN"):
        model.features(torch.full((1, 3, 64, 64), float("inf")))
    assert model.features(torch.zeros(0, 3, 64, 64)).shape == (0, model.native.feature_size)
    # a non-contiguous view is accepted (copied once)
    x = torch.randn(2, 3, 64, 80)[:, :, :, ::2]
    torch.testing.assert_close(model.features(x), model.features(x.contiguous()))


def test_native_binding_names_wrong_blocks():
    require_native()
    import numpy as np

    import tallow

    net = tallow.native().ResNet()

    def conv(cout, cin, k):
        return {"weight": np.ones((cout, cin, k, k), np.float32), "bias": np.zeros(cout, np.float32)}

    with pytest.raises(ValueError, match="set_stem\\(\\) must come before"):
        net.add_block(conv(4, 8, 1), conv(4, 4, 3), conv(8, 4, 1), None, 1)
    net.set_stem(conv(8, 3, 7), 2)
    with pytest.raises(ValueError, match="conv1 takes 6 channels, the previous layer gives 8"):
        net.add_block(conv(4, 6, 1), conv(4, 4, 3), conv(8, 4, 1), None, 1)
    with pytest.raises(ValueError, match="winograd must be 0, or 2 or 4 with stride 1"):
        net.add_block(conv(4, 8, 1), conv(4, 4, 3), conv(16, 4, 1), conv(16, 8, 1), 2, winograd=4)
    with pytest.raises(ValueError, match="has no downsample"):
        net.add_block(conv(4, 8, 1), conv(4, 4, 3), conv(16, 4, 1), None, 1)
    with pytest.raises(ValueError, match="the model has no blocks"):
        net.features(np.zeros((1, 3, 32, 32), np.float32), np.zeros((1, 8), np.float32))
