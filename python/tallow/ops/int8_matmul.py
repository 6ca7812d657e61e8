"""INT8 matrix multiply and the INT8 linear layer (VNNI u8·s8 with zero-point compensation).

**Raw GEMM.** ``int8_matmul(a, b)``: ``a`` int8 ``[M, K]``, ``b`` int8 ``[K, N]``
(like ``torch._int_mm``) gives int32 ``[M, N]``, exact: the int32 sums wrap
modulo 2^32 exactly like the int64-accumulated reference reduced to int32
(overflow needs K > 131072). The kernel feeds ``vpdpbusd`` (u8 × s8 → s32,
4 products per int32 lane) with ``a + 128`` as u8 and subtracts
``128 · colsum(b)[n]`` in the epilogue:

    sum_k a[m,k] b[k,n] = sum_k (a[m,k] + 128) b[k,n] - 128 sum_k b[k,n]

**INT8 linear.** ``QuantizedLinear.from_float(weight [N, K], bias [N] or None)``
quantizes the weights once, symmetric per output channel:
``scale_w[n] = max_k |W[n,k]| / 127`` (1 for an all-zero row),
``Wq = clamp(round(W / scale_w), -127, 127)`` (int8), and keeps them packed
in the layout the kernel reads, ``[ceil(N/16)][ceil(K/4)][16][4]`` int8 (for 16
consecutive output channels, 4 consecutive k in one dword; zero padded), plus
``colsum[n] = sum_k Wq[n,k]`` (int32). ``forward(x)`` quantizes each activation
row dynamically, asymmetric u8 with a zero point (better than symmetric s8
for post-GELU/ReLU activations), all in float32 with round-half-to-even:

    mn = min(0, min_k x[k]),  mx = max(0, max_k x[k])
    scale_x = (mx - mn) / 255   (1 if that is 0),  inv = 1 / scale_x
    zp = clamp(round(-mn · inv), 0, 255)
    q[k] = clamp(round(x[k] · inv) + zp, 0, 255)

and computes, with an exact int32 accumulator,

    y[n] = act( float(sum_k q[k] Wq[n,k] - zp · colsum[n]) · (scale_x · scale_w[n]) + bias[n] )

with ``act`` in {None, "relu", "gelu_erf" (BERT), "gelu_tanh" (GPT-2)}. A row
of x holding a NaN or an infinity gives an all-NaN output row (its scale is
NaN). The integer part is exact while ``255 · 127 · K < 2^31`` (K < 66311).

Backends: ``cpu`` (tallow._C) and ``ref`` (the same maths in torch, integer
part exact; it works from the same module state, unpacking the packed weights
with a torch view/permute). The ``cpu`` kernels (Intel, "Lower Numerical
Precision Deep Learning Inference and Training", 2018: VNNI u8·s8 with
zero-point compensation):

- AVX-512 VNNI: register tiles of 6 rows × 64 columns (24 zmm accumulators,
  ``vpdpbusd``), k blocked by 256 so a 16 KiB B panel stays in L1; tasks are
  (row block × 64-column chunk) over tallow's thread pool; M = 1 streams the
  packed weights once, split over N.
- AMX-INT8 (Sapphire Rapids and later, detected at run time, process
  permission via ``arch_prctl``; ``TALLOW_AMX=0`` turns it off): for M >= 8,
  ``tdpbusd`` on 2 × 2 tiles of 16 × 16 int32; the packed layout above is
  already the AMX B-tile layout (16 k-groups × 64 bytes, stride 64).
- AVX2 (exact ``vpdpbusd`` emulation with ``vpmaddwd``) and scalar code run the
  same algorithm for older CPUs.

All paths fuse the activation quantization (one pass per row) and the
dequantize + bias + activation epilogue. ``int8_matmul`` packs B panel by
panel inside the GEMM tasks (read once, kept in L2), any strides.

On CUDA tensors (``.to("cuda")`` moves a QuantizedLinear's buffers) the
backends are ``cuda`` (tallow._C_cuda, csrc/cuda/int8_matmul.cu:
``mma.sync`` s8·s8→s32 tensor-core tiles with cp.async double buffering,
``dp4a`` for unaligned K) and ``triton`` (kernels/int8_matmul.py: ``tl.dot``
on int8, autotuned tiles), in that order. Both quantize the activations in a
small kernel of their own (bit-identical q, scale, zp), store ``q - 128``
as s8 for the tensor cores and fold ``(128 - zp) · colsum[n]`` into the fused
epilogue; they read the unpacked int8 weight ``[N, K]`` (cached per module).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _gpu
from .._dispatch import BackendUnavailable, choose_backend, dispatch, eager_call
from .._native import native

_ORDER = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}


def _native_ok() -> bool:
    from .._native import native_available

    return native_available()
ACTIVATIONS = (None, "relu", "gelu_erf", "gelu_tanh")
_ACT_CODE = {"none": 0, "relu": 1, "gelu_erf": 2, "gelu_tanh": 3}


# --------------------------------------------------------------------------- references


def _wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 modulo 2^32 (two's complement), explicitly."""
    return (((x + 2**31) % 2**32) - 2**31).to(torch.int32)


def int8_matmul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] @ int8 [K, N] -> int32 [M, N] (wrapping like int32).

    Computed in float64, exact: every partial sum is an integer below 2^53.
    """
    acc = torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64)
    return _wrap_int32(acc)


def quantize_rows_ref(x: torch.Tensor, levels: int = 255):
    """Dynamic per-row asymmetric u8 quantization of float32 ``x [..., K]``.

    Returns ``(q uint8 [..., K], scale float32 [...], zp int32 [...])`` computed
    with exactly the float32 operations of the module docstring (the CPU kernel
    matches them bit for bit). Rows with a NaN/inf get ``scale = NaN``,
    ``zp = 0`` and ``q = 0``. ``levels=127`` is the 7-bit variant (q and zp
    in [0, 127]) the native kernels take with ``a_bits=7``.
    """
    if levels not in (127, 255):
        raise ValueError(f"levels must be 127 or 255, got {levels!r}")
    x = x.to(torch.float32)
    k = x.shape[-1]
    if k == 0:
        mn = torch.zeros(x.shape[:-1], dtype=torch.float32)
        mx = mn
    else:
        mn = torch.clamp_max(torch.amin(x, dim=-1), 0.0)
        mx = torch.clamp_min(torch.amax(x, dim=-1), 0.0)
    top = float(levels)
    scale = (mx - mn) / torch.tensor(top, dtype=torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = torch.tensor(1.0, dtype=torch.float32) / scale
    zp = torch.clamp(torch.round(-mn * inv), 0.0, top)
    q = torch.clamp(torch.round(x * inv[..., None]) + zp[..., None], 0.0, top)
    bad = ~torch.isfinite(x).all(dim=-1) if k else torch.zeros(x.shape[:-1], dtype=torch.bool)
    q = torch.where(bad[..., None], torch.zeros_like(q), q)
    zp = torch.where(bad, torch.zeros_like(zp), zp)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return q.to(torch.uint8), scale, zp.to(torch.int32)


def apply_activation(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """The epilogue activations in torch (also used by fp32 model layers)."""
    if activation is None or activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu_erf":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def int8_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    levels: int = 255,
) -> torch.Tensor:
    """The INT8 linear maths in torch: ``x [..., K]`` float32, ``qweight`` the
    **unpacked** int8 weight ``[N, K]``, ``weight_scale [N]`` float32, ``bias [N]``
    or None. Quantizes x with :func:`quantize_rows_ref` (``levels``), computes the integer
    part exactly (float64 sums of integers < 2^53) and dequantizes in float32
    in the kernel's order: ``float(acc - zp·colsum) · (scale_x · scale_w) + bias``.
    """
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    q, sx, zp = quantize_rows_ref(x2, levels)
    w = qweight.to(torch.float64)
    colsum = qweight.to(torch.int64).sum(dim=1)
    acc = torch.matmul(q.to(torch.float64), w.t()).to(torch.int64)
    acc = _wrap_int32(acc - zp.to(torch.int64)[:, None] * colsum[None, :])
    y = acc.to(torch.float32) * (sx[:, None] * weight_scale.to(torch.float32)[None, :])
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    y = apply_activation(y, activation)
    return y.reshape(*lead, qweight.shape[0])


# --------------------------------------------------------------------------- packing


def pack_weight(wq: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` -> packed ``[ceil(N/16), ceil(K/4), 16, 4]`` int8, zero padded:
    ``packed[nb, kb, i, j] = wq[16 nb + i, 4 kb + j]``."""
    n, k = wq.shape
    nb, kb = (n + 15) // 16, (k + 3) // 4
    padded = torch.zeros(nb * 16, kb * 4, dtype=torch.int8)
    padded[:n, :k] = wq
    return padded.view(nb, 16, kb, 4).permute(0, 2, 1, 3).contiguous()


def unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: packed -> int8 ``[N, K]``."""
    nb, kb = packed.shape[0], packed.shape[1]
    return packed.permute(0, 2, 1, 3).reshape(nb * 16, kb * 4)[:n, :k]


def fill_quantized_weights(mod: torch.nn.Module, w: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Quantizes float32 ``w [N, K]`` symmetric per output channel
    (``scale = max|w| / 127``, 1 for an all-zero row; ``clamp(round(w / scale),
    -127, 127)``) into ``mod``'s ``packed_weight``, ``weight_scale`` and
    ``weight_colsum`` buffers, and copies ``bias`` (QuantizedLinear,
    QuantizedConv2d)."""
    scale = w.abs().amax(dim=1) / torch.tensor(127.0, dtype=torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    wq = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    with torch.no_grad():
        mod.packed_weight.copy_(pack_weight(wq))
        mod.weight_scale.copy_(scale)
        mod.weight_colsum.copy_(wq.to(torch.int32).sum(dim=1, dtype=torch.int32))
        if bias is not None:
            mod.bias.copy_(bias.detach().to("cpu", torch.float32))


# --------------------------------------------------------------------------- int8_matmul op


def _int8_matmul_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mod = native()
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.int32)
    # The kernel reads any strides (it converts A to u8 and packs B anyway).
    mod.int8_matmul(a.detach().numpy(), b.detach().numpy(), out.numpy())
    return out


def _int8_matmul_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mod = _gpu.cuda_backend(a)
    # K-contiguous rows with a real row stride (an expanded row has stride 0)
    a = a if a.stride(1) == 1 and a.stride(0) >= a.shape[1] else a.contiguous()
    wt = b.t().contiguous()  # [N, K]: the kernels read K-contiguous rows of both operands
    m, k = a.shape
    n = wt.shape[0]
    out = torch.empty(m, n, dtype=torch.int32, device=a.device)
    with torch.cuda.device(a.device):
        mod.int8_gemm(a.data_ptr(), wt.data_ptr(), out.data_ptr(), m, n, k, a.stride(0), wt.stride(0), n,
                      False, 0, 0, 0, 0, 0, 0, 0, _gpu.stream_of(a))
    return out


def _int8_matmul_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    kern = _gpu.triton_kernels("int8_matmul", a)
    with torch.cuda.device(a.device):
        return kern.int8_matmul(a, b)


_MATMUL_IMPLS = {"cpu": _int8_matmul_cpu, "cuda": _int8_matmul_cuda, "triton": _int8_matmul_triton,
                 "ref": int8_matmul_ref}


@torch.library.custom_op("tallow::int8_matmul", mutates_args=())
def _int8_matmul_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return dispatch("int8_matmul", a.device.type, _ORDER, _MATMUL_IMPLS, a, b)


@_int8_matmul_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a [M, K] int8 @ b [K, N] int8 -> int32 [M, N]`` (any strides);
    see the module docstring."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"int8_matmul: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int8:
            raise TypeError(f"int8_matmul: {name} must be int8, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"int8_matmul: {name} must be 2-D, got shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"int8_matmul: a.shape[1] ({a.shape[1]}) must equal b.shape[0] ({b.shape[0]}); "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"int8_matmul: a is on {a.device}, b on {b.device}")
    if a.shape[0] == 0 or b.shape[1] == 0 or a.shape[1] == 0:
        return torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    if eager_call(a, b):
        return dispatch("int8_matmul", a.device.type, _ORDER, _MATMUL_IMPLS, a, b)
    return _int8_matmul_op(a, b)


# --------------------------------------------------------------------------- int8_linear op


def _int8_linear_ref_packed(x, packed, colsum, weight_scale, bias, activation):
    qweight = unpack_weight(packed, colsum.shape[0], x.shape[-1])
    return int8_linear_ref(x, qweight, weight_scale, bias, None if activation == "none" else activation)


def _weight_arrays(packed, colsum, weight_scale, bias):
    return (packed.numpy(), colsum.numpy(), weight_scale.numpy(), None if bias is None else bias.detach().numpy())


def _int8_linear_cpu(x, packed, colsum, weight_scale, bias, activation, arrays=None):
    mod = native()
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()  # the kernel takes any row stride, not a strided row
    if arrays is None:
        arrays = _weight_arrays(packed, colsum, weight_scale, bias)
    out = torch.empty(x.shape[0], colsum.shape[0], dtype=torch.float32)
    mod.int8_linear(x.detach().numpy(), *arrays, _ACT_CODE[activation], out.numpy())
    return out


def _unpacked(packed, colsum, k, wq):
    return wq if wq is not None else unpack_weight(packed, colsum.shape[0], k).contiguous()


def _int8_linear_cuda(x, packed, colsum, weight_scale, bias, activation, wq=None):
    mod = _gpu.cuda_backend(x)
    if x.stride(-1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    m, k = x.shape
    wq = _unpacked(packed, colsum, k, wq)
    n = wq.shape[0]
    dev = x.device
    xq = torch.empty(m, k, dtype=torch.int8, device=dev)
    sx = torch.empty(m, dtype=torch.float32, device=dev)
    zp = torch.empty(m, dtype=torch.int32, device=dev)
    out = torch.empty(m, n, dtype=torch.float32, device=dev)
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    with torch.cuda.device(dev):
        stream = _gpu.stream_of(x)
        mod.int8_quantize_rows(x.data_ptr(), xq.data_ptr(), sx.data_ptr(), zp.data_ptr(), m, k, x.stride(0), stream)
        mod.int8_gemm(xq.data_ptr(), wq.data_ptr(), out.data_ptr(), m, n, k, k, wq.stride(0), n, True,
                      _ACT_CODE[activation], sx.data_ptr(), zp.data_ptr(), colsum.data_ptr(),
                      weight_scale.data_ptr(), 0 if b is None else b.data_ptr(), 0, stream)
    return out


def _int8_linear_triton(x, packed, colsum, weight_scale, bias, activation, wq=None):
    kern = _gpu.triton_kernels("int8_matmul", x)
    wq = _unpacked(packed, colsum, x.shape[-1], wq)
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    with torch.cuda.device(x.device):
        return kern.int8_linear(x, wq.t(), colsum, weight_scale, b, activation)


_LINEAR_IMPLS = {"cpu": _int8_linear_cpu, "cuda": _int8_linear_cuda, "triton": _int8_linear_triton,
                 "ref": _int8_linear_ref_packed}


@torch.library.custom_op("tallow::int8_linear", mutates_args=())
def _int8_linear_op(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_colsum: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
) -> torch.Tensor:
    """x float32 [M, K] (unit stride in K) -> float32 [M, N]."""
    return dispatch(
        "int8_linear", x.device.type, _ORDER, _LINEAR_IMPLS, x, packed_weight, weight_colsum, weight_scale, bias, activation
    )


@_int8_linear_op.register_fake
def _(x, packed_weight, weight_colsum, weight_scale, bias, activation):
    return x.new_empty((x.shape[0], weight_colsum.shape[0]), dtype=torch.float32)


def _check_activation(activation) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"QuantizedLinear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return "none" if activation is None else activation


class Int8LinearBase(torch.nn.Module):
    """What the INT8 linear modules share (QuantizedLinear here,
    BlockQuantizedLinear in int8_block): sizes, activation and the checks of
    an input. Subclasses hold a ``packed_weight`` buffer."""

    def __init__(self, in_features: int, out_features: int, activation: Optional[str]):
        super().__init__()
        name = type(self).__name__
        for what, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {what} must be an int >= 1, got {v!r}")
        self._activation = _check_activation(activation)
        self._in = in_features
        self._out = out_features
        self._impls: dict = {}  # backend name -> callable, built by _bound()
        self._impl_key = None

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    @property
    def activation(self) -> Optional[str]:
        return None if self._activation == "none" else self._activation

    @classmethod
    def _float_weight(cls, weight, bias) -> torch.Tensor:
        """from_float's arguments checked (weight a non-empty finite floating
        [N, K] tensor, bias [N] or None); the weight as float32 on the CPU."""
        what = f"{cls.__name__}.from_float"
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{what}: weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"{what}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"{what}: weight must be floating point, got {weight.dtype}")
        n, k = weight.shape
        if n == 0 or k == 0:
            raise ValueError(f"{what}: weight must be non-empty, got shape {tuple(weight.shape)}")
        w = weight.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{what}: weight contains NaN or inf")
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"{what}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
            if tuple(bias.shape) != (n,):
                raise ValueError(f"{what}: bias must have shape ({n},), got {tuple(bias.shape)}")
        return w

    def _check_input(self, x) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise TypeError(f"{name}: x must be float32, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self._in:
            raise ValueError(f"{name}: x must have shape [..., {self._in}] (in_features), got {tuple(x.shape)}")
        packed = self._buffers["packed_weight"]
        if x.device != packed.device:
            raise ValueError(f"{name}: x is on {x.device} but the weights are on {packed.device} "
                             "(move the module with .to(device))")


class QuantizedLinear(Int8LinearBase):
    """INT8 ``y = act(x W^T + b)``: per-channel symmetric int8 weights, dynamic
    per-row u8 activations, fused dequantize + bias + activation (see the
    module docstring for the exact maths).

    Buffers (so ``state_dict`` round-trips): ``packed_weight`` int8
    ``[ceil(N/16), ceil(K/4), 16, 4]``, ``weight_scale`` float32 ``[N]``,
    ``weight_colsum`` int32 ``[N]``, ``bias`` float32 ``[N]`` or None. The int8
    weight ``[N, K]`` is not stored separately: :meth:`int8_weight` unpacks it
    (a torch view/permute), which is what the ref backend does.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: Optional[str] = None):
        super().__init__(in_features, out_features, activation)
        nb, kb = (out_features + 15) // 16, (in_features + 3) // 4
        self.register_buffer("packed_weight", torch.zeros(nb, kb, 16, 4, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("weight_colsum", torch.zeros(out_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.register_buffer("bias", None)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, activation: Optional[str] = None
    ) -> "QuantizedLinear":
        """Quantizes a float ``weight [N, K]`` (and ``bias [N]``) once."""
        w = cls._float_weight(weight, bias)
        n, k = w.shape
        mod = cls(k, n, bias=bias is not None, activation=activation)
        fill_quantized_weights(mod, w, bias)
        return mod

    def int8_weight(self) -> torch.Tensor:
        """The quantized weight as int8 ``[N, K]`` (unpacked view of the buffer)."""
        return unpack_weight(self.packed_weight, self._out, self._in)

    def dequantized_weight(self) -> torch.Tensor:
        """``Wq · scale_w`` as float32 ``[N, K]``."""
        return self.int8_weight().to(torch.float32) * self.weight_scale[:, None]

    def _bound(self) -> dict:
        """The implementations for the buffers as they are now, built once:
        keyed by the buffers' identity and address, so a load_state_dict or
        .to() that replaces or moves them builds them again (and only then).
        On CPU the backend is chosen here, once (DESIGN.md convention 16):
        tallow._C's kernel with the weights' numpy views, or the reference
        when TALLOW_BACKEND=ref or the native module is missing (auto-chosen:
        with a warning; TALLOW_BACKEND=cpu without it raises). GPU backends
        read the unpacked int8 weight, unpacked here once."""
        bufs = self._buffers
        packed, colsum, scale, bias = bufs["packed_weight"], bufs["weight_colsum"], bufs["weight_scale"], bufs["bias"]
        key = tuple((id(t), t.data_ptr()) for t in (packed, colsum, scale, bias) if t is not None)
        if self._impl_key == key:
            return self._impls
        if packed.device.type == "cpu":
            backend = choose_backend("int8_linear", "cpu", _ORDER, available={"cpu": _native_ok})
            if backend == "cpu":
                cpu = partial(_int8_linear_cpu, packed=packed, colsum=colsum, weight_scale=scale, bias=bias,
                              activation=self._activation, arrays=_weight_arrays(packed, colsum, scale, bias))
                impls = {"cpu": cpu}
            else:
                impls = {"ref": lambda x2: _int8_linear_ref_packed(x2, packed, colsum, scale, bias, self._activation)}
        else:
            wq = self.int8_weight().contiguous()
            impls = {"cuda": partial(_int8_linear_cuda, wq=wq), "triton": partial(_int8_linear_triton, wq=wq),
                     "ref": _int8_linear_ref_packed}
        self._impls, self._impl_key = impls, key
        return impls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        bufs = self._buffers
        packed = bufs["packed_weight"]
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self._in)  # a view when the leading dims allow it
        if x2.shape[0] == 0:
            return x.new_empty((*lead, self._out))
        if not eager_call(x2, packed):  # torch.compile / export / fake tensors: the registered op
            y = _int8_linear_op(x2, packed, bufs["weight_colsum"], bufs["weight_scale"], bufs["bias"], self._activation)
        else:
            impls = self._bound()
            if packed.device.type == "cpu":
                (impl,) = impls.values()
                y = impl(x2)
            else:  # GPU backends can refuse a call (dtype, alignment): dispatch falls back per call
                y = dispatch("int8_linear", x2.device.type, _ORDER, impls, x2, packed, bufs["weight_colsum"],
                             bufs["weight_scale"], bufs["bias"], self._activation)
        return y if x.dim() == 2 else y.reshape(*lead, self._out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self._in}, out_features={self._out}, bias={self.bias is not None}, "
            f"activation={self.activation}, weight=int8 per-channel, input=u8 dynamic per-row"
        )
