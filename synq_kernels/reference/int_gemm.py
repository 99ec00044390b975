"""Reference integer GEMM and convolution in plain PyTorch, exact on any device.

Integer products are computed in float64, which holds every partial sum exactly while it
stays below 2^53 (int8 x int8 products are at most 2^14 in magnitude, so any K below 2^39),
then converted to int32: bit-exact, and float64 matmul / conv2d exist on every device, unlike
integer matmul. The float epilogues (scales, zero-point correction, bias, ReLU) are computed
in float64 and rounded once to the output dtype.

int4 layout (`pack_int4`): two 4-bit values per byte along the last dim, element 2i in the
low nibble and element 2i+1 in the high nibble of byte i, each as its two's-complement
(signed, -8..7) or plain (unsigned, 0..15) 4-bit pattern; an odd last dim is padded with a
zero nibble.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def int4_range(signed: bool) -> tuple[int, int]:
    return (-8, 7) if signed else (0, 15)


def pack_int4(q: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Pack 4-bit integers (any integer dtype, values in int4_range(signed)) two per byte
    along the last dim; returns uint8 of shape (..., ceil(n / 2)). No range check here (the
    public `synq_kernels.pack_int4` checks)."""
    n = q.shape[-1]
    v = q.to(torch.int16) & 0xF
    if n % 2:
        v = F.pad(v, (0, 1))
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 2, 2)  # not -1: ambiguous with 0 rows
    return (v[..., 0] | (v[..., 1] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor, signed: bool = True, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 of shape (..., n), n = 2 * p.shape[-1] by default."""
    v = p.to(torch.int16)
    out = torch.stack((v & 0xF, (v >> 4) & 0xF), dim=-1).reshape(*p.shape[:-1], -1)
    if signed:
        out = out - ((out & 0x8) << 1)
    if n is not None:
        out = out[..., :n]
    return out.to(torch.int8)


def _exact_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (N, K).T of integer tensors, as int32 (exact via float64)."""
    return (a.to(torch.float64) @ b.to(torch.float64).T).round().to(torch.int32)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (N, K) int8 .T -> int32 (M, N)."""
    return _exact_mm(a, b)


def int_mm(a, b, k: int, a_packed: bool, a_signed: bool, b_packed: bool) -> torch.Tensor:
    """The backend form: a (M, K or ceil(K/2) packed), b (N, K or ceil(K/2) packed, signed)."""
    a = unpack_int4(a, a_signed, k) if a_packed else a
    b = unpack_int4(b, True, k) if b_packed else b
    return _exact_mm(a, b)


def int4_matmul(a, b, k: int | None = None, a_signed: bool = True) -> torch.Tensor:
    """a packed int4 (M, ceil(K/2)) or int8 (M, K); b packed signed int4 (N, ceil(K/2))."""
    a_packed = a.dtype == torch.uint8
    if k is None:
        k = a.shape[-1] * (2 if a_packed else 1)
    return int_mm(a, b, k, a_packed, a_signed, True)


def _epilogue(acc: torch.Tensor, x_scale, x_zero, w_rowsum, w_scale, bias, relu, out_dtype,
              channel_dim: int) -> torch.Tensor:
    """acc: exact integer products (float64) with the channel along `channel_dim`."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    v = acc - x_zero * w_rowsum.to(torch.float64).reshape(shape)
    y = v * x_scale * w_scale.to(torch.float64).reshape(shape)
    if bias is not None:
        y = y + bias.to(torch.float64).reshape(shape)
    if relu:
        y = y.clamp_min(0)
    return y.to(out_dtype)


def quantized_linear(x_q, x_scale, x_zero, w_q, w_scale, bias=None, relu=False,
                     out_dtype=torch.float32, w_packed: bool = False) -> torch.Tensor:
    """out[m, n] = x_scale[m] w_scale[n] ((x_q[m] - x_zero[m]) . w_q[n]) + bias[n] on 2-D x_q
    (M, K); x_scale / x_zero of shape (M,) (float / integer), w_scale (N,), w_q int8 (N, K)
    or packed signed int4 (N, ceil(K/2)) when w_packed. Computed in float64."""
    k = x_q.shape[-1]
    w = unpack_int4(w_q, True, k) if w_packed else w_q
    acc = x_q.to(torch.float64) @ w.to(torch.float64).T
    rs = w.to(torch.float64).sum(1)
    xs = x_scale.to(torch.float64).reshape(-1, 1)
    xz = x_zero.to(torch.float64).reshape(-1, 1)
    return _epilogue(acc, xs, xz, rs, w_scale, bias, relu, out_dtype, 1)


def conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output format of the ops that keep a channels-last layout (the convs, fake_quant,
    channel_stats' backward): channels-last for an input that is channels-last and not also
    plain contiguous, else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def quantized_conv2d(x_q, x_scale, x_zero, w_q, w_scale, bias=None, stride=(1, 1),
                     padding=(0, 0), dilation=(1, 1), groups=1, relu=False,
                     out_dtype=torch.float32) -> torch.Tensor:
    """Convolution of the real input x_scale (x_q - x_zero) (zero padding in the real
    domain) with the weight w_scale[n] w_q[n]: x_q (B, C, H, W) integer, per-tensor x_scale
    and x_zero (0-dim tensors), w_q int8 (Cout, C / groups, kh, kw), w_scale (Cout,).
    Exact integer products in float64, float64 epilogue; the output keeps x_q's memory
    format."""
    xc = x_q.to(torch.float64) - x_zero.to(torch.float64)
    acc = F.conv2d(xc, w_q.to(torch.float64), None, stride, padding, dilation, groups)
    zero = torch.zeros((), dtype=torch.float64, device=x_q.device)
    rs = torch.zeros(w_q.shape[0], dtype=torch.float64, device=x_q.device)
    y = _epilogue(acc, x_scale.to(torch.float64), zero, rs, w_scale, bias, relu, out_dtype, 1)
    return y.contiguous(memory_format=conv_memory_format(x_q))


def quantized_conv2d_int(x_q, x_zero, w_q, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         groups=1) -> torch.Tensor:
    """The int32 accumulator of quantized_conv2d: conv2d(x_q - x_zero, w_q), zero padded."""
    xc = x_q.to(torch.float64) - float(x_zero)
    acc = F.conv2d(xc, w_q.to(torch.float64), None, stride, padding, dilation, groups)
    return acc.round().to(torch.int32)


# -- packed-weight convolution (the CPU kernel's weight layout, int8 / requantized output) ----

CONV_PACK_BLOCK = 16  # output channels per block of the packed layout
CONV_PACK_QUAD = 4    # input channels per quad (the last dim is 16 channels x 4)


def is_depthwise(groups: int, cout: int, cg: int) -> bool:
    """Whether a conv of these sizes packs in the compact depthwise layout."""
    return groups > 1 and cout == groups and cg == 1


def conv2d_prepack(w_q: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """w_q (Cout, Cg, kh, kw) int8 -> int8 (groups, NB, kh, kw, ceil(Cg / 4), 64) with
    NB = ceil(Cout / groups / 16): element [g, b, ky, kx, j, 4 n + e] is
    w_q[g Og + 16 b + n, 4 j + e, ky, kx], zero past Og = Cout / groups or Cg.

    A depthwise weight (groups = Cout > 1, Cg = 1) packs compactly as (groups, 1, kh, kw, 1,
    1): the same indexing, without the 63 zero bytes of each 64 (element [g, 0, ky, kx, 0, 0]
    is w_q[g, 0, ky, kx])."""
    if w_q.dtype != torch.int8:
        raise TypeError(f"conv2d_prepack takes int8 weights, got {w_q.dtype}")
    cout, cg, kh, kw = w_q.shape
    if is_depthwise(groups, cout, cg):
        return w_q.reshape(groups, 1, kh, kw, 1, 1).clone()  # a copy, as the cpu op's
    og = cout // groups
    nb = -(-og // CONV_PACK_BLOCK)
    cq = -(-cg // CONV_PACK_QUAD)
    cp = cq * CONV_PACK_QUAD
    w = torch.zeros(groups, nb * CONV_PACK_BLOCK, cp, kh, kw, dtype=torch.int8,
                    device=w_q.device)
    w[:, :og, :cg] = w_q.reshape(groups, og, cg, kh, kw)
    w = w.reshape(groups, nb, CONV_PACK_BLOCK, cq, CONV_PACK_QUAD, kh, kw)
    return w.permute(0, 1, 5, 6, 3, 2, 4).reshape(
        groups, nb, kh, kw, cq, CONV_PACK_QUAD * CONV_PACK_BLOCK).contiguous()


def conv2d_unpack(w_packed: torch.Tensor, cout: int, cg: int) -> torch.Tensor:
    """Inverse of `conv2d_prepack`: int8 (cout, cg, kh, kw)."""
    groups, nb, kh, kw, cq, row = w_packed.shape
    if row == 1:  # the compact depthwise layout
        if not is_depthwise(groups, cout, cg) or nb != 1 or cq != 1:
            raise ValueError(f"a packed weight in the compact depthwise layout "
                             f"{tuple(w_packed.shape)} needs groups = Cout and one input "
                             f"channel per group, got Cout = {cout}, C / groups = {cg}")
        return w_packed.reshape(cout, 1, kh, kw).to(torch.int8)
    w = w_packed.reshape(groups, nb, kh, kw, cq, CONV_PACK_BLOCK, CONV_PACK_QUAD)
    w = w.permute(0, 1, 5, 4, 6, 2, 3).reshape(groups, nb * CONV_PACK_BLOCK,
                                               CONV_PACK_QUAD * cq, kh, kw)
    return w[:, :cout // groups, :cg].reshape(cout, cg, kh, kw).to(torch.int8)


def quantized_conv2d_packed(x_q, x_scale, x_zero, w_packed, w_scale, bias=None,
                            stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                            relu=False, out_dtype=torch.float32, out_scale=None, out_zero=None,
                            residual=None, residual_scale=None,
                            residual_zero=None, out_max=None, w_offset=None,
                            hardswish=False) -> torch.Tensor:
    """The packed-weight conv, computed in the kernel's float32 operation order so that
    int8 / uint8 outputs are bit-exact:

        acc = conv2d(x_q - x_zero, w) exactly (zero padding in that domain), with
              w = the unpacked weight + w_offset[n] when given
        y = float32(acc) * (x_scale * w_scale[n]) + bias[n]      (float32, mul then add)
        y = y + residual   or   y + float32(residual - residual_zero) * residual_scale
        y = max(y, 0) if relu, or y * min(max(y + 3, 0), 6) / 6 if hardswish (F.hardswish's
              float32 steps)
        out = y.to(out_dtype), or for int8 / uint8:
            clamp(round_half_even(min(max(y * (1 / out_scale), qmin - z), qmax - z)) + z)
              with z = out_zero, 1 / out_scale a float32 division, qmax = out_max if given
              (else the dtype's highest value)

    x_q (B, C, H, W) int8 or uint8 with x_zero in its own range; one-element x_scale (float)
    and x_zero (integer); w_scale (Cout,) float32 (Cout from its length). Returns a
    channels-last (B, Cout, OH, OW) tensor."""
    cout = w_scale.shape[0]
    cg = x_q.shape[1] // groups
    w = conv2d_unpack(w_packed, cout, cg).to(torch.float64)
    if w_offset is not None:
        w = w + w_offset.to(torch.float64).reshape(-1, 1, 1, 1)
    xc = x_q.to(torch.float64) - x_zero.to(torch.float64).reshape(())
    acc = F.conv2d(xc, w, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    acc = acc.round().to(torch.int32).to(torch.float32)
    sc = (x_scale.to(torch.float32).reshape(()) * w_scale.to(torch.float32)).reshape(1, -1, 1, 1)
    y = acc * sc
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(1, -1, 1, 1)
    if residual is not None:
        if residual.dtype == torch.float32:
            y = y + residual
        else:
            r = (residual.to(torch.int32) - residual_zero.to(torch.int32).reshape(()))
            y = y + r.to(torch.float32) * residual_scale.to(torch.float32).reshape(())
    if relu and hardswish:
        raise ValueError("relu and hardswish cannot both be set")
    if relu:
        y = y.clamp_min(0)
    elif hardswish:
        y = y * (y + 3.0).clamp(0.0, 6.0) / 6.0
    if out_dtype in (torch.int8, torch.uint8):
        qmin, qmax = (-128, 127) if out_dtype == torch.int8 else (0, 255)
        if out_max is not None:
            qmax = int(out_max)
        z = int(out_zero.reshape(()))
        inv = torch.ones((), dtype=torch.float32) / out_scale.to(torch.float32).reshape(())
        t = (y * inv).clamp(qmin - z, qmax - z)
        out = (t.round().to(torch.int32) + z).to(out_dtype)
    else:
        out = y.to(out_dtype)
    return out.contiguous(memory_format=torch.channels_last)


__all__ = ["int4_range", "pack_int4", "unpack_int4", "int8_matmul", "int4_matmul", "int_mm",
           "quantized_linear", "quantized_conv2d", "quantized_conv2d_int", "conv_memory_format",
           "conv2d_prepack", "conv2d_unpack", "quantized_conv2d_packed", "is_depthwise"]
