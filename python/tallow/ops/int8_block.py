"""INT8 linear quantized per block of 32, for LLM decoders.

The hidden states of Llama-family models have a few channels a hundred times
larger than the rest: :class:`~tallow.ops.QuantizedLinear` quantizes a whole
activation row with one scale, so those outliers leave the other channels a
handful of levels; and weights that came from 4-bit GGUF blocks (each block
of 32 with its own scale) lose their small blocks' precision in one scale per
output channel. Here both operands get a scale per block of 32 consecutive
input features (``BLOCK``), symmetric (as llama.cpp's Q8_0)::

    amax = max |v[blk]|            scale = amax / 127   (0 for a block of zeros)
    q    = clamp(round_half_even(v · (127 / amax)), -127, 127)   (s8)
    y[n] = act(Σ_blk scale_x[blk] · scale_w[n, blk] · Σ_{k ∈ blk} qx[k] · qw[n, k] + bias[n])

float32 operations, so the CPU kernel's activation q and scales match
:func:`quantize_blocks_ref` bit for bit; a block holding a NaN or inf gets
scale NaN (its outputs are NaN). The integer dot of a block is exact
(|·| ≤ 32 · 127 · 127 < 2^24, also in float32); the kernel
(tallow._C.int8_linear_b32, csrc/int8_matmul: s8 × s8 with vpdpbusd on |a|
and a's sign moved onto w on AVX-512 VNNI, vpmaddubsw + vpmaddwd on AVX2 —
pair sums below 2^15, no saturation — SDOT on NEON) scales each block's
int32 sums into float accumulators. Weights take 1.125 bytes per parameter
(the int8 values in QuantizedLinear's packed layout, plus a float32 scale per
32).

Backends: ``cpu`` (the kernel) and ``ref`` (:func:`int8_linear_b32_ref`, torch
ops on any device: CUDA tensors run it — no GPU kernel of its own yet).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._dispatch import choose_backend
from .._native import native
from .int8_matmul import _ACT_CODE, Int8LinearBase, _native_ok, apply_activation, pack_weight, unpack_weight

BLOCK = 32
_ORDER = {"cpu": ("cpu", "ref"), "cuda": ("ref",)}


def quantize_blocks_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``x [M, K]`` -> ``(q int8 [M, K], scale float32 [M, ceil(K / 32)])``,
    the module docstring's float32 operations (activations and weights alike)."""
    x = x.to(torch.float32)
    m, k = x.shape
    nblk = -(-k // BLOCK)
    xb = F.pad(x, (0, nblk * BLOCK - k)).view(m, nblk, BLOCK)
    amax = xb.abs().amax(dim=-1)
    amax = torch.where(torch.isfinite(xb).all(dim=-1), amax, torch.full_like(amax, float("nan")))
    c127 = torch.tensor(127.0, dtype=torch.float32)
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    q = torch.clamp(torch.round(xb * inv[..., None]), -127.0, 127.0)
    q = torch.nan_to_num(q, nan=0.0)
    return q.to(torch.int8).view(m, nblk * BLOCK)[:, :k], amax / c127


def pack_block_scale(scale: torch.Tensor) -> torch.Tensor:
    """``[N, nblk]`` -> the kernel's ``[ceil(N/16), nblk, 16]`` (zero past N)."""
    n, nblk = scale.shape
    padded = torch.zeros(-(-n // 16) * 16, nblk, dtype=torch.float32)
    padded[:n] = scale
    return padded.view(-1, 16, nblk).permute(0, 2, 1).contiguous()


def unpack_block_scale(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_block_scale`."""
    return packed.permute(0, 2, 1).reshape(-1, packed.shape[1])[:n]


def int8_linear_b32_ref(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, activation: Optional[str] = None) -> torch.Tensor:
    """The maths in torch: ``x [..., K]`` float32, ``qweight`` int8 ``[N, K]``,
    ``weight_scale [N, ceil(K / 32)]``. Each block's integer dot is exact in
    float32; the blocks are summed in order, as the kernel does."""
    lead, k = x.shape[:-1], x.shape[-1]
    q, sx = quantize_blocks_ref(x.reshape(-1, k))
    w = qweight.to(torch.float32)
    ws = weight_scale.to(torch.float32)
    y = torch.zeros(q.shape[0], qweight.shape[0], dtype=torch.float32, device=x.device)
    for b in range(sx.shape[1]):
        k0, k1 = b * BLOCK, min((b + 1) * BLOCK, k)
        y = y + (q[:, k0:k1].to(torch.float32) @ w[:, k0:k1].t()) * (sx[:, b:b + 1] * ws[None, :, b])
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return apply_activation(y, activation).reshape(*lead, qweight.shape[0])


def _linear_b32_cpu(x2: torch.Tensor, arrays, n: int, act: int) -> torch.Tensor:
    if x2.stride(-1) != 1 and x2.shape[-1] > 1:
        x2 = x2.contiguous()  # the kernel takes any row stride, not a strided row
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    native().int8_linear_b32(x2.detach().numpy(), *arrays, act, out.numpy())
    return out


class BlockQuantizedLinear(Int8LinearBase):
    """INT8 ``y = act(x W^T + b)`` with weights and activations quantized per
    block of 32 input features (see the module docstring). Eager only: under
    ``torch.compile`` the call is a graph break.

    Buffers (so ``state_dict`` round-trips): ``packed_weight`` int8
    ``[ceil(N/16), ceil(K/4), 16, 4]`` (QuantizedLinear's layout),
    ``block_scale`` float32 ``[ceil(N/16), ceil(K/32), 16]``, ``bias`` float32
    ``[N]`` or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: Optional[str] = None):
        super().__init__(in_features, out_features, activation)
        nb, kb, nblk = -(-out_features // 16), -(-in_features // 4), -(-in_features // BLOCK)
        self.register_buffer("packed_weight", torch.zeros(nb, kb, 16, 4, dtype=torch.int8))
        self.register_buffer("block_scale", torch.zeros(nb, nblk, 16, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   activation: Optional[str] = None) -> "BlockQuantizedLinear":
        """Quantizes a float ``weight [N, K]`` (and copies ``bias [N]``) once."""
        w = cls._float_weight(weight, bias)
        n, k = w.shape
        mod = cls(k, n, bias=bias is not None, activation=activation)
        wq, scale = quantize_blocks_ref(w)
        with torch.no_grad():
            mod.packed_weight.copy_(pack_weight(wq))
            mod.block_scale.copy_(pack_block_scale(scale))
            if bias is not None:
                mod.bias.copy_(bias.detach().to("cpu", torch.float32))
        return mod

    def int8_weight(self) -> torch.Tensor:
        """The quantized weight as int8 ``[N, K]``."""
        return unpack_weight(self.packed_weight, self._out, self._in)

    def weight_scale(self) -> torch.Tensor:
        """The weight's scales ``[N, ceil(K / 32)]``."""
        return unpack_block_scale(self.block_scale, self._out)

    def dequantized_weight(self) -> torch.Tensor:
        """``Wq · scale`` as float32 ``[N, K]``."""
        scale = self.weight_scale().repeat_interleave(BLOCK, dim=1)[:, :self._in]
        return self.int8_weight().to(torch.float32) * scale

    def _bound(self) -> dict:
        bufs = self._buffers
        packed, scale, bias = bufs["packed_weight"], bufs["block_scale"], bufs["bias"]
        key = tuple((id(t), t.data_ptr()) for t in (packed, scale, bias) if t is not None)
        if self._impl_key == key:
            return self._impls
        device = packed.device.type if packed.device.type in _ORDER else "cuda"
        backend = choose_backend("int8_linear_b32", device, _ORDER, available={"cpu": _native_ok})
        act = self._activation
        if backend == "cpu":
            arrays = (packed.numpy(), scale.numpy(), None if bias is None else bias.detach().numpy())
            impl = lambda x2: _linear_b32_cpu(x2, arrays, self._out, _ACT_CODE[act])  # noqa: E731
        else:
            wq, ws = self.int8_weight().contiguous(), self.weight_scale().contiguous()
            impl = lambda x2: int8_linear_b32_ref(x2, wq, ws, bias, None if act == "none" else act)  # noqa: E731
        self._impls, self._impl_key = {backend: impl}, key
        return self._impls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self._in)
        if x2.shape[0] == 0:
            return x.new_empty((*lead, self._out))
        (impl,) = self._bound().values()
        return impl(x2).reshape(*lead, self._out)

    def extra_repr(self) -> str:
        return (f"in_features={self._in}, out_features={self._out}, bias={self.bias is not None}, "
                f"activation={self.activation}, weight and input=s8 per block of {BLOCK}")
