"""Integer GEMM and convolution with int32 accumulation and a fused dequantizing epilogue.

Three custom ops, each taking the name of the backend that runs it, with their fake (meta)
kernels registered here once for all backends:

- `synq::int_mm(a, b, k, a_packed, a_signed, b_packed, backend)`: a (M, K) @ b (N, K).T in
  int32, either operand int8 or packed int4 (see `pack_int4` for the layout); behind
  `int8_matmul` and `int4_matmul`.
- `synq::quantized_linear(...)`: the same product with the epilogue
  out = x_scale[m] w_scale[n] (acc[m, n] - x_zero[m] rowsum(w)[n]) + bias[n], ReLU, cast.
- `synq::quantized_conv2d(...)`: the convolution form (implicit-GEMM semantics).

The backends register functions under the op names "int_mm", "quantized_linear" and
"quantized_conv2d" in `synq_kernels.backends` (signatures: see `reference_*` below). The ops
are not differentiable (integer inputs).
"""
from __future__ import annotations

from typing import Optional

import math
import os

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from .. import _checks, backends
from ..reference import int_gemm as R

# int32 accumulation is exact while K * 2^15 (largest |product| after the uint8 shift, times
# K) stays below 2^31.
MAX_K = 1 << 16
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_values(x_scale, x_zero, w_scale):
    """The data-dependent checks, run inside the ops so that torch.compile traces around them
    (x_zero is already in the int8 domain: uint8 activations are shifted by -128)."""
    _checks.check_positive_finite("x_scale", x_scale)
    _checks.check_positive_finite("w_scale", w_scale)
    if x_zero.numel() and _checks.value_checks_enabled(x_zero):
        lo, hi = _checks.min_max(x_zero)
        if lo < -128 or hi > 127:
            bad = (x_zero < -128) | (x_zero > 127)
            raise ValueError("x_zero must be within the range of x_q's dtype (int8: -128..127, "
                             "uint8: 0..255), got "
                             f"{int(x_zero.flatten()[bad.flatten()][0])} in the int8 domain "
                             "(uint8 zero points are shifted by -128)")


# -- custom ops ---------------------------------------------------------------------------------

@torch.library.custom_op("synq::int_mm", mutates_args=())
def _int_mm(a: Tensor, b: Tensor, k: int, a_packed: bool, a_signed: bool, b_packed: bool,
            backend: str) -> Tensor:
    if a.shape[0] == 0 or b.shape[0] == 0 or k == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    return backends.implementation("int_mm", backend)(a, b, k, a_packed, a_signed, b_packed)


@_int_mm.register_fake
def _(a, b, k, a_packed, a_signed, b_packed, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


def _direct_ok(*tensors) -> bool:
    """Whether an eager call may run an op's body without the custom-op layer around it
    (about 45 us a call): plain tensors, no dispatch mode (fake tensors, tracing), not
    compiling or scripting. The op is still what torch.compile, opcheck and export see."""
    return (not torch.compiler.is_compiling() and not torch._C._get_tracing_state()
            and _current_dispatch_mode() is None
            and all(type(t) is torch.Tensor for t in tensors if t is not None))


@torch.library.custom_op("synq::quantized_linear", mutates_args=())
def _quantized_linear(x: Tensor, x_scale: Tensor, x_zero: Tensor, w: Tensor, w_scale: Tensor,
                      w_rowsum: Tensor, bias: Optional[Tensor], relu: bool,
                      out_dtype: torch.dtype, w_packed: bool, backend: str) -> Tensor:
    return _linear_body(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu, out_dtype,
                        w_packed, backend)


def _linear_body(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu, out_dtype, w_packed,
                 backend):
    _check_values(x_scale, x_zero, w_scale)
    if x.shape[0] == 0 or w.shape[0] == 0:
        return torch.empty(x.shape[0], w.shape[0], dtype=out_dtype, device=x.device)
    fn = backends.implementation("quantized_linear", backend)
    return fn(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu, out_dtype, w_packed)


@_quantized_linear.register_fake
def _(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu, out_dtype, w_packed, backend):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


def conv_out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.custom_op("synq::quantized_conv2d", mutates_args=())
def _quantized_conv2d(x: Tensor, x_scale: Tensor, x_zero: Tensor, w: Tensor, w_scale: Tensor,
                      w_rowsum: Tensor, bias: Optional[Tensor], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, relu: bool,
                      out_dtype: torch.dtype, backend: str) -> Tensor:
    return _conv2d_body(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding,
                        dilation, groups, relu, out_dtype, backend)


def _conv2d_body(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding, dilation,
                 groups, relu, out_dtype, backend):
    _check_values(x_scale, x_zero, w_scale)
    fn = backends.implementation("quantized_conv2d", backend)
    if x.numel() == 0 or w.shape[0] == 0:
        return _conv_empty(x, w, stride, padding, dilation, out_dtype)
    return fn(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding, dilation,
              groups, relu, out_dtype)


def _conv_empty(x, w, stride, padding, dilation, out_dtype):
    oh = conv_out_size(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    out = x.new_empty((x.shape[0], w.shape[0], oh, ow), dtype=out_dtype)
    return out.contiguous(memory_format=R.conv_memory_format(x))


@_quantized_conv2d.register_fake
def _(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding, dilation, groups, relu,
      out_dtype, backend):
    return _conv_empty(x, w, stride, padding, dilation, out_dtype)


# -- reference backend (registered by synq_kernels/__init__.py) ---------------------------------

def reference_int_mm(a, b, k, a_packed, a_signed, b_packed):
    return R.int_mm(a, b, k, a_packed, a_signed, b_packed)


def reference_quantized_linear(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu,
                               out_dtype, w_packed):
    return R.quantized_linear(x, x_scale, x_zero, w, w_scale, bias, relu, out_dtype, w_packed)


def reference_quantized_conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride,
                               padding, dilation, groups, relu, out_dtype):
    return R.quantized_conv2d(x, x_scale, x_zero, w, w_scale, bias, stride, padding, dilation,
                              groups, relu, out_dtype)


# -- argument checks ----------------------------------------------------------------------------

def _check_tensor(name, t, dtypes, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _check_k(k):
    if k > MAX_K:
        raise ValueError(f"K = {k} is too large: int32 accumulation is exact for K <= {MAX_K}")


def _packed_len(k):
    return (k + 1) // 2


def _resolve(op, device, backend):
    return backends.resolve(op, device, backend)


# From these M on, an int8 x int8 product on a GPU goes to Triton rather than to the cuda
# kernel when the caller named no backend. Measured on an H100 and an H200 at K = N = 4096
# (benchmarks/results/gpu_2026-11-27/int_gemm_*), Triton time / cuda time:
# - int8_matmul: 0.29 / 0.28 at M = 4096 (Triton's wgmma kernel is 1.39x fp16 matmul at
#   4096^3 on the H100, the cuda mma.sync one 0.40x), 0.38 / 0.73 at M = 256; at M = 16 the
#   cards disagreed (0.86 / 2.9), at M = 1 cuda's weight-streaming kernel won (2.4 / 4.2).
# - quantized_linear (int8 weights): 0.64 / 0.51 at M = 4096, but 0.82 / 1.26 at M = 256 and
#   cuda ahead at M <= 16, so its switch is set higher, past the M where the cards disagreed.
# Packed int4 weights stay on cuda, which was faster at every M.
TRITON_INT8_MIN_M = {"int_mm": 17, "quantized_linear": 257}


def _resolve_gemm(op, device, backend, m, int4):
    be = _resolve(op, device, backend)
    if (backend is None and be == "cuda" and not int4 and m >= TRITON_INT8_MIN_M[op]
            and not os.environ.get("SYNQ_BACKEND")
            and "triton" in backends.available_backends(op, "cuda")):
        return "triton"
    return be


# -- public API ---------------------------------------------------------------------------------

def pack_int4(q: Tensor, signed: bool = True) -> Tensor:
    """Pack 4-bit integers two per byte along the last dim.

    Layout: byte i of a row holds element 2i in its low nibble and element 2i+1 in its high
    nibble, each as a 4-bit two's-complement pattern (signed: -8..7) or plain value
    (unsigned: 0..15); an odd last dim n is padded with a zero nibble, so the result is uint8
    of shape (..., ceil(n / 2)). `unpack_int4(pack_int4(q, s), s, n)` returns q as int8.

    Args:
        q: integer tensor (int8, uint8, int16, int32, int64) with every value in range.
        signed: whether the values are signed 4-bit (-8..7) or unsigned (0..15).
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor, got dtype {q.dtype}")
    if q.dim() == 0:
        raise ValueError("q must have at least one dim (values are packed along the last)")
    lo, hi = R.int4_range(signed)
    if q.numel() and _checks.value_checks_enabled(q):
        bad = (q < lo) | (q > hi)
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            kind = "signed" if signed else "unsigned"
            raise ValueError(f"q must hold {kind} 4-bit values ({lo}..{hi}), got "
                             f"{int(q.flatten()[i])} at flat index {i}")
    return R.pack_int4(q, signed)


def unpack_int4(p: Tensor, signed: bool = True, n: int | None = None) -> Tensor:
    """Inverse of `pack_int4`: int8 of shape (..., n), n = 2 * p.shape[-1] by default (give
    the original odd length to drop the padding nibble)."""
    _check_tensor("p", p, (torch.uint8,))
    if p.dim() == 0:
        raise ValueError("p must have at least one dim")
    if n is not None:
        _checks.check_int_range("n", n, 0, 2 * p.shape[-1])
        if _packed_len(n) != p.shape[-1]:
            raise ValueError(f"n = {n} does not match p's last dim {p.shape[-1]} "
                             f"(expected ceil(n / 2) = {p.shape[-1]})")
    return R.unpack_int4(p, signed, n)


def int8_matmul(a: Tensor, b: Tensor, backend: str | None = None) -> Tensor:
    """a (M, K) int8 @ b (N, K) int8 .T (nn.Linear weight layout) -> int32 (M, N), exact.

    Any M, N >= 0 and K <= 65536 (int32 accumulation stays exact; larger K raises
    ValueError); batch-1 works. backend: "reference", "cpu", "cuda", "triton", or None for
    the fastest available on a's device."""
    _check_tensor("a", a, (torch.int8,), 2)
    _check_tensor("b", b, (torch.int8,), 2)
    _checks.check_same_device(a=a, b=b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"K mismatch: a is {tuple(a.shape)} (M, K) and b is "
                         f"{tuple(b.shape)} (N, K)")
    _check_k(a.shape[1])
    be = _resolve_gemm("int_mm", a.device, backend, a.shape[0], False)
    return torch.ops.synq.int_mm(a, b, a.shape[1], False, True, False, be)


def int4_matmul(a: Tensor, b: Tensor, k: int | None = None, a_signed: bool = True,
                backend: str | None = None) -> Tensor:
    """a @ b.T in int32 with b packed signed int4 (N, ceil(K/2)) (see `pack_int4`).

    a is either packed int4 (uint8, (M, ceil(K/2)); W4A4; signed or unsigned per a_signed)
    or int8 (M, K) (W4A8). k: the unpacked K, needed when it is odd and a is packed
    (default: a's last dim for int8 a, twice it for packed a). The 4-bit operands are
    unpacked inside the kernel."""
    _check_tensor("a", a, (torch.int8, torch.uint8), 2)
    _check_tensor("b", b, (torch.uint8,), 2)
    _checks.check_same_device(a=a, b=b)
    a_packed = a.dtype == torch.uint8
    if k is None:
        k = a.shape[1] * 2 if a_packed else a.shape[1]
    _checks.check_int_range("k", k, 0, 1 << 40)
    if a_packed and _packed_len(k) != a.shape[1]:
        raise ValueError(f"K mismatch: packed a has {a.shape[1]} bytes per row, K = {k} needs "
                         f"{_packed_len(k)}")
    if not a_packed and a.shape[1] != k:
        raise ValueError(f"K mismatch: int8 a is {tuple(a.shape)} but k = {k}")
    if _packed_len(k) != b.shape[1]:
        raise ValueError(f"K mismatch: packed b is {tuple(b.shape)} (N, ceil(K/2)) but K = {k} "
                         f"needs {_packed_len(k)} bytes per row")
    _check_k(k)
    be = _resolve("int_mm", a.device, backend)
    return torch.ops.synq.int_mm(a, b, k, a_packed, bool(a_signed), True, be)


def weight_row_sums(w_q: Tensor, k: int | None = None) -> Tensor:
    """Row sums (int32, shape (N,)) of an int8 weight (N, ...) or of a packed int4 weight
    (N, ceil(K/2)), for the zero-point correction; compute once per weight and pass to
    `quantized_linear` / `quantized_conv2d` as w_rowsum."""
    w2 = w_q.flatten(1)
    packed = w_q.dtype == torch.uint8
    kk = (2 * w2.shape[1] if k is None else k) if packed else w2.shape[1]
    if (w2.device.type == "cpu" and 0 < kk <= MAX_K
            and "cpu" in backends.available_backends("int_mm", "cpu")):
        # a row of ones through the cpu GEMV: torch's int32 sum of int8 values took 27 ms for
        # a 4096 x 4096 weight on one thread of the AVX-512 EPYC, this 0.25 ms
        ones = torch.ones(1, kk, dtype=torch.int8)
        if packed:
            return int4_matmul(ones, w2, k=kk, backend="cpu")[0]
        return int8_matmul(ones, w2, backend="cpu")[0]
    if packed:
        w2 = R.unpack_int4(w2, True, k)
    return w2.sum(1, dtype=torch.int32)


def _int_param(name, v, device):
    if isinstance(v, torch.Tensor):
        if v.dtype.is_floating_point:
            if _checks.value_checks_enabled(v) and bool((v != v.round()).any()):
                raise ValueError(f"{name} must hold integers, got {v}")
        return v.to(device=device, dtype=torch.int32)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int or an integer tensor, got {v!r}")
    # torch.full fills on the device; torch.tensor would copy from pageable host memory and
    # make the host wait for the GPU's queue at every call (a CUDA sync)
    return torch.full((), v, dtype=torch.int32, device=device)


def _float_param(name, v, device):
    if isinstance(v, torch.Tensor):
        _checks.check_float_tensor(name, v, (torch.float32, torch.float64, torch.float16,
                                             torch.bfloat16))
        v = v.to(device=device, dtype=torch.float32)
    else:
        v = torch.full((), _checks.check_finite_float(name, v), dtype=torch.float32,
                       device=device)  # no host-device copy (see _int_param)
    return v


def _per_row(name, t, lead_shape, m):
    """A scalar or per-row parameter as a contiguous (M,) tensor."""
    if t.numel() == 1:
        return t.reshape(1).expand(m).contiguous()
    if tuple(t.shape) in (tuple(lead_shape), (m,)):
        return t.reshape(m).contiguous()
    raise ValueError(f"{name} must be a scalar (per-tensor) or have shape {tuple(lead_shape)} "
                     f"(one per row of x_q), got shape {tuple(t.shape)}")


def _per_channel(name, t, n):
    if t.numel() == 1:
        return t.reshape(1).expand(n).contiguous()
    if tuple(t.shape) == (n,):
        return t.contiguous()
    raise ValueError(f"{name} must be a scalar or have shape ({n},) (one per output channel), "
                     f"got shape {tuple(t.shape)}")


def _check_activation(x_q, x_zero):
    """int8 or uint8 activations; uint8 ones are shifted to int8 (exact, zero point too)."""
    if x_q.dtype == torch.uint8:
        # v - 128 for v in 0..255 is v with its top bit flipped, read as int8: one pass
        return (x_q ^ 128).view(torch.int8), x_zero - 128
    return x_q, x_zero


def _out_dtype(out_dtype):
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


def _bias(bias, n, device):
    if bias is None:
        return None
    _checks.check_float_tensor("bias", bias, (torch.float32, torch.float64, torch.float16,
                                              torch.bfloat16))
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return bias.to(device=device, dtype=torch.float32).contiguous()


def quantized_linear(x_q: Tensor, x_scale, x_zero, w_q: Tensor, w_scale, bias=None,
                     relu: bool = False, out_dtype: torch.dtype = torch.float32,
                     w_rowsum: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Integer linear layer with a fused dequantizing epilogue:

        out[..., n] = x_scale * w_scale[n] * ((x_q - x_zero) @ w_q.T)[..., n] + bias[n]

    then ReLU (relu=True) and the cast to out_dtype, all in the kernel's epilogue. The
    zero-point term is x_zero * rowsum(w_q)[n], from precomputed row sums (w_rowsum, see
    `weight_row_sums`; computed here when None).

    Args:
        x_q: (..., K) int8 or uint8 activations.
        x_scale, x_zero: per-tensor (numbers or one-element tensors) or per-row (shape
            x_q.shape[:-1]); x_zero integer and within x_q's dtype range.
        w_q: (N, K) int8, or packed signed int4 (uint8, (N, ceil(K/2)), see `pack_int4`).
        w_scale: scalar or (N,), positive.
        bias: None or (N,) float.
        out_dtype: float32, float16 or bfloat16.
    Returns (..., N) of out_dtype.
    """
    _check_tensor("x_q", x_q, (torch.int8, torch.uint8))
    _check_tensor("w_q", w_q, (torch.int8, torch.uint8), 2)
    if x_q.dim() < 1:
        raise ValueError("x_q must have at least one dim (..., K)")
    _checks.check_same_device(x_q=x_q, w_q=w_q)
    _out_dtype(out_dtype)
    dev = x_q.device
    k = x_q.shape[-1]
    n = w_q.shape[0]
    w_packed = w_q.dtype == torch.uint8
    want = _packed_len(k) if w_packed else k
    if w_q.shape[1] != want:
        form = "packed int4 (N, ceil(K/2))" if w_packed else "int8 (N, K)"
        raise ValueError(f"K mismatch: x_q has K = {k} but w_q {form} has shape "
                         f"{tuple(w_q.shape)} (expected {want} columns)")
    _check_k(k)
    lead = x_q.shape[:-1]
    m = math.prod(lead)
    x2 = x_q.reshape(m, k)      # explicit m: reshape(-1, 0) is ambiguous when K = 0
    xs = _per_row("x_scale", _float_param("x_scale", x_scale, dev), lead, m)
    xz = _per_row("x_zero", _int_param("x_zero", x_zero, dev), lead, m)
    x2, xz = _check_activation(x2, xz)
    ws = _per_channel("w_scale", _float_param("w_scale", w_scale, dev), n)
    b = _bias(bias, n, dev)
    if w_rowsum is None:
        w_rowsum = weight_row_sums(w_q, k)
    elif tuple(w_rowsum.shape) != (n,):
        raise ValueError(f"w_rowsum must have shape ({n},), got {tuple(w_rowsum.shape)}")
    w_rowsum = w_rowsum.to(device=dev, dtype=torch.int32).contiguous()
    be = _resolve_gemm("quantized_linear", dev, backend, m, w_packed)
    args = (x2.contiguous(), xs, xz, w_q.contiguous(), ws, w_rowsum, b, bool(relu), out_dtype,
            w_packed, be)
    run = _linear_body if _direct_ok(x_q, xs, xz, w_q, ws, b, w_rowsum) else \
        torch.ops.synq.quantized_linear
    return run(*args).reshape(*lead, n)


def _conv_geometry(stride, padding, dilation):
    """stride, padding, dilation as [h, w] lists, checked (stride, dilation >= 1, padding >= 0)."""
    stride, padding, dilation = (_pair("stride", stride), _pair("padding", padding),
                                 _pair("dilation", dilation))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    return stride, padding, dilation


def _check_groups(groups):
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")


def _pair(name, v):
    if type(v) is int:  # the common case, first
        return [v, v]
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return [int(v[0]), int(v[1])]


# the backends whose quantized_conv2d reads w_rowsum (the others subtract x_zero first)
_ROWSUM_BACKENDS = ("cuda", "triton")


def quantized_conv2d(x_q: Tensor, x_scale, x_zero, w_q: Tensor, w_scale, bias=None,
                     stride=1, padding=0, dilation=1, groups: int = 1, relu: bool = False,
                     out_dtype: torch.dtype = torch.float32, w_rowsum: Tensor | None = None,
                     backend: str | None = None) -> Tensor:
    """Integer conv2d with a fused dequantizing epilogue: the convolution of the real input
    x_scale (x_q - x_zero) (zero padding in the real domain, i.e. x_q padded with x_zero) with
    the weight w_scale[n] w_q[n], + bias, ReLU, cast to out_dtype.

    Args:
        x_q: (B, C, H, W) int8 or uint8, NCHW or channels-last (the output keeps the format).
        x_scale, x_zero: per-tensor (numbers or one-element tensors).
        w_q: (Cout, C / groups, kh, kw) int8. groups must divide C and Cout; groups = C is
            depthwise.
        w_scale: scalar or (Cout,); bias None or (Cout,).
        stride, padding, dilation: int or pair (padding >= 0, the others >= 1).
        w_rowsum: optional (Cout,) `weight_row_sums(w_q)`, precomputed once per layer; it must
            be exactly that (some backends use it for the zero-point correction, others
            recompute it), computed here when None.
    Returns (B, Cout, OH, OW) of out_dtype.
    """
    _check_tensor("x_q", x_q, (torch.int8, torch.uint8), 4)
    if w_q.dtype == torch.uint8:
        raise TypeError("w_q of quantized_conv2d must be int8 (packed int4 conv weights are "
                        "not supported)")
    _check_tensor("w_q", w_q, (torch.int8,), 4)
    _checks.check_same_device(x_q=x_q, w_q=w_q)
    _out_dtype(out_dtype)
    stride, padding, dilation = _conv_geometry(stride, padding, dilation)
    _check_groups(groups)
    c, cout = x_q.shape[1], w_q.shape[0]
    if c % groups or cout % groups:
        raise ValueError(f"groups = {groups} must divide the input channels ({c}) and the "
                         f"output channels ({cout})")
    if w_q.shape[1] != c // groups:
        raise ValueError(f"w_q has shape {tuple(w_q.shape)}: expected {c // groups} input "
                         f"channels per group (C = {c}, groups = {groups})")
    kh, kw = w_q.shape[2:]
    oh = conv_out_size(x_q.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(x_q.shape[3], kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"the kernel ({kh}x{kw}, dilation {dilation}) does not fit the padded "
                         f"input {tuple(x_q.shape[2:])} with padding {padding}")
    _check_k(w_q[0].numel())
    dev = x_q.device
    xs = _float_param("x_scale", x_scale, dev)
    xz = _int_param("x_zero", x_zero, dev)
    if xs.numel() != 1 or xz.numel() != 1:
        raise ValueError(f"x_scale and x_zero of quantized_conv2d must be per-tensor (one "
                         f"element), got shapes {tuple(xs.shape)} and {tuple(xz.shape)}")
    xs, xz = xs.reshape(()), xz.reshape(())
    x_q, xz = _check_activation(x_q, xz)
    ws = _per_channel("w_scale", _float_param("w_scale", w_scale, dev), cout)
    b = _bias(bias, cout, dev)
    be = _resolve("quantized_conv2d", dev, backend)
    if w_rowsum is None:
        # skip the per-call reduction where the backend does not read it
        w_rowsum = (weight_row_sums(w_q) if be in _ROWSUM_BACKENDS
                    else torch.zeros(cout, dtype=torch.int32, device=dev))
    elif tuple(w_rowsum.shape) != (cout,):
        raise ValueError(f"w_rowsum must have shape ({cout},), got {tuple(w_rowsum.shape)}")
    w_rowsum = w_rowsum.to(device=dev, dtype=torch.int32).contiguous()
    args = (x_q, xs, xz, w_q.contiguous(), ws, w_rowsum, b, stride, padding, dilation, groups,
            bool(relu), out_dtype, be)
    if _direct_ok(x_q, xs, xz, w_q, ws, b, w_rowsum):
        return _conv2d_body(*args)
    return torch.ops.synq.quantized_conv2d(*args)


# -- packed-weight convolution: the fast CPU path of an exported integer model ------------------
#
# `prepack_conv2d_weight` once per layer, then `quantized_conv2d_packed` per call. Its kernel
# is the compiled op torch.ops.synq._quantized_conv2d_packed itself (no Python custom-op layer
# in between, so the per-call cost is the dispatcher's); a hot loop that has already checked
# its arguments may call that op directly with the tensors this wrapper would build (as
# synq.deploy does). Without `_C`, or with backend="reference", the reference computes
# the same thing in the same float32 order.

_HAS_PACKED = []  # (not functools.cache: torch.compile warns on a cached function it traces)


def _has_packed_kernel():
    if not _HAS_PACKED:  # fixed for the process: asked once
        from .. import _ext
        _HAS_PACKED.append(_ext.has_cpu_kernels())
    return _HAS_PACKED[0]


if _has_packed_kernel():
    @torch.library.register_fake("synq::_conv2d_prepack")
    def _(w, groups):
        cout, cg, kh, kw = w.shape
        if R.is_depthwise(groups, cout, cg):
            return w.new_empty((groups, 1, kh, kw, 1, 1), dtype=torch.int8)
        nb = -(-(cout // groups) // R.CONV_PACK_BLOCK)
        cq = -(-cg // R.CONV_PACK_QUAD)
        return w.new_empty((groups, nb, kh, kw, cq, R.CONV_PACK_QUAD * R.CONV_PACK_BLOCK),
                           dtype=torch.int8)

    @torch.library.register_fake("synq::_quantized_linear")
    def _(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu, out_dtype, w_packed):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("synq::_quantized_conv2d_packed")
    def _(x, x_scale, x_zero, w_packed, w_scale, bias, stride, padding, dilation, groups, relu,
          out_dtype, out_scale, out_zero, residual, residual_scale, residual_zero,
          out_max=None, w_offset=None, hardswish=False):
        kh, kw = w_packed.shape[2], w_packed.shape[3]
        oh = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
        ow = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
        out = x.new_empty((x.shape[0], w_scale.shape[0], oh, ow), dtype=out_dtype)
        return out.contiguous(memory_format=torch.channels_last)


def _packed_backend(device, backend):
    if backend is None:
        return "cpu" if device.type == "cpu" and _has_packed_kernel() else "reference"
    if backend not in ("cpu", "reference"):
        raise ValueError(f"backend of the packed conv must be 'cpu' or 'reference', got "
                         f"{backend!r}")
    if backend == "cpu":
        from .. import backends as _b
        why = _b.unavailable_reason("cpu", device.type)
        if why:
            raise RuntimeError(f"backend 'cpu' is unavailable: {why}")
    return backend


def prepack_conv2d_weight(w_q: Tensor, groups: int = 1, backend: str | None = None) -> Tensor:
    """Pack an int8 conv weight (Cout, C / groups, kh, kw) once for `quantized_conv2d_packed`:
    int8 (groups, ceil(Cout / groups / 16), kh, kw, ceil(C / groups / 4), 64), 16 output
    channels per block, input channels in quads; a depthwise weight (groups = Cout > 1, one
    input channel per group) as (groups, 1, kh, kw, 1, 1), one byte per channel and tap
    (see reference `conv2d_prepack`)."""
    _check_tensor("w_q", w_q, (torch.int8,), 4)
    _check_groups(groups)
    if w_q.shape[0] % groups:
        raise ValueError(f"groups = {groups} must divide the output channels ({w_q.shape[0]})")
    if _packed_backend(w_q.device, backend) == "cpu":
        return torch.ops.synq._conv2d_prepack(w_q, groups)
    return R.conv2d_prepack(w_q, groups)


def quantized_conv2d_packed(x_q: Tensor, x_scale, x_zero, w_packed: Tensor, w_scale,
                            bias=None, stride=1, padding=0, dilation=1, groups: int = 1,
                            relu: bool = False, out_dtype: torch.dtype = torch.float32,
                            out_scale=None, out_zero=None, residual: Tensor | None = None,
                            residual_scale=None, residual_zero=None,
                            out_max: int | None = None, w_offset: Tensor | None = None,
                            hardswish: bool = False, backend: str | None = None) -> Tensor:
    """Integer conv2d on a prepacked weight, with a fused epilogue; output channels-last.

        y = x_scale w_scale[n] conv2d(x_q - x_zero, w_q)[n] + bias[n]
            (+ residual, or + residual_scale (residual - residual_zero) for an int residual)
        y = ReLU(y) if relu, Hardswish(y) if hardswish (F.hardswish's float32 steps)
        out = y as out_dtype (float32 / float16 / bfloat16), or requantized for int8 / uint8:
              clamp(round(y / out_scale) + out_zero, lowest, out_max)   (exact float32
              order: reference `quantized_conv2d_packed`; / out_scale is
              * float32(1 / out_scale))

    Args:
        x_q: (B, C, H, W) int8 or uint8, any strides (channels-last is the fast layout);
            x_zero in x_q's own range (0..255 for uint8).
        x_scale, x_zero: per-tensor numbers or one-element tensors.
        w_packed: from `prepack_conv2d_weight(w_q, groups)`.
        w_scale: a (Cout,) tensor (Cout is its length).
        bias: None or (Cout,).
        out_scale, out_zero: per-tensor, required exactly when out_dtype is int8 / uint8.
        out_max: None (the dtype's highest value) or a lower top for an int8 / uint8 output,
            for grids narrower than 8 bits (a 4-bit grid shifted into int8 ends at -113).
        residual: None or the output's shape (B, Cout, OH, OW), float32 or int8 / uint8 with
            residual_scale / residual_zero (per-tensor); added before the ReLU.
        w_offset: None or (Cout,) integers o for weights packed as w_q - o (rows whose
            integers do not fit int8): the conv is taken with w_q, o[n] times each window's
            sum of x_q - x_zero added in int32. The cpu backend takes |o| <= 32639 (some of
            its kernels fold o into int16 weights); 8-bit rows need at most 255.
    """
    _check_tensor("x_q", x_q, (torch.int8, torch.uint8), 4)
    _check_tensor("w_packed", w_packed, (torch.int8,), 6)
    if relu and hardswish:
        raise ValueError("relu and hardswish cannot both be set")
    _checks.check_same_device(x_q=x_q, w_packed=w_packed)
    if out_dtype not in OUT_DTYPES + (torch.int8, torch.uint8):
        raise TypeError(f"out_dtype must be float32, float16, bfloat16, int8 or uint8, got "
                        f"{out_dtype}")
    stride, padding, dilation = _conv_geometry(stride, padding, dilation)
    _check_groups(groups)
    dev = x_q.device
    if not isinstance(w_scale, torch.Tensor) or w_scale.dim() != 1:
        raise ValueError("w_scale of quantized_conv2d_packed must be a 1-D (Cout,) tensor "
                         "(the packed weight does not record Cout)")
    cout = w_scale.shape[0]
    c = x_q.shape[1]
    g_, nb, kh, kw, cq, blk = w_packed.shape
    if (c % groups or cout % groups or g_ != groups
            or blk not in (R.CONV_PACK_QUAD * R.CONV_PACK_BLOCK, 1)
            or blk == 1 and not R.is_depthwise(groups, cout, c // groups)
            or cq != -(-(c // groups) // R.CONV_PACK_QUAD)
            or nb != -(-(cout // groups) // R.CONV_PACK_BLOCK)):
        raise ValueError(f"w_packed {tuple(w_packed.shape)} does not fit x_q with C = {c}, "
                         f"groups = {groups} and Cout = {cout} (w_scale's length)")
    oh = conv_out_size(x_q.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(x_q.shape[3], kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"the kernel ({kh}x{kw}, dilation {dilation}) does not fit the padded "
                         f"input {tuple(x_q.shape[2:])} with padding {padding}")
    _check_k(kh * kw * (c // groups))
    xs = _float_param("x_scale", x_scale, dev).reshape(-1)
    xz = _int_param("x_zero", x_zero, dev).reshape(-1)
    if xs.numel() != 1 or xz.numel() != 1:
        raise ValueError("x_scale and x_zero must be per-tensor (one element)")
    lo, hi = (0, 255) if x_q.dtype == torch.uint8 else (-128, 127)
    ws = _float_param("w_scale", w_scale, dev).contiguous()
    # Data-dependent checks only in eager mode (the kernel checks the zero points itself).
    checks = not torch.compiler.is_compiling() and _checks.value_checks_enabled(xz)
    if checks:
        _checks.check_positive_finite("x_scale", xs)
        _checks.check_positive_finite("w_scale", ws)
        if not lo <= int(xz[0]) <= hi:
            raise ValueError(f"x_zero must be within x_q's range ({lo}..{hi}), got "
                             f"{int(xz[0])}")
    b = _bias(bias, cout, dev)
    quant = out_dtype in (torch.int8, torch.uint8)
    if quant != (out_scale is not None and out_zero is not None) or (
            (out_scale is None) != (out_zero is None)):
        raise ValueError("out_scale and out_zero are needed exactly when out_dtype is int8 or "
                         "uint8")
    os_ = oz = None
    if quant:
        os_ = _float_param("out_scale", out_scale, dev).reshape(-1)
        oz = _int_param("out_zero", out_zero, dev).reshape(-1)
        if os_.numel() != 1 or oz.numel() != 1:
            raise ValueError("out_scale and out_zero must be per-tensor (one element)")
        if checks:
            _checks.check_positive_finite("out_scale", os_)
    if out_max is not None:
        if not quant:
            raise ValueError("out_max applies to an int8 / uint8 output only")
        qlo, qhi = (-128, 127) if out_dtype == torch.int8 else (0, 255)
        out_max = _checks.check_int_range("out_max", out_max, qlo, qhi)
    rs = rz = None
    if residual is not None:
        _check_tensor("residual", residual, (torch.float32, torch.int8, torch.uint8), 4)
        want = (x_q.shape[0], cout, oh, ow)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have the output's shape {want}, got "
                             f"{tuple(residual.shape)}")
        if residual.dtype != torch.float32:
            if residual_scale is None or residual_zero is None:
                raise ValueError("an int8 / uint8 residual needs residual_scale and "
                                 "residual_zero")
            rs = _float_param("residual_scale", residual_scale, dev).reshape(-1)
            rz = _int_param("residual_zero", residual_zero, dev).reshape(-1)
            if rs.numel() != 1 or rz.numel() != 1:
                raise ValueError("residual_scale and residual_zero must be per-tensor")
        elif residual_scale is not None or residual_zero is not None:
            raise ValueError("residual_scale / residual_zero apply to an int8 / uint8 "
                             "residual only")
    elif residual_scale is not None or residual_zero is not None:
        raise ValueError("residual_scale / residual_zero given without a residual")
    wo = None
    if w_offset is not None:
        if not isinstance(w_offset, torch.Tensor) or tuple(w_offset.shape) != (cout,):
            raise ValueError(f"w_offset must be a ({cout},) integer tensor")
        _check_tensor("w_offset", w_offset, (torch.int8, torch.int16, torch.int32,
                                             torch.int64))
        wo = w_offset.to(device=dev, dtype=torch.int32).contiguous()
    args = (x_q, xs, xz, w_packed, ws, b, stride, padding, dilation, groups, bool(relu),
            out_dtype, os_, oz, residual, rs, rz, out_max, wo, bool(hardswish))
    if _packed_backend(dev, backend) == "cpu":
        return torch.ops.synq._quantized_conv2d_packed(*args)
    return R.quantized_conv2d_packed(*args)
