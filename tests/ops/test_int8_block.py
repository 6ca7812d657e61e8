"""INT8 linear quantized per block of 32, weights and activations
(tallow.ops.int8_block): the activation quantization bit for bit against its
reference, the GEMM against the reference over awkward shapes on every ISA
this CPU runs, exact integer dots at the extremes (no vpmaddubsw
saturation), and what the mode is for: a row with outlier channels keeps its
small channels, a weight row with blocks of different ranges keeps its small
blocks."""

from __future__ import annotations

import pytest
import torch

import tallow
from tallow.ops import QuantizedLinear
from tallow.ops.int8_block import (BLOCK, BlockQuantizedLinear, int8_linear_b32_ref, pack_block_scale,
                                   quantize_blocks_ref, unpack_block_scale)
from tallow.testing import assert_close, require_native

ACTS = [None, "relu", "gelu_erf", "gelu_tanh"]
SHAPES = [(1, 1, 1), (1, 31, 17), (1, 32, 16), (1, 33, 100), (2, 576, 1536), (3, 1536, 576), (5, 100, 769),
          (7, 17, 65), (16, 64, 48), (17, 769, 3), (33, 65, 130)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _quantize(x: torch.Tensor):
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8)
    s = torch.empty(m, -(-k // BLOCK))
    tallow.native().int8_quantize_rows_b32(x.numpy(), q.numpy(), s.numpy())
    return q, s


def _special_rows(k: int) -> torch.Tensor:
    x = torch.randn(8, k) * 3
    x[1] = 0.0                              # zero blocks: scale 0, q 0
    x[2] = torch.arange(k) * 0.5 - k / 4    # ties after scaling, in places
    x[3] = x[3] * 1e-30                     # tiny (normal) values
    x[4] = x[4] * 1e30                      # huge values
    x[5, k // 2] = 500.0                    # one outlier channel
    x[6] = -x[6].abs()                      # all negative
    x[7, : min(k, BLOCK)] = 0.0             # first block zero, the rest not
    return x


def _close(y, ref, what=""):
    # The integer dot of a block is exact; the rest is a few float32 roundings
    # per block (FMA or not) and the epilogue.
    scale = float(ref[torch.isfinite(ref)].abs().max()) if ref.numel() else 1.0
    assert_close(y, ref, atol=2e-5 * max(scale, 1e-3), rtol=1e-5, what=what)


@pytest.mark.parametrize("k", [1, 3, 31, 32, 33, 65, 100, 769])
def test_quantize_blocks_bit_exact(each_isa, k):
    x = _special_rows(k)
    q, s = _quantize(x)
    qr, sr = quantize_blocks_ref(x)
    assert torch.equal(s, sr), (s - sr).abs().max()
    assert torch.equal(q, qr), (q.int() - qr.int()).abs().max()


def test_quantize_blocks_ref_contract():
    x = _special_rows(70)
    q, s = quantize_blocks_ref(x)
    assert q.dtype == torch.int8 and q.shape == (8, 70) and s.shape == (8, 3)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert float(s[1].abs().max()) == 0.0 and int(q[1].abs().max()) == 0
    deq = (q.float().view(8, -1) * s.repeat_interleave(BLOCK, dim=1)[:, :70])
    assert bool(((deq - x).abs() <= s.repeat_interleave(BLOCK, dim=1)[:, :70] * 0.5001).all())


def test_quantize_blocks_nonfinite(each_isa):
    x = torch.randn(3, 70)
    x[1, 40] = float("nan")
    x[2, 69] = float("inf")
    q, s = _quantize(x)
    qr, sr = quantize_blocks_ref(x)
    assert torch.isnan(s[1, 1]) and torch.isnan(s[2, 2]) and torch.isnan(sr[1, 1]) and torch.isnan(sr[2, 2])
    finite = torch.isfinite(sr)
    assert torch.equal(s[finite], sr[finite]) and bool(torch.isfinite(s[finite]).all())
    assert torch.equal(q, qr)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_linear_b32_matches_reference(each_isa, m, k, n, act):
    w, b = torch.randn(n, k), torch.randn(n)
    q = BlockQuantizedLinear.from_float(w, b, activation=act)
    x = torch.randn(m, k) * 2
    x[:, k // 3] *= 40  # an outlier channel, as in LLM hidden states
    ref = int8_linear_b32_ref(x, q.int8_weight(), q.weight_scale(), q.bias, act)
    _close(q(x), ref, what=f"{each_isa} {m}x{k}x{n} {act}")


def test_linear_b32_exact_at_the_extremes(each_isa):
    # Every activation and weight at +-127 with a block scale of exactly 1: the
    # output is the integer dot itself. Signs chosen so every product is
    # +127 * 127 (vpmaddubsw's pair sum 32258, just under 2^15) or a mix.
    k, n = 96, 20
    signs = torch.where(torch.rand(2, k) < 0.5, -1.0, 1.0)
    x = torch.stack([torch.full((k,), 127.0), signs[0] * 127.0, -torch.full((k,), 127.0)])
    w = torch.cat([torch.full((1, k), 127.0), signs[1:] * 127.0, torch.randint(-127, 128, (n - 2, k)).float()])
    w[2:, ::BLOCK] = 127.0  # every block's max |w| is 127: weight scales exactly 1
    q = BlockQuantizedLinear.from_float(w, None)
    assert float(q.weight_scale().max()) == 1.0 and float(q.weight_scale().min()) == 1.0
    exact = (x.double() @ w.double().t()).float()  # integers below 2^24: exact in float32
    assert torch.equal(q(x), exact)


def test_blocks_keep_the_small_channels_of_an_outlier_row(each_isa):
    # One channel 200x the rest (LLM hidden states have such): one scale per row
    # rounds the others to a few levels; one per block of 32 keeps the channels
    # of the other blocks as fine as without the outlier. (The outlier's own
    # block is coarse either way: its weights are zero here, so the outputs
    # measure the other blocks; both modules hold the same weights, exactly
    # representable in either: integers in [-127, 127], every block's max 127.)
    k, n = 576, 64
    w = torch.randint(-127, 128, (n, k)).float()
    w[:, ::BLOCK] = 127.0
    w[:, :BLOCK] = 0.0
    x = torch.randn(4, k)
    x[:, 7] = 200.0
    rows = QuantizedLinear.from_float(w, None)
    blocks = BlockQuantizedLinear.from_float(w, None)
    assert torch.equal(rows.dequantized_weight(), blocks.dequantized_weight())
    exact = x @ w.t()
    err_rows = float((rows(x) - exact).norm() / exact.norm())
    err_blocks = float((blocks(x) - exact).norm() / exact.norm())
    assert err_blocks < 0.1 * err_rows, (err_blocks, err_rows)


def test_blocks_keep_the_small_blocks_of_a_weight_row():
    # A weight row whose blocks differ in range (as 4-bit GGUF blocks do): one
    # scale per row rounds the small blocks to a few levels.
    k, n = 256, 32
    w = torch.randn(n, k)
    w[:, :BLOCK] *= 50.0
    rows = QuantizedLinear.from_float(w, None).dequantized_weight()
    blocks = BlockQuantizedLinear.from_float(w, None).dequantized_weight()
    small = slice(BLOCK, k)
    err_rows = float((rows[:, small] - w[:, small]).norm() / w[:, small].norm())
    err_blocks = float((blocks[:, small] - w[:, small]).norm() / w[:, small].norm())
    assert err_blocks < 0.05 * err_rows, (err_blocks, err_rows)
    assert err_blocks < 0.01


def test_block_scale_layout_round_trips():
    scale = torch.rand(37, 5)
    packed = pack_block_scale(scale)
    assert packed.shape == (3, 5, 16) and float(packed[2, :, 5:].abs().max()) == 0.0
    assert torch.equal(unpack_block_scale(packed, 37), scale)
    assert float(packed[1, 3, 4]) == float(scale[20, 3])


def test_isas_agree():
    require_native()
    from tallow.testing import available_isas

    w, x = torch.randn(100, 200), torch.randn(9, 200)
    q = BlockQuantizedLinear.from_float(w, torch.randn(100))
    previous, outs = tallow.get_isa(), {}
    try:
        for isa in available_isas():
            tallow.set_isa(isa)
            outs[isa] = q(x)
    finally:
        tallow.set_isa(previous)
    first = next(iter(outs.values()))
    for isa, y in outs.items():
        _close(y, first, what=isa)


def test_module_checks_input_and_round_trips():
    q = BlockQuantizedLinear.from_float(torch.randn(8, 40), torch.randn(8), activation="relu")
    assert q.activation == "relu" and "per block of 32" in repr(q)
    y = q(torch.randn(2, 3, 40))
    assert y.shape == (2, 3, 8) and bool((y >= 0).all())
    assert q(torch.empty(0, 40)).shape == (0, 8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 40\]"):
        q(torch.randn(2, 41))
    with pytest.raises(TypeError, match="float32"):
        q(torch.randn(2, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or inf"):
        BlockQuantizedLinear.from_float(torch.full((2, 3), float("inf")))
    with pytest.raises(ValueError, match="bias"):
        BlockQuantizedLinear.from_float(torch.randn(2, 3), torch.randn(3))
    again = BlockQuantizedLinear(40, 8, activation="relu")
    again.load_state_dict(q.state_dict())
    x = torch.randn(3, 40)
    assert torch.equal(again(x), q(x))


def test_forced_ref_backend(force_backend):
    force_backend("ref")
    q = BlockQuantizedLinear.from_float(torch.randn(30, 70), torch.randn(30), activation="gelu_tanh")
    x = torch.randn(4, 70)
    assert torch.equal(q(x), int8_linear_b32_ref(x, q.int8_weight(), q.weight_scale(), q.bias, "gelu_tanh"))


def test_native_checks():
    require_native()
    mod = tallow.native()
    q = BlockQuantizedLinear.from_float(torch.randn(20, 40), None)
    out = torch.empty(2, 20)
    with pytest.raises(ValueError, match="packed_weight"):
        mod.int8_linear_b32(torch.randn(2, 44).numpy(), q.packed_weight.numpy(), q.block_scale.numpy(), None, 0,
                            out.numpy())
    with pytest.raises(ValueError, match="block_scale"):
        mod.int8_linear_b32(torch.randn(2, 40).numpy(), q.packed_weight.numpy(), q.block_scale[:, :1].numpy(),
                            None, 0, out.numpy())
    with pytest.raises(ValueError, match="act"):
        mod.int8_linear_b32(torch.randn(2, 40).numpy(), q.packed_weight.numpy(), q.block_scale.numpy(), None, 7,
                            out.numpy())
