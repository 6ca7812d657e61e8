"""INT8 linear with block-quantized activations, for LLM decoders.

The hidden states of Llama-family models have a few channels a hundred times
larger than the rest. :class:`~tallow.ops.QuantizedLinear` quantizes a whole
activation row with one scale, so those outliers leave the other channels a
handful of levels: SmolLM2-135M's perplexity rises by 1.2 % and greedy
replies diverge early. Here each block of ``BLOCK = 32`` consecutive input
features gets its own scale (as llama.cpp's Q8 activations do), symmetric::

    amax = max |x[blk]|            scale = amax / 127   (0 for a block of zeros)
    q    = clamp(round_half_even(x · (127 / amax)), -127, 127)   (s8)
    y[n] = act(scale_w[n] · Σ_blk scale[blk] · Σ_{k ∈ blk} q[k] · Wq[n, k] + bias[n])

float32 operations, so the CPU kernel's q and scale match
:func:`quantize_blocks_ref` bit for bit; a block holding a NaN or inf gets
scale NaN (its outputs are NaN). The weights are
:class:`~tallow.ops.QuantizedLinear`'s (per-channel symmetric int8 in
``[-127, 127]``, the same packed buffers), so a module switches modes without
repacking. The integer dot of a block is exact (|·| ≤ 32 · 127 · 127 < 2^24,
also in float32); the kernel (tallow._C.int8_linear_b32, csrc/int8_matmul:
s8 × s8 with vpdpbusd on |a| and a's sign moved onto w on AVX-512 VNNI,
vpmaddubsw + vpmaddwd on AVX2 — pair sums below 2^15, no saturation — SDOT
on NEON) scales each block's int32 sums into float accumulators.

Backends: ``cpu`` (the kernel) and ``ref`` (:func:`int8_linear_b32_ref`, torch
ops on any device: CUDA tensors run it — no GPU kernel of its own yet).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._dispatch import choose_backend
from .._native import native
from .int8_matmul import _ACT_CODE, QuantizedLinear, _native_ok, apply_activation

BLOCK = 32
_ORDER = {"cpu": ("cpu", "ref"), "cuda": ("ref",)}


def quantize_blocks_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``x [M, K]`` -> ``(q int8 [M, K], scale float32 [M, ceil(K / 32)])``,
    the module docstring's float32 operations."""
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


def int8_linear_b32_ref(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, activation: Optional[str] = None) -> torch.Tensor:
    """The maths in torch: ``x [..., K]`` float32, ``qweight`` the unpacked int8
    weight ``[N, K]``. Each block's integer dot is exact in float32; the blocks
    are summed in order, as the kernel does."""
    lead, k = x.shape[:-1], x.shape[-1]
    q, sx = quantize_blocks_ref(x.reshape(-1, k))
    w = qweight.to(torch.float32)
    y = torch.zeros(q.shape[0], qweight.shape[0], dtype=torch.float32, device=x.device)
    for b in range(sx.shape[1]):
        k0, k1 = b * BLOCK, min((b + 1) * BLOCK, k)
        y = y + (q[:, k0:k1].to(torch.float32) @ w[:, k0:k1].t()) * sx[:, b:b + 1]
    y = y * weight_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return apply_activation(y, activation).reshape(*lead, qweight.shape[0])


def _linear_b32_cpu(x2: torch.Tensor, arrays, n: int, act: int) -> torch.Tensor:
    if x2.stride(-1) != 1 and x2.shape[-1] > 1:
        x2 = x2.contiguous()  # the kernel takes any row stride, not a strided row
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    native().int8_linear_b32(x2.detach().numpy(), *arrays, act, out.numpy())
    return out


class BlockQuantizedLinear(QuantizedLinear):
    """:class:`~tallow.ops.QuantizedLinear`'s weights with activations quantized
    per block of 32 input features (see the module docstring). Eager only:
    under ``torch.compile`` the call is a graph break."""

    @classmethod
    def from_quantized(cls, q: QuantizedLinear) -> "BlockQuantizedLinear":
        """The same buffers (shared, not copied) in block mode."""
        mod = cls(q.in_features, q.out_features, bias=q.bias is not None, activation=q.activation)
        for name in ("packed_weight", "weight_scale", "weight_colsum", "bias"):
            setattr(mod, name, getattr(q, name))
        return mod

    def _bound(self) -> dict:
        bufs = self._buffers
        packed, scale, bias = bufs["packed_weight"], bufs["weight_scale"], bufs["bias"]
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
            wq = self.int8_weight().contiguous()
            impl = lambda x2: int8_linear_b32_ref(x2, wq, scale, bias, None if act == "none" else act)  # noqa: E731
        self._impls, self._impl_key = {backend: impl}, key
        return self._impls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"BlockQuantizedLinear: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise TypeError(f"BlockQuantizedLinear: x must be float32, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self._in:
            raise ValueError(f"BlockQuantizedLinear: x must have shape [..., {self._in}] (in_features), "
                             f"got {tuple(x.shape)}")
        if x.device != self.packed_weight.device:
            raise ValueError(f"BlockQuantizedLinear: x is on {x.device} but the weights are on "
                             f"{self.packed_weight.device} (move the module with .to(device))")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self._in)
        if x2.shape[0] == 0:
            return x.new_empty((*lead, self._out))
        (impl,) = self._bound().values()
        return impl(x2).reshape(*lead, self._out)

    def extra_repr(self) -> str:
        return (f"in_features={self._in}, out_features={self._out}, bias={self.bias is not None}, "
                f"activation={self.activation}, weight=int8 per-channel, input=s8 per block of {BLOCK}")
