"""Integer export: a fake-quantized model (from `synq.quant.quantize_model`) turned into one that
runs its convolutions and linear layers on integer tensors through
`synq_kernels.quantized_conv2d` / `quantized_linear`.

What `export` does to each part of the model:

- QuantConv2d / QuantLinear -> IntConv2d / IntLinear: the fake-quantized weight
  `(q - z) * s` is stored as its integers `q - z` and the per-channel scales `s`; a BatchNorm2d
  that directly follows a conv is folded into the scales and a float bias (a negative BN
  weight flips the sign of that channel's integers, so scales stay positive). Any other
  BatchNorm2d (after a concatenation or an addition, as in DenseNet and pre-activation
  ResNets, or after a conv whose output something else reads too) runs in float
  (FloatBatchNorm2d), in eval mode; in fused mode, where a ReLU / Hardswish quantizer is
  its output's only reader, as `x * mul + add` in that quantizer's pass.
- Weight storage by bit-width: 5-8 bits as int8; 2-4 bits as packed int4
  (`synq_kernels.pack_int4`; a conv weight is packed per output channel along its flattened
  (C / groups) * kh * kw in PyTorch's order, shape (Cout, ceil(K / 2))). The paper's
  asymmetric weight grid has integers `q - z` in [qmin - z, qmax - z], which need not fit the
  signed 4-bit range, so a row that does not fit is stored as `q - 8` (always in [-8, 7]) and
  its offset `8 - z` is added back from the row sums of the input: `sum_k (x_k - x_zero) (w_k
  + o) = acc + o * sum_k (x_k - x_zero)`. Linear layers compute on the packed weight
  (`quantized_linear` unpacks it in the kernel), except that on the CPU rows with an offset
  are unpacked once with the offset added back (it fits int8), which skips the offset term;
  the conv kernels take int8 or their own
  prepacked layout, so a packed conv weight is unpacked once per device on first use (a
  cache that is not saved): int4 conv storage halves the file and the state dict, not the
  working memory.
- Inputs of a layer: where the input is the output of an activation quantizer (the usual
  case: every ReLU / ReLU6 / Hardswish / SiLU of a quantized model), directly or through
  max-pools (max keeps
  the grid), the layer quantizes it to int8 with that quantizer's scale and zero point (the
  values already lie on its grid, so this is exact).
  Other inputs (the image at the first conv, the average-pooled features at the classifier,
  a MobileNetV2 linear bottleneck) are float in the fake-quantized model; they are quantized
  to 8 bits at run time from their own range: per tensor for a convolution (so the result
  of such a layer depends slightly on the other images of the batch; pass `input_range` to
  `export` to fix the first layer's range), per row for a linear layer.
- QuantAct -> IntAct: ReLU (skipped when the conv before it already applied it in its
  epilogue), ReLU6, or Hardswish / SiLU in float (in fused mode Hardswish in the conv
  epilogue where a conv feeds it), and the frozen fake quantization, so
  residual additions see exactly the values of the fake-quantized model. Squeeze-and-
  excitation gates (Sigmoid, Hardsigmoid) and their products stay float.
- Fused mode (default where the traced structure allows it, checked on the example): a conv
  followed by its ReLU / ReLU6 / Hardswish quantizer, or by a residual Add and such a
  quantizer, runs as one call of the CPU's prepacked conv whose epilogue adds the residual,
  applies the activation and requantizes to the quantizer's grid; the int8 result goes to the next conv as is (through
  a max-pool too: IntMaxPool2d). On a GPU the same epilogue is Triton's
  (synq_kernels/triton/conv_tap.py) for convs with more than one input channel per group;
  elsewhere the steps run as the float path plus PyTorch ops. On the CPU path rows
  stored with an offset are packed with the offset added back (it fits int8, as below) and
  skip the offset term.

Logits of the exported model agree with the fake-quantized model's up to float rounding
(the BN fold, the int32 accumulation order) and the 8-bit quantization of the inputs named
above; see tests/test_deploy.py for the measured bound.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import synq_kernels as sk
from . import cuda_graphs, quant, replay
from .io import build_float_model, read_saved, write_saved
from .add_modules import added_names, with_add_modules
from .models.common import Add
from .versions import normal_tensors, version

__all__ = ["export", "IntModel", "IntConv2d", "IntLinear", "IntAct", "save_int", "load_int",
           "FORMAT"]

FORMAT = "synq-int-v1"

# Parameter-free modules that run in float in the exported model as they did before.
_PASSTHROUGH = (Add, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
                nn.modules.dropout._DropoutNd, nn.Identity, nn.Sequential, nn.ModuleList,
                nn.ModuleDict, nn.Sigmoid, nn.Hardsigmoid)  # (float: SE gates)
# Parameter-free layers, by class name, that are the identity in eval mode by convention
# (torchvision's StochasticDepth, timm's DropPath); the traced forward must confirm it.
_EVAL_IDENTITIES = ("StochasticDepth", "DropPath")
# IntAct's activations that run in float before quantizing (Hardswish: unless the conv before
# it applies it in its CPU epilogue, see _Pending)
_FLOAT_ACTIVATIONS = {"hardswish": F.hardswish, "silu": F.silu}


def _round_zero(zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer zero point fake_quant uses: round half to even, clamped to the grid."""
    return torch.clamp(torch.round(zero_point.detach().float()), qmin, qmax)


def _act_params(q: quant.ActQuantizer) -> tuple[float, int]:
    """(scale, integer zero point) of a frozen activation quantizer."""
    if q.learnable is not None:
        scale, zero_point = q.scale.detach().float(), q.zero_point.detach().float()
    else:
        scale, zero_point = quant._asym_params(q.running_min, q.running_max, q.qmin, q.qmax)
    return float(scale), int(_round_zero(zero_point, q.qmin, q.qmax))


@torch.no_grad()
def _weight_ints(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers q - z as int32, per-output-channel scale) of a QuantConv2d / QuantLinear, so
    that `ints * scale` equals its fake-quantized weight."""
    wq = layer.weight_quantizer
    w = layer.weight.detach().float()
    if wq.learnable is None:
        scale, zero_point = wq._minmax_params(w)
    else:
        scale = wq.scale.detach().float().reshape(-1)
        zero_point = wq.zero_point.detach().float().reshape(-1)
        if scale.numel() == 1:
            scale, zero_point = scale.expand(w.shape[0]), zero_point.expand(w.shape[0])
    z = _round_zero(zero_point, wq.qmin, wq.qmax)
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.reshape(view)) + z.reshape(view), wq.qmin, wq.qmax)
    return (q - z.reshape(view)).to(torch.int32), scale.float().clone()


def _quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int,
                     hi: int, hardswish: bool = False, relu: bool = False,
                     affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """int8 of x (times mul plus add per channel for affine = (mul, add), then Hardswish or
    ReLU if asked) on the grid (scale, zero) (zero in the int8 domain), clamped to [lo, hi].
    One pass where the PyTorch ops make four to eight over the float tensor: on a CPU
    synq_kernels' static quantization (the same bits, the rest fused in); on a GPU Triton's
    (synq_kernels.triton.quantize, the same values) after the rest in PyTorch ops."""
    if _triton_act(x) and _tri_quant.usable(x, scale, zero):
        if affine is not None:
            view = (1, -1) + (1,) * (x.dim() - 2)
            x = x * affine[0].reshape(view) + affine[1].reshape(view)
        x = F.hardswish(x) if hardswish else torch.relu(x) if relu else x
        return _tri_quant.quantize_static(x, scale, zero, lo, hi)
    return sk.ops.quantize.quantize_static(x, scale, zero, lo, hi,
                                           1 if hardswish else 2 if relu else 0,
                                           *(affine or (None, None)))


def _quantize_dynamic(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit asymmetric quantization of x over `dims` (range widened to hold 0): int8 values
    (shifted by -128), float32 scale and int32 zero point (int8 domain), both keepdim-reduced
    over `dims`."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not _triton_act(x):
        # on the CPU one kernel call, two passes, the same values: the whole tensor, or each
        # row of a linear layer's input (about 18 PyTorch ops otherwise)
        if len(dims) == x.dim():
            return sk.ops.quantize.quantize_dynamic(x, quant._EPS)
        if tuple(dims) == (1,) and x.dim() == 2 and x.numel() > 0:
            return sk.ops.quantize.quantize_dynamic_rows(x, quant._EPS)
    scale, zero = _dynamic_grid(x, dims)
    return _quantize_static(x.float(), scale, zero, -128, 127), scale, zero.to(torch.int32)


def _dynamic_grid(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """_quantize_dynamic's grid: float32 scale and float zero point (int8 domain)."""
    if len(dims) == x.dim():    # the whole tensor: both ends in one pass
        lo, hi = (t.reshape((1,) * x.dim()) for t in torch.aminmax(x))
    else:
        lo, hi = torch.amin(x, dim=dims, keepdim=True), torch.amax(x, dim=dims, keepdim=True)
    lo, hi = lo.float().clamp_(max=0.0), hi.float().clamp_(min=0.0)
    scale = ((hi - lo) / 255.0).clamp_(min=quant._EPS)
    zero = torch.round(-lo / scale).clamp_(0, 255) - 128.0
    return scale, zero


class _IntLayer(nn.Module):
    """Shared state of IntConv2d / IntLinear: integer weight, scales, bias, row sums, the
    input's grid (static) or None (dynamic), and the backend chosen on first use."""

    def __init__(self, name: str, weight: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor, w_rowsum: torch.Tensor, offset: torch.Tensor | None,
                 in_scale: float | None, in_zero: int | None, in_qmax: int, relu: bool,
                 wbits: int, k: int):
        super().__init__()
        self.name = name
        self.register_buffer("weight", weight)
        self.register_buffer("w_scale", w_scale.float().contiguous())
        self.register_buffer("bias", bias.float().contiguous())
        self.register_buffer("w_rowsum", w_rowsum.to(torch.int32).contiguous())
        # per-row offset of packed asymmetric weights (see the module docstring), else None
        self.register_buffer("offset", None if offset is None else offset.to(torch.int32))
        self.static = in_scale is not None
        if self.static:
            self.register_buffer("in_scale", torch.tensor(float(in_scale)))
            self.register_buffer("in_zero", torch.tensor(int(in_zero) - 128, dtype=torch.int32))
            self.in_hi = int(in_qmax) - 128
        self.relu = bool(relu)
        self.wbits = int(wbits)
        self.k = int(k)
        self.backend = None      # None: the fastest available (IntModel.set_backend)
        self._backend = None
        self._derived = (None, {})

    def _cached(self, name: str, build):
        """A value derived from the stored weight and offsets (unpacked, prepacked), built on
        first use and kept until those buffers are replaced (`.to()`, assignment) or changed
        in place (`load_state_dict`, an in-place op): they are compared by identity and
        version counter. Not saved."""
        w, o = self._buffers["weight"], self._buffers["offset"]
        key, cache = self._derived
        if torch.compiler.is_compiling():
            # no version counters while tracing: the value an eager call built is taken as it
            # is (a graph input); building it needs values (which int8 layout fits), so an
            # eager call must come first
            if name in cache and key[0] is w:
                return cache[name]
            raise RuntimeError("run the integer model once without torch.compile, on the "
                               "device it will run on, before compiling it: its first call "
                               "prepares the packed weights of each layer")
        if (key is None or key[0] is not w or key[1] != version(w) or key[2] is not o
                or (o is not None and key[3] != version(o))):
            cache = {}
            self._derived = ((w, version(w), o, None if o is None else version(o)), cache)
        if name not in cache:
            cache[name] = build()
        return cache[name]

    @property
    def packed(self) -> bool:
        return self.weight.dtype == torch.uint8

    def _backend_for(self, op: str, device) -> str:
        if self._backend is None or self._backend[0] != device:
            self._backend = (device, sk.backends.resolve(op, device, self.backend))
        return self._backend[1]


class IntConv2d(_IntLayer):
    """Integer Conv2d (+ folded BatchNorm, + fused ReLU): int8 input, int8 or packed int4
    weight (stored; computed as int8), int32 accumulation, float32 or requantized int8
    output."""

    def __init__(self, name, weight, w_scale, bias, w_rowsum, offset, in_scale, in_zero,
                 in_qmax, relu, wbits, stride, padding, dilation, groups, in_channels,
                 kernel_size):
        kernel_size = [int(k) for k in kernel_size]
        cg = int(in_channels) // int(groups)
        super().__init__(name, weight, w_scale, bias, w_rowsum, offset, in_scale, in_zero,
                         in_qmax, relu, wbits, cg * kernel_size[0] * kernel_size[1])
        self.stride, self.padding = list(stride), list(padding)
        self.dilation, self.groups = list(dilation), int(groups)
        self.kernel_size, self.in_channels = kernel_size, int(in_channels)
        want = ((weight.shape[0], (self.k + 1) // 2) if self.packed
                else (weight.shape[0], cg, *kernel_size))
        if tuple(weight.shape) != tuple(want):
            raise ValueError(f"layer {name}: stored weight has shape {tuple(weight.shape)}, "
                             f"expected {want}")
        self.defer = False       # return a _Pending for the IntAct / IntAdd after it
        self._packed_on = None

    def forward(self, x: torch.Tensor):
        if isinstance(x, _Pending):
            x = x.run(False, None)
        q = getattr(x, "_synq_q", None)
        if q is not None:                         # int8 from the layer before (fused mode)
            xq, (xs, xz) = x, q
        elif self._use_s2d(x):                    # a stem on a GPU: see _use_s2d
            if self.static:
                xs, xz, hi = self.in_scale, self.in_zero, self.in_hi
            else:
                xs, zero = _dynamic_grid(x, (0, 1, 2, 3))
                xs, xz, hi = xs.reshape(()), zero.to(torch.int32).reshape(()), 127
            xq = _tri_quant.quantize_s2d(x, xs, xz, -128, hi, tuple(self.padding))
            xq._synq_s2d = True
        elif self.static:
            xq = _quantize_static(x, self.in_scale, self.in_zero, -128, self.in_hi)
            xs, xz = self.in_scale, self.in_zero
        else:
            xq, xs, xz = _quantize_dynamic(x, (0, 1, 2, 3))
            if not self._use_packed(x.device):  # the packed CPU conv takes any one-element grid
                xs, xz = xs.reshape(()), xz.reshape(())
        if xq.is_cuda and not xq.is_contiguous(memory_format=torch.channels_last):
            # the GPU kernels' fast layout (a run of channels per pixel); the output keeps it,
            # so this copies once per model, at the first conv with more than one channel
            xq = xq.contiguous(memory_format=torch.channels_last)
        pending = _Pending(self, xq, xs, xz)
        return pending if self.defer else pending.run(self.relu, None)

    def weight_int8(self) -> torch.Tensor:
        """The stored integers as an int8 (Cout, C / groups, kh, kw) tensor: the weight
        itself, or a packed int4 weight unpacked once per device (cached, not saved)."""
        if not self.packed:
            return self.weight
        cg = self.in_channels // self.groups
        return self._cached("int8", lambda: sk.unpack_int4(self.weight, True, self.k).reshape(
            -1, cg, *self.kernel_size).contiguous())

    def conv_weight(self, device) -> torch.Tensor:
        """weight_int8(), channels-last on a GPU (cached): each output channel's K = (ky, kx,
        c) then runs contiguously, as the GPU kernels read it."""
        w = self.weight_int8()
        if device.type != "cuda" or w.is_contiguous(memory_format=torch.channels_last):
            return w
        return self._cached("int8_cl", lambda: w.contiguous(memory_format=torch.channels_last))

    def _tap_weight(self, device):
        """(weight, row sums, offsets or None) for the fused conv: conv_weight(device), and
        for a packed int4 weight with offsets the offsets added back once (4-bit integers
        plus their offset lie in [-15, 15], so they fit int8 exactly), so that the kernel
        skips the offset term. Cached; no value-dependent step (CUDA-graph safe)."""
        if not (self.packed and self.offset is not None):
            return self.conv_weight(device), self.w_rowsum, self.offset

        def fold():
            w = (self.weight_int8().to(torch.int16)
                 + self.offset.to(torch.int16).reshape(-1, 1, 1, 1)).to(torch.int8)
            if device.type == "cuda":
                w = w.contiguous(memory_format=torch.channels_last)
            return w, sk.weight_row_sums(w), None
        return self._cached(f"tap_folded_{device.type}", fold)

    def _use_s2d(self, x) -> bool:
        """Whether this conv takes its float input space-to-depth (quantize_s2d) and runs as
        a stride-1 conv of 16 channels: a stride-2 conv of at most 4 channels with odd
        kernels (ResNet-18's 7x7 stem) on the fused GPU path. Its window rows become 64-byte
        runs of 16-byte pixels, copied 16 bytes at a time, where 3-byte pixels went a byte at
        a time through registers (180 SASS instructions a K block of 32 for the stem,
        against 64 cycles of tensor-core work; sm_90); the results are the same."""
        kh, kw = self.kernel_size
        return (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() == 4
                and self.groups == 1 and self.in_channels <= 4
                and tuple(self.stride) == (2, 2) and tuple(self.dilation) == (1, 1)
                and kh % 2 == 1 and kw % 2 == 1 and _triton_act(x) and self._use_tap(x)
                and self._s2d_weight(x.device) is not None)

    def _s2d_weight(self, device):
        """(weight, row sums, offsets) of the space-to-depth form on `device`, or None where
        a stored value would leave int8. Cached."""
        def build():
            w, _, offset = self._tap_weight(device)
            w2 = _conv_tap.s2d_weight(w, offset, _tri_quant.S2D_CHANNELS)
            return None if w2 is None else (w2, sk.weight_row_sums(w2), offset)
        return self._cached(f"s2d_{device}", build)

    def _use_tap(self, xq) -> bool:
        """The GPU's fused path: the triton backend's implicit-GEMM conv with the
        requantizing epilogue (synq_kernels.triton.conv_tap), for every conv with more than
        one input channel per group (depthwise-like ones run the direct kernel, unfused)."""
        return (xq.is_cuda and GPU_FUSED and _conv_tap is not None
                and self.in_channels // self.groups > 1
                and self._backend_for("quantized_conv2d", xq.device) == "triton"
                and not torch.compiler.is_compiling())

    def _conv_tap(self, xq, xs, xz, relu, res, out):
        """One kernel call: conv, offset term, bias, residual, ReLU, and the int8 output on
        the grid `out` = (scale, zero, highest int8) or float32 when `out` is None."""
        rq = getattr(res, "_synq_q", None) if res is not None else None
        if res is not None and rq is None and res.dtype != torch.float32:
            res = res.float()
        if getattr(xq, "_synq_s2d", False):       # space-to-depth input (_use_s2d)
            (w, rowsum, offset), geom = self._s2d_weight(xq.device), ((1, 1), (0, 0), (1, 1))
        else:
            w, rowsum, offset = self._tap_weight(xq.device)
            geom = (tuple(self.stride), tuple(self.padding), tuple(self.dilation))
        y = _conv_tap.fused_conv2d(
            xq, xs, xz, w, self.w_scale, rowsum, self.bias, *geom, self.groups, relu,
            offset, res, None if rq is None else rq[0], None if rq is None else rq[1],
            None if out is None else out[0], None if out is None else out[1],
            127 if out is None else out[2], cache=self._cached("tap_kept", dict))
        if out is not None:
            y._synq_q = (out[0], out[1])
        return y

    def _use_packed(self, device) -> bool:
        """Whether this call runs the CPU's prepacked conv kernel (decided once per device)."""
        key = (device.type, self.backend)
        if self._packed_on is None or self._packed_on[0] != key:
            ok = (device.type == "cpu" and self.backend in (None, "cpu")
                  and _PACKED_CONV is not None and sk.ops.int_gemm._has_packed_kernel())
            self._packed_on = (key, ok)
        return self._packed_on[1]

    def _packed(self):
        """(weight in the CPU kernel's layout, offsets or None), packed on first use (not
        saved). Rows stored with an offset get it back where every row then fits int8 (4-bit
        integers plus their offset lie in [-15, 15]); otherwise (asymmetric 8-bit weights)
        the kernel adds the offset term itself."""
        return self._cached("cpu_packed", self._prepack)

    def _prepack(self):
        w = self.weight_int8()
        if self.offset is None:
            return sk.prepack_conv2d_weight(w, self.groups), None
        w16 = w.to(torch.int16) + self.offset.to(torch.int16).reshape(-1, 1, 1, 1)
        if int(w16.min()) >= -128 and int(w16.max()) <= 127:
            return sk.prepack_conv2d_weight(w16.to(torch.int8), self.groups), None
        return sk.prepack_conv2d_weight(w, self.groups), self.offset

    def _conv_float(self, xq, xs, xz, relu):
        """The unfused path: float32 output of any backend (offset term included)."""
        backend = self._backend_for("quantized_conv2d", xq.device)
        fuse_relu = relu and self.offset is None
        out = torch.ops.synq.quantized_conv2d(
            xq, xs.reshape(()), xz.reshape(()), self.conv_weight(xq.device), self.w_scale,
            self.w_rowsum, self.bias, self.stride, self.padding, self.dilation, self.groups,
            fuse_relu, torch.float32, backend)
        if self.offset is not None:
            self._add_offset_term(out, xq, xs, xz)
            if relu:
                out.clamp_min_(0.0)
        return out

    def _add_offset_term(self, out, xq, xs, xz):
        """out += x_scale w_scale[n] o[n] sum over n's receptive field of (x - x_zero).
        Padding holds x_zero, i.e. contributes 0, so the window sums run over the per-group
        channel sums minus (C / g) x_zero, zero-padded. They are integers below 2^24
        (K * 255), so float32 box sums are exact (the dilated case convolves in float64, which
        has no Winograd path)."""
        b, c, h, w = xq.shape
        g = self.groups
        sums = xq.reshape(b, g, c // g, h, w).sum(2, dtype=torch.int32) - (c // g) * xz
        kernel = tuple(self.kernel_size)
        if self.dilation == [1, 1] and 2 * max(self.padding) <= min(kernel):
            # a box sum: average pooling with divisor 1 adds the integers exactly
            win = F.avg_pool2d(sums.float(), kernel, self.stride, self.padding,
                               count_include_pad=True, divisor_override=1)
        else:
            ones = torch.ones(g, 1, *kernel, dtype=torch.float64, device=xq.device)
            win = F.conv2d(sums.double(), ones, None, self.stride, self.padding,
                           self.dilation, g).float()
        win = win.mul_(xs)                                            # (B, g, OH, OW)
        coef = (self.w_scale * self.offset.float()).reshape(1, g, -1, 1, 1)
        if out is None:
            return (win[:, :, None] * coef).reshape(b, -1, *win.shape[2:])
        view = out.view(b, g, -1, *out.shape[2:]) if out.is_contiguous() else None
        if view is not None:
            view.addcmul_(win[:, :, None], coef)
        else:
            out.add_((win[:, :, None] * coef).reshape(b, -1, *out.shape[2:]))

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        grid = "static" if self.static else "dynamic 8-bit"
        kind = "packed int4" if self.packed else "int8"
        return (f"{self.in_channels}, {self.weight.shape[0]}, kernel=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"w{self.wbits} {kind}, "
                f"input {grid}, relu={self.relu}")


class IntLinear(_IntLayer):
    """Integer Linear: int8 input (per-row dynamic range, or the static grid of the
    activation quantizer before it), int8 or packed int4 weight, float32 output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_float(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        if self.static:
            xq = _quantize_static(x2, self.in_scale, self.in_zero, -128, self.in_hi)
            xs = self.in_scale.reshape(1).expand(m).contiguous()
            xz = self.in_zero.reshape(1).expand(m).contiguous()
            xs_col, xz_col = self.in_scale, self.in_zero    # 0-d: the same for every row
        else:
            xq, xs_col, xz_col = _quantize_dynamic(x2, (1,))    # (m, 1)
            xs, xz = xs_col.reshape(m), xz_col.reshape(m)
        backend = self._backend_for("quantized_linear", x.device)
        if backend in ("cpu", "cuda") and m > 0:
            # the compiled kernel itself: no custom-op layer, no re-checks of the export's
            # scales (about 25 us a call at batch 1), and offsets folded where they fit (the
            # same bits under torch.compile, where the op has a fake kernel)
            w, rowsum, offset, packed = self._direct_weight()
            out = _LINEAR(xq, xs, xz, w, self.w_scale, rowsum, self.bias,
                          self.relu and offset is None, torch.float32, packed)
        else:
            offset, packed = self.offset, self.packed
            out = torch.ops.synq.quantized_linear(xq, xs, xz, self.weight, self.w_scale,
                                                  self.w_rowsum, self.bias,
                                                  self.relu and offset is None,
                                                  torch.float32, packed, backend)
        if offset is not None:
            # the offset term o[n] * sum_k (x_k - x_zero), scaled like the accumulator. The
            # sums are integers below 2^24 (K <= 65,536), exact in float32: the values of an
            # int32 sum, in five replayed ops instead of eight
            rows = torch.sub(xq.sum(1, keepdim=True, dtype=torch.float32), xz_col,
                             alpha=self.k)
            out = out + (xs_col * rows) * (self.w_scale * offset.float())
            if self.relu:
                out = out.clamp_min_(0.0)
        return out.reshape(*lead, out.shape[-1])

    def _direct_weight(self):
        """(weight, row sums, offsets or None, packed) for a direct kernel call: the stored
        weight, except that rows stored with an offset get it back once (a cache, not saved)
        where every sum fits int8, as it does for packed 2-4 bit weights (|q - z| <= 15); an
        int8 weight computed that way needs no offset term and is exact. CPU only: on a GPU
        the packed weight keeps its 4-bit memory traffic."""
        return self._cached("direct", self._fold_offset)

    def _fold_offset(self):
        if self.offset is not None and self.weight.device.type == "cpu":
            w = (sk.unpack_int4(self.weight, True, self.k) if self.packed
                 else self.weight).to(torch.int32) + self.offset.reshape(-1, 1)
            if int(w.min()) >= -128 and int(w.max()) <= 127:
                w8 = w.to(torch.int8).contiguous()
                return w8, sk.weight_row_sums(w8), None, False
        return self.weight, self.w_rowsum, self.offset, self.packed

    def extra_repr(self) -> str:
        n = self.weight.shape[0]
        kind = "packed int4" if self.packed else "int8"
        grid = "static" if self.static else "dynamic 8-bit per row"
        return (f"in_features={self.k}, out_features={n}, w{self.wbits} {kind}, input {grid}, "
                f"relu={self.relu}")


def _dequant(q: torch.Tensor) -> torch.Tensor:
    scale, zero = q._synq_q
    return (q.float() - zero.float()) * scale


def _as_float(t):
    if isinstance(t, _Pending):
        t = t.run(False, None)
    return _dequant(t) if getattr(t, "_synq_q", None) is not None else t


# The fused GPU conv (IntConv2d._use_tap); GPU_FUSED = False runs the unfused path instead
# (conv with a float32 output, then the residual, ReLU and requantization as PyTorch ops).
GPU_FUSED = True
try:
    from synq_kernels.triton import conv_tap as _conv_tap
    from synq_kernels.triton import quantize as _tri_quant
except ImportError:         # no Triton
    _conv_tap = _tri_quant = None


def _triton_act(x: torch.Tensor) -> bool:
    """Whether the int8 activation steps on x (static quantization, the int8 max-pool) run
    synq's Triton kernels: on a GPU with Triton, outside torch.compile (which fuses the
    PyTorch ops itself)."""
    return x.is_cuda and _tri_quant is not None and not torch.compiler.is_compiling()

_PACKED_CONV = (torch.ops.synq._quantized_conv2d_packed.default
                if hasattr(torch.ops.synq, "_quantized_conv2d_packed") else None)
_LINEAR = (torch.ops.synq._quantized_linear.default
           if hasattr(torch.ops.synq, "_quantized_linear") else None)


class _Pending:
    """A conv whose epilogue waits for what follows it (fused mode): an IntAdd hands it the
    residual, an IntAct the ReLU and the output grid; then it runs as one kernel call. On the
    CPU that is the prepacked conv with its requantizing epilogue (int8 out, the next layer's
    input as is); elsewhere the float path followed by the same steps in PyTorch."""

    __slots__ = ("layer", "xq", "xs", "xz", "residual")

    def __init__(self, layer, xq, xs, xz):
        self.layer, self.xq, self.xs, self.xz, self.residual = layer, xq, xs, xz, None

    def run(self, relu: bool, out, hardswish: bool = False):
        """out: None (float32 result) or (scale, zero in the int8 domain, highest int8 value)
        for an int8 result tagged with its grid. hardswish (instead of relu): in the CPU
        kernel's epilogue; elsewhere on the float result, in the quantization's pass."""
        L, res = self.layer, self.residual
        if isinstance(res, _Pending):
            res = res.run(False, None)
        tap = L._use_tap(self.xq) or getattr(self.xq, "_synq_s2d", False)
        if hardswish and (tap or not L._use_packed(self.xq.device)):
            self.residual = res
            y = self.run(False, None)
            if out is None:
                return F.hardswish(y)
            q = _quantize_static(y, out[0], out[1], -128, out[2], hardswish=True)
            q._synq_q = (out[0], out[1])
            return q
        if tap:
            return L._conv_tap(self.xq, self.xs, self.xz, relu, res, out)
        if not L._use_packed(self.xq.device):
            y = L._conv_float(self.xq, self.xs, self.xz, relu and res is None)
            if res is not None:
                y = y + _as_float(res)
                if relu:
                    y.clamp_min_(0.0)
            if out is None:
                return y
            q = _quantize_static(y, out[0], out[1], -128, out[2])
        else:
            # grids as they are: the kernel takes any one-element tensor (a view each was a
            # replayed op each, 2 us apiece at batch 1)
            rq = getattr(res, "_synq_q", None) if res is not None else None
            rs, rz = (rq[0], rq[1]) if rq is not None else (None, None)
            if res is not None and rq is None:
                res = res.float()
            b = L._buffers
            wp, wo = L._packed()
            q = _PACKED_CONV(
                self.xq, self.xs, self.xz, wp, b["w_scale"],
                b["bias"], L.stride, L.padding, L.dilation, L.groups, relu,
                torch.int8 if out is not None else torch.float32,
                None if out is None else out[0], None if out is None else out[1], res, rs, rz,
                # activation grids below 8 bits end under int8's top
                None if out is None or out[2] >= 127 else out[2], wo, hardswish)
            if out is None:
                return q
        q._synq_q = (out[0], out[1])
        return q


class IntAct(nn.Module):
    """ReLU / ReLU6 (unless already applied by the layer before it), Hardswish or SiLU (in
    float here) followed by the frozen quantization of its activation quantizer: a float
    tensor on the grid (as the fake-quantized model gives), or in fused mode (`emit_int`)
    the int8 tensor itself, produced by the epilogue of the conv before it (ReLU / ReLU6 /
    Hardswish) or quantized here.

    `scale` / `zero` may be sequences: an activation module that the forward calls at several
    places (see synq.quant.QuantAct) has a grid per call, the k-th in buffers `scale_k` /
    `zero_k` (k >= 2), picked by the call's rank in the forward.

    `tops` (ReLU6): per call, the int8 code of 6.0 on the grid where it is below the grid's
    top (a learned LSQ step can reach past 6), else None; int8 results are clamped to it,
    since min(6, x) and the monotone rounding commute. Set by the export from the grids."""

    _counts_calls = True  # reset at each forward by synq.quant's hook on the model

    def __init__(self, name: str, kind: str, bits: int, scale, zero, apply_relu: bool,
                 emit_int: bool = False, tops=None):
        super().__init__()
        self.name, self.kind, self.bits = name, kind, int(bits)
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale]
        zeros = list(zero) if isinstance(zero, (list, tuple)) else [zero]
        if len(scales) != len(zeros) or not scales:
            raise ValueError(f"IntAct {name}: {len(scales)} scales and {len(zeros)} zero "
                             f"points; give one of each per call")
        self.calls = len(scales)
        self._calls = 0  # calls since the model's forward began (reset by its hook)
        for k, (sc, z) in enumerate(zip(scales, zeros)):
            suffix = "" if k == 0 else f"_{k + 1}"
            self.register_buffer("scale" + suffix, torch.tensor(float(sc)))
            self.register_buffer("zero" + suffix, torch.tensor(float(z)))
        self.apply_relu = bool(apply_relu)
        self.emit_int = bool(emit_int)
        self.tops = None if tops is None else [None if t is None else int(t) for t in tops]

    def _next_call(self) -> tuple[str, bool]:
        """The buffer-name suffix of this call's grid, and whether this call emits int8."""
        if self.calls == 1:
            return "", bool(self.emit_int)
        k, self._calls = self._calls % self.calls, self._calls + 1
        emit = self.emit_int[k] if isinstance(self.emit_int, list) else self.emit_int
        return ("" if k == 0 else f"_{k + 1}"), bool(emit)

    def _make_grid(self, scale, zero, suffix=""):
        hi = (1 << self.bits) - 1 - 128
        if self.tops is not None:
            top = self.tops[int(suffix[1:]) - 1 if suffix else 0]
            hi = hi if top is None else min(hi, top)
        return scale.reshape(1), (zero - 128).to(torch.int32).reshape(1), hi

    def relu6_tops(self) -> list | None:
        """`tops` from this module's grids (None unless ReLU6)."""
        if self.kind != "relu6":
            return None
        out = []
        for k in range(self.calls):
            suffix = "" if k == 0 else f"_{k + 1}"
            scale, zero = self._buffers["scale" + suffix], self._buffers["zero" + suffix]
            qmax = (1 << self.bits) - 1
            code = int(torch.clamp(torch.round(torch.tensor(6.0) / scale.cpu().float())
                                   + zero.cpu().float(), 0, qmax)) - 128
            out.append(code if code < qmax - 128 else None)
        return out

    def _grid(self, suffix: str = ""):
        """(scale, zero in the int8 domain, highest int8 value) of a call's grid, as
        one-element tensors (cached; rebuilt when the buffers change or move)."""
        scale, zero = self._buffers["scale" + suffix], self._buffers["zero" + suffix]
        if torch.compiler.is_compiling():  # no version counters while tracing: no cache
            return self._make_grid(scale, zero, suffix)
        cache = self.__dict__.setdefault("_grid_caches", {})
        key, grid = cache.get(suffix, (None, None))
        if (key is None or key[0] is not scale or key[1] != version(scale)
                or key[2] is not zero or key[3] != version(zero)):
            grid = self._make_grid(scale, zero, suffix)
            cache[suffix] = ((scale, version(scale), zero, version(zero)), grid)
        return grid

    def forward(self, x):
        suffix, emit_int = self._next_call()
        if isinstance(x, _Affine):
            if emit_int and self.kind in ("relu", "hardswish"):
                # the BatchNorm before it, the activation and the quantization: one pass
                scale, zero, hi = self._grid(suffix)
                q = _quantize_static(x.x, scale, zero, -128, hi,
                                     hardswish=self.kind == "hardswish",
                                     relu=self.kind == "relu" and self.apply_relu,
                                     affine=x.bn.mul_add())
                q._synq_q = (scale, zero)
                return q
            x = x.run()
        if isinstance(x, _Pending):
            # ReLU6's top: the grid's top, or the code of 6.0 below it (`tops`)
            hs = self.kind == "hardswish"
            q = x.run(not hs, self._grid(suffix), hardswish=hs)
            return q if emit_int else _dequant(q)
        x = _as_float(x)
        fused_hs = emit_int and self.kind == "hardswish"  # in the quantization's pass
        if self.kind == "relu6":
            x = x.clamp(0.0, 6.0)
        elif self.kind in _FLOAT_ACTIVATIONS:
            if not fused_hs:
                x = _FLOAT_ACTIVATIONS[self.kind](x)
        elif self.apply_relu:
            x = torch.relu(x)
        if not emit_int:
            return sk.fake_quant(x, self._buffers["scale" + suffix],
                                 self._buffers["zero" + suffix], self.bits)
        scale, zero, hi = self._grid(suffix)
        q = _quantize_static(x, scale, zero, -128, hi, hardswish=fused_hs)
        q._synq_q = (scale, zero)
        return q


class IntMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that keeps int8 activations int8 in fused mode: max commutes with the
    monotone grid, so an int8 tensor tagged with its grid comes out int8 with the same tag,
    and the conv after it takes it as is (its static input grid is that activation's). A
    float input is pooled as by nn.MaxPool2d. The int8 pool is synq_kernels.max_pool2d_int8
    (PyTorch's max-pool has no usable int8 kernel): the cpu backend on a CPU, Triton on a GPU
    (float16 through PyTorch without Triton or under torch.compile), all exact."""

    def forward(self, x):
        q = getattr(x, "_synq_q", None)
        if q is None or self.return_indices:
            return super().forward(_as_float(x))
        be = "triton" if _triton_act(x) else ("reference" if x.is_cuda else None)
        y = sk.max_pool2d_int8(x, self.kernel_size, self.stride, self.padding, self.dilation,
                               self.ceil_mode, backend=be)
        y._synq_q = q
        return y


class FloatBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that does not directly follow a conv (DenseNet's and pre-activation
    ResNets' BN -> ReLU -> conv), so it cannot be folded: it runs in float, in eval mode, on
    its input made float first. In fused mode (`defer`, where its output goes only to a ReLU
    or Hardswish quantizer that emits int8) it hands the IntAct its input and its map
    x * mul + add (`mul_add`), which that applies in its quantization pass."""

    defer = False

    def forward(self, x):
        x = _as_float(x)
        if self.defer and not self.training and self.running_mean is not None:
            return _Affine(x, self)
        return super().forward(x)

    def mul_add(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mul, add) float32 per channel: eval mode's x * mul + add, mul = 1 /
        sqrt(running_var + eps) * weight, add = bias - running_mean * mul (cached; rebuilt
        when the buffers or eps change). ATen's BatchNorm rounds its own way: a few values
        differ from its output in the last bit, which moves a value across a grid boundary
        now and then."""
        ts = [self.running_mean, self.running_var, self.weight, self.bias]
        if not torch.compiler.is_compiling():
            # (data_ptr: an assignment to .data keeps the object and its version)
            key = (float(self.eps),) + tuple(
                None if t is None else (id(t), version(t), t.data_ptr()) for t in ts)
            hit = self.__dict__.get("_affine_cache")
            if hit is not None and hit[0] == key and all(
                    a is b for a, b in zip(hit[2], ts)):
                return hit[1]
        with torch.no_grad():
            mul = 1.0 / torch.sqrt(self.running_var.float() + self.eps)
            if self.weight is not None:
                mul = mul * self.weight.float()
            add = -self.running_mean.float() * mul
            if self.bias is not None:
                add = add + self.bias.float()
        if not torch.compiler.is_compiling():
            self.__dict__["_affine_cache"] = (key, (mul, add), ts)
        return mul, add


class _Affine:
    """A FloatBatchNorm2d's input waiting for the IntAct after it (see FloatBatchNorm2d)."""

    __slots__ = ("x", "bn")

    def __init__(self, x, bn):
        self.x, self.bn = x, bn

    def run(self) -> torch.Tensor:
        return nn.BatchNorm2d.forward(self.bn, self.x)


class IntAdd(Add):
    """Residual addition: in fused mode it hands the other operand to the pending conv as the
    epilogue's residual; otherwise a float addition."""

    def forward(self, a, b):
        if isinstance(a, _Pending) and a.residual is None:
            a.residual = b
            return a
        if isinstance(b, _Pending) and b.residual is None:
            b.residual = a
            return b
        return _as_float(a) + _as_float(b)


class IntModel(nn.Module):
    """The exported model: `self.model` is the original module tree with its quantized layers
    replaced (see the module docstring); forward runs without autograd.

    Replay (CPU tensors, on by default; `replay = False` turns it off): the first call with
    a new input shape runs eagerly and builds the layers' caches, the second also records
    the ops it dispatches (`synq.replay`), and later calls with that shape replay them with
    no Python module code in between (a C++ plan runs them where synq_kernels._C is built:
    no Python between ops either); results are bit-identical to eager calls. A recording
    is dropped when a parameter or buffer changes in place (load_state_dict included, and
    a forward that changes its own buffers), on `.to()` and other moves, and on
    `set_backend`; after replacing a buffer by assignment (`layer.weight = t`), call
    `reset_replay()`.

    CUDA graphs (CUDA tensors, on by default; `cuda_graphs = False` turns them off): the
    same scheme with the forward captured into a CUDA graph per input shape
    (`synq.cuda_graphs`; each graph keeps its input, output and intermediate buffers on the
    GPU, at most `GraphCache.MAX_GRAPHS` shapes); a forward that cannot be captured runs
    eagerly, and `graph_refusals()` says why. Measured on an H200 (ResNet-20, batch 1 to 32,
    benchmarks/results/gpu_2026-11-27/): 1.2-1.4 ms per forward instead of 8-16 ms eager."""

    MAX_RECORDINGS = 16     # input shapes kept; the oldest is dropped past this

    def __init__(self, model: nn.Module, plan: dict, meta: dict):
        super().__init__()
        self.model = model
        self.plan = plan
        self.meta = meta
        self.replay = True
        self._recordings = {}
        self.cuda_graphs = True
        self._graphs = cuda_graphs.GraphCache()

    def forward(self, x):
        with torch.no_grad(), sk.value_checks(False):
            if (self.cuda_graphs and isinstance(x, torch.Tensor) and x.is_cuda
                    and not torch.compiler.is_compiling()):
                return self._graphs(self.model, x)
            if (not self.replay or not isinstance(x, torch.Tensor) or x.device.type != "cpu"
                    or torch.compiler.is_compiling()):
                return self.model(x)
            key = replay.input_key(x)
            got = self._recordings.get(key)
            if got is not None and got[0] is not None:
                out = got[0].run_if_current(x)
                if out is not replay.STALE:
                    return out
                got = None                  # a weight changed in place: record again
            if got is None:                 # first call of this shape: warm the caches
                if len(self._recordings) >= self.MAX_RECORDINGS:
                    self._recordings.pop(next(iter(self._recordings)))
                self._recordings[key] = (None, "warm")
                return self.model(x)
            if got[1] != "warm":            # refused before: eager from now on
                return self.model(x)
            tensors = [*self.model.parameters(), *self.model.buffers()]
            if any(t.is_inference() for t in tensors):
                return self.model(x)        # no version counters to guard a recording with
            # versions from before the call: a forward that changes its own buffers in place
            # (folded, not replayed) leaves a recording that the next call finds stale
            versions = [t._version for t in tensors]
            out, rec, why = replay.record(self.model, x)
            if rec is not None:
                rec.guard(tensors, versions)
            self._recordings[key] = (rec, None) if rec is not None else (None, why)
            return out

    def load_state_dict(self, *args, **kwargs):
        # the C++ replay plan holds the weights too: torch.utils.swap_tensors (load_state_dict
        # under torch.__future__.set_swap_module_params_on_conversion) refuses shared tensors
        self.reset_replay()
        return super().load_state_dict(*args, **kwargs)

    def reset_replay(self) -> "IntModel":
        """Drop every recording and CUDA graph (see the class docstring)."""
        self._recordings = {}
        self._graphs = cuda_graphs.GraphCache()
        for m in self.model.modules():
            m.__dict__.pop("_affine_cache", None)
        return self

    def graph_refusals(self) -> dict:
        """input key -> why its CUDA-graph capture failed (those shapes run eagerly)."""
        return dict(self._graphs.refused)

    @normal_tensors  # .to() inside inference mode would otherwise make inference tensors
    def _apply(self, fn, *args, **kwargs):
        self.reset_replay()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # recordings hold the ops' C++ callables (not picklable) and references into this
        # model's tensors, graphs their memory: pickled and deep-copied models record afresh
        return {**super().__getstate__(), "_recordings": {},
                "_graphs": cuda_graphs.GraphCache()}

    def int_layers(self) -> dict[str, _IntLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, _IntLayer)}

    def set_backend(self, backend: str | None) -> "IntModel":
        """Run the integer ops on `backend` (None: the fastest available for the input)."""
        if backend is not None and backend not in sk.backends.BACKENDS:
            raise ValueError(f"backend must be None or one of {', '.join(sk.backends.BACKENDS)}"
                             f", got {backend!r}")
        for layer in self.int_layers().values():
            layer.backend = backend
            layer._backend = None
        return self.reset_replay()


# -- export ------------------------------------------------------------------------------------

class _LooseReads(torch.overrides.TorchFunctionMode):
    """Records the tensors that torch functions read outside the hooked modules (the
    `torch.cat` in DenseNet's forward, a slice assignment, `tolist()`): the ids of those
    tensors go into `ids`, the tensors themselves into `keep` so that the ids stay unique.
    Metadata queries (`x.size()`, `x.dim()`, `x.shape`, `x.dtype`) read no values and are not
    counted, unless they return a tensor (`x.data`, `x.T`)."""

    _METADATA = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride",
                           "is_contiguous", "__len__", "data_ptr", "element_size",
                           "storage_offset", "is_floating_point", "is_complex", "is_signed",
                           "get_device", "__get__"})

    def __init__(self, depth: list):
        super().__init__()
        self.depth, self.ids, self.keep = depth, set(), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth[0] == 0 and (
                getattr(func, "__name__", None) not in self._METADATA
                or any(isinstance(o, torch.Tensor) for o in torch.utils._pytree.tree_leaves(out))):
            self.add((args, kwargs))
        return out

    def add(self, tree) -> None:
        for t in torch.utils._pytree.tree_leaves(tree):
            if isinstance(t, torch.Tensor):
                self.ids.add(id(t))
                self.keep.append(t)


def _trace(qmodel: nn.Module, example: torch.Tensor
           ) -> tuple[list[tuple[str, nn.Module, list, object]], set]:
    """(name, module, input tensors, output) of every leaf-level call of one forward, in
    execution order, and the ids of the tensors that code outside those calls read (see
    _LooseReads). Tensors are kept alive so that their ids stay unique."""
    calls = []
    depth = [0]     # hooked module calls in progress
    watched = (quant.QuantConv2d, quant.QuantLinear, quant.QuantAct, nn.BatchNorm2d)
    made = {}       # id(output) -> its version counter when its module returned it
    entered = {}    # id(module) -> [(input, its version when the module was called)]
    unknown = []    # stand-ins for inputs changed in place since they were made

    def pre_hook(mod, args):
        depth[0] += 1
        entered[id(mod)] = [(a, None if a.is_inference() else a._version)
                            for a in args if isinstance(a, torch.Tensor)]

    def hook(mod, args, out, name):
        try:
            record(mod, out, name)
        finally:            # (the hook's own torch calls count as the module's)
            depth[0] -= 1

    def record(mod, out, name):
        if out is None:     # (also after an exception in the forward: always_call below)
            entered.pop(id(mod), None)
            return
        ins = []
        for t, v in entered.pop(id(mod), []):
            if v is not None and made.get(id(t), v) != v:
                # changed in place between its producer and this call by code no hook sees
                # (torchvision's `out += identity`): its producer is not this input's
                unknown.append(torch.empty(0))
                t = unknown[-1]
            ins.append(t)
        if any(out is t for t in ins):
            return  # a pass-through (an empty Sequential shortcut, Identity): transparent
        if isinstance(out, torch.Tensor) and not out.is_inference():
            made[id(out)] = out._version
        calls.append((name, mod, ins, out))

    inside = set()
    for name, m in qmodel.named_modules():
        if isinstance(m, watched[:3]):
            inside.update(f"{name}.{c}" for c, _ in m.named_modules() if c)
    # the quantized layers, BNs and residual adds, and every other leaf module (to see who
    # consumes an activation)
    hooked = [(n, m) for n, m in qmodel.named_modules() if n not in inside and n and (
        isinstance(m, watched + (Add,)) or not list(m.children()))]
    handles = [m.register_forward_hook(lambda mod, a, o, name=n: hook(mod, a, o, name),
                                       always_call=True)    # keeps `depth` right
               for n, m in hooked]
    handles += [m.register_forward_pre_hook(pre_hook) for _, m in hooked]
    loose = _LooseReads(depth)
    try:
        with torch.no_grad(), loose:
            loose.add(qmodel(example))  # what the forward returns, its caller reads
    finally:
        for h in handles:
            h.remove()
    return calls, loose.ids


def _call_quantizers(qa: quant.QuantAct) -> list:
    """A QuantAct's quantizers in call order (one unless the forward calls it repeatedly)."""
    return [qa.quantizer, *qa.extra_quantizers]


def _unknown_layer(name: str, m: nn.Module) -> ValueError:
    return ValueError(f"cannot export layer {name or '(the model itself)'} "
                      f"({type(m).__name__}): the exporter knows quantized Conv2d / "
                      f"Linear, BatchNorm2d, ReLU / ReLU6 / Hardswish / "
                      f"SiLU with their quantizers, residual adds "
                      f"(synq.models.common.Add), pooling, Flatten, Dropout, Identity, "
                      f"Sigmoid / Hardsigmoid gates, and StochasticDepth / DropPath that "
                      f"pass their input through in eval mode")


def _check_exportable(qmodel: nn.Module) -> list[str]:
    """Raises for a model export cannot handle; returns the names of the _EVAL_IDENTITIES
    layers, which the traced forward must show passing their input through unchanged. (Any
    other unknown layer is refused: one that passes its input through on the example alone,
    a padding for odd sizes say, would get int8 codes at run time.)"""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"export takes an nn.Module, got {type(qmodel).__name__}")
    if getattr(qmodel, "quant_config", None) is None:
        raise ValueError("export takes a model returned by synq.quant.quantize_model (or "
                         "synq.io.load_quantized); this one has no quant_config")
    inside = set()
    for name, m in qmodel.named_modules():
        if isinstance(m, (quant.QuantConv2d, quant.QuantLinear, quant.QuantAct)):
            inside.update(f"{name}.{c}" for c, _ in m.named_modules() if c)
    identities = []
    for name, m in qmodel.named_modules():
        if name in inside or isinstance(m, (quant.QuantConv2d, quant.QuantLinear,
                                            quant.QuantAct, nn.BatchNorm2d) + _PASSTHROUGH):
            continue
        if type(m) in quant.QUANTIZED_ACTIVATIONS:
            raise ValueError(f"layer {name} ({type(m).__name__}) has no activation quantizer: "
                             f"the model was not produced by quantize_model")
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"layer {name} ({type(m).__name__}) is not quantized: the model "
                             f"was not produced by quantize_model")
        own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        if not own and not list(m.children()) and type(m).__name__ in _EVAL_IDENTITIES:
            identities.append(name)
        elif own or not list(m.children()):
            raise _unknown_layer(name, m)
    for q in quant.act_quantizers(qmodel).values():
        if q.calibrating or not bool(q.initialized):
            raise ValueError(f"activation quantizer {q.name} is not calibrated (or still "
                             f"calibrating): calibrate and freeze the model before export")
    return identities


def _dataflow(calls) -> tuple[dict, dict, dict]:
    """Who reads what in the traced calls: id(tensor) -> [(name, module)] of the calls that
    took it as an input; module name -> id of its (last) output; module name -> ids of its
    outputs, call by call."""
    consumers, out_of, outs_of = {}, {}, {}
    for name, mod, ins, out in calls:
        for t in ins:
            consumers.setdefault(id(t), []).append((name, mod))
        out_of[name] = id(out)
        outs_of.setdefault(name, []).append(id(out))
    return consumers, out_of, outs_of


def _make_plan(qmodel: nn.Module, example: torch.Tensor, identities=()) -> dict:
    calls, loose = _trace(qmodel, example)
    for name, mod, _, _ in calls:       # (a pass-through call is not among the calls)
        if name in identities:
            raise _unknown_layer(name, mod)
    producer = {}  # id(tensor) -> call index
    for i, (_, _, _, out) in enumerate(calls):
        producer.setdefault(id(out), i)
    counts = {}
    for name, *_ in calls:
        counts[name] = counts.get(name, 0) + 1
    layers, bn_of, acts = {}, {}, {}
    rank = {}  # call index -> its rank among the calls of its module (0 for the first)
    seen = {}
    for i, (name, *_) in enumerate(calls):
        rank[i] = seen.get(name, 0)
        seen[name] = rank[i] + 1
    flow = _dataflow(calls)
    consumers, out_of = flow[0], flow[1]

    def readers(tid):  # the calls that took the tensor, and code outside the modules
        return len(consumers.get(tid, ())) + (tid in loose)

    for i, (name, mod, ins, out) in enumerate(calls):
        src = calls[producer[id(ins[0])]] if ins and id(ins[0]) in producer else None
        if isinstance(mod, nn.BatchNorm2d):
            # folded into the conv whose output only it takes; any other BatchNorm (DenseNet's
            # and pre-activation ResNets' BN -> ReLU -> conv) runs in float (FloatBatchNorm2d)
            if src is not None and isinstance(src[1], quant.QuantConv2d) \
                    and counts[name] == 1 and counts[src[0]] == 1 and readers(id(ins[0])) == 1 \
                    and mod.running_mean is not None and mod.weight is not None:
                bn_of[src[0]] = name
        elif isinstance(mod, (quant.QuantConv2d, quant.QuantLinear)):
            # a max-pool keeps its input's grid (max commutes with the monotone rounding)
            while (src is not None and isinstance(src[1], nn.MaxPool2d)
                   and not src[1].return_indices and counts[src[0]] == 1):
                pin = src[2][0] if src[2] else None
                src = calls[producer[id(pin)]] if pin is not None and id(pin) in producer \
                    else None
            act = src[0] if src is not None and isinstance(src[1], quant.QuantAct) else None
            # which of the activation's calls (a shared module has a grid per call)
            call = rank[producer[id(src[3])]] if act is not None else 0
            if name in layers and (layers[name]["input_act"], layers[name]["input_call"]) \
                    != (act, call):
                raise ValueError(f"layer {name} is called twice with inputs of different "
                                 f"quantizers; the exporter cannot give it one input grid")
            layers[name] = {"input_act": act, "input_call": call}
        elif isinstance(mod, quant.QuantAct):
            acts.setdefault(name, {"relu_from": set()})
            if src is not None and isinstance(src[1], nn.BatchNorm2d):
                acts[name]["relu_from"].add(src[0])
            elif src is not None and isinstance(src[1], quant.QuantConv2d):
                acts[name]["relu_from"].add(src[0])
            else:
                acts[name]["relu_from"].add(None)
    missing = [n for n in quant.quant_layers(qmodel) if n not in layers]
    if missing:
        raise ValueError(f"layers {', '.join(missing)} did not run in the example forward; "
                         f"the exporter only converts layers it sees run")
    # ReLU fusion: a conv whose (BN-folded) output feeds only a ReLU quantizer applies the
    # ReLU in its epilogue, and that quantizer skips it (ReLU6 is never fused).
    bn_to_conv = {bn: conv for conv, bn in bn_of.items()}
    fused = {}
    for aname, info in acts.items():
        kind = type(qmodel.get_submodule(aname).act).__name__.lower()
        srcs = info["relu_from"]
        conv = None
        if kind == "relu" and len(srcs) == 1 and None not in srcs:
            s = next(iter(srcs))
            if counts.get(s) == 1 and readers(out_of[s]) == 1:  # read by this ReLU only
                conv = bn_to_conv.get(s, s if s in layers else None)
        if conv is not None and counts.get(conv, 0) == 1:
            fused[conv] = aname
        acts[aname] = {"kind": kind, "fused_from": conv if conv in fused else None}
    for name, info in layers.items():
        info["bn"] = bn_of.get(name)
        info["relu"] = name in fused
    _plan_fusion(calls, flow, loose, counts, layers, acts, bn_of)
    return {"layers": layers, "acts": acts, "fused": True}


def _plan_fusion(calls, flow, loose, counts, layers, acts, bn_of) -> None:
    """Which convs hand their epilogue to what follows (`defer`) and which activation
    quantizers pass int8 on (`emit_int`): the fused mode of IntConv2d / IntAct / IntAdd.
    Neither happens to a tensor that code outside the modules reads (`loose`). flow:
    _dataflow(calls) (out_of is used for modules called once)."""
    consumers, out_of, outs_of = flow

    def only(tid, kind):
        c = consumers.get(tid, [])
        return c[0][0] if len(c) == 1 and isinstance(c[0][1], kind) and tid not in loose \
            else None

    def rectifier(aname):
        """Whether activation `aname` is one the conv epilogue can take (ReLU; ReLU6, whose
        top is the grid's clamp or the code of 6.0, IntAct.tops; Hardswish); SiLU runs in
        float after the conv instead."""
        return aname is not None and acts[aname]["kind"] in ("relu", "relu6", "hardswish")

    mods = {n: m for n, m, _, _ in calls}
    for name, info in layers.items():
        info["defer"] = False
        if counts.get(name) != 1 or not isinstance(mods[name], quant.QuantConv2d):
            continue
        last = info["bn"] or name
        if counts.get(last) != 1:
            continue
        tid = out_of[last]
        if rectifier(only(tid, quant.QuantAct)):
            info["defer"] = True
        else:
            add = only(tid, Add)
            if add is not None and counts.get(add) == 1 and \
                    rectifier(only(out_of[add], quant.QuantAct)):
                info["defer"] = True
    # a BatchNorm left in float whose output only a ReLU / Hardswish quantizer takes, called
    # once, that passes int8 on: that quantization applies the BN (FloatBatchNorm2d.defer)
    # (and its input unread by code outside the modules, which could change it in place
    # before the quantization reads it)
    folded = set(bn_of.values())
    in_of = {n: id(ins[0]) for n, _, ins, _ in calls if ins}
    for name, mod in mods.items():
        if isinstance(mod, nn.BatchNorm2d) and name not in folded and counts.get(name) == 1 \
                and in_of.get(name) not in loose:
            a = only(out_of[name], quant.QuantAct)
            if a is not None and counts.get(a) == 1 and acts[a]["kind"] in ("relu",
                                                                             "hardswish"):
                acts[a]["bn"] = name

    def takes_int(n, m, aname, call, pools=True):
        """Whether call `n` of module `m` takes the int8 output of call `call` of `aname`."""
        info = layers.get(n, {})
        if isinstance(m, Add) or (isinstance(m, quant.QuantConv2d)
                                  and info.get("input_act") == aname
                                  and info.get("input_call", 0) == call):
            return True
        if pools and isinstance(m, nn.MaxPool2d) and not m.return_indices \
                and counts.get(n) == 1:     # IntMaxPool2d passes int8 on
            c = consumers.get(out_of.get(n), [])
            return bool(c) and out_of.get(n) not in loose and \
                all(takes_int(n2, m2, aname, call, False) for n2, m2 in c)
        return False

    for aname, info in acts.items():
        # per call: an activation module called at several places has a grid per call, and
        # each call passes int8 on where all its consumers take it (a list then)
        emits = [bool(c) and t not in loose and all(takes_int(n, m, aname, r) for n, m in c)
                 for r, (t, c) in enumerate((t, consumers.get(t, []))
                                            for t in outs_of.get(aname, []))]
        info["emit_int"] = emits[0] if len(emits) == 1 else (emits or False)
        if info.get("bn") and info["emit_int"] is not True:
            del info["bn"]


def _set_fusion(model: nn.Module, plan: dict, fused: bool) -> None:
    """Switch the exported module tree between fused and unfused mode (IntAdd for every
    residual Add either way)."""
    for name, info in plan["layers"].items():
        layer = model.get_submodule(name)
        if isinstance(layer, IntConv2d):
            layer.defer = fused and info.get("defer", False)
    for name, info in plan["acts"].items():
        model.get_submodule(name).emit_int = fused and info.get("emit_int", False)
    defer = {info["bn"] for info in plan["acts"].values() if info.get("bn")}
    for name, m in list(model.named_modules()):
        if type(m) is Add:
            _set_child(model, name, IntAdd())
        elif type(m) is nn.BatchNorm2d:     # one not folded into a conv: runs in float
            new = FloatBatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                   m.track_running_stats)
            new.load_state_dict(m.state_dict())
            where = next(iter([*m.parameters(), *m.buffers()]), torch.empty(0)).device
            _set_child(model, name, new.to(where).train(m.training))
        elif type(m) is nn.MaxPool2d:
            _set_child(model, name, IntMaxPool2d(m.kernel_size, m.stride, m.padding,
                                                 m.dilation, m.return_indices, m.ceil_mode))
    for name in defer:
        model.get_submodule(name).defer = fused


@torch.no_grad()
def _fold(layer, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integer weight, positive scale, bias) of a quantized layer with its BN folded in."""
    ints, scale = _weight_ints(layer)
    n = ints.shape[0]
    bias = (layer.bias.detach().float().clone() if layer.bias is not None
            else torch.zeros(n, device=ints.device))
    if bn is not None:
        a = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
        bias = a * (bias - bn.running_mean.float()) + bn.bias.detach().float()
        sign = torch.where(a < 0, -1, 1).to(torch.int32)
        ints = ints * sign.reshape((-1,) + (1,) * (ints.dim() - 1))
        scale = scale * a.abs()
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError(f"layer {getattr(layer, '_synq_name', '')}: the folded weight scale is "
                         f"not positive and finite (a BatchNorm weight of 0?)")
    return ints, scale, bias


def _store(ints: torch.Tensor, packed: bool):
    """(stored weight, per-row offsets or None) of a layer's integers: int8, or packed int4
    when `packed`. A row whose integers do not fit the stored type (asymmetric 8-bit weights
    span [-z, 255 - z]) is stored minus an offset (see the module docstring)."""
    lo_s, hi_s = (-8, 7) if packed else (-128, 127)
    rows = ints.reshape(ints.shape[0], -1)
    lo, hi = rows.amin(1), rows.amax(1)
    if bool((hi - lo > hi_s - lo_s).any()):
        raise ValueError(f"weights span {int((hi - lo).max()) + 1} levels, more than the "
                         f"{hi_s - lo_s + 1} of {'int4' if packed else 'int8'}")
    fits = (lo >= lo_s) & (hi <= hi_s)
    offset = torch.where(fits, 0, lo - lo_s).to(torch.int32)
    view = (-1,) + (1,) * (ints.dim() - 1)
    stored = (ints - offset.reshape(view)).to(torch.int8)
    if packed:
        stored = sk.pack_int4(stored)
    return stored.contiguous(), (offset if bool(offset.any()) else None)


def _store_as(ints: torch.Tensor, wbits: int, weight_format: str):
    """`_store` by the export's weight_format; a conv's integers are flattened per output
    channel before packing."""
    packed = weight_format == "int4" or (weight_format == "auto" and wbits <= 4)
    return _store(ints.reshape(ints.shape[0], -1) if packed else ints, packed)


_set_child = quant._set_child  # (under every name of a module registered twice)


@normal_tensors
def export(qmodel: nn.Module, example: torch.Tensor | None = None,
           weight_format: str = "auto", input_range: tuple[float, float] | None = None,
           fuse: bool = True) -> IntModel:
    """The integer version of a calibrated fake-quantized model (see the module docstring).

    Args:
        qmodel: returned by `synq.quant.quantize_model` (or `synq.io.load_quantized`) with
            frozen activation ranges; it is not modified.
        example: an input batch used to trace which layer feeds which (its values do not
            matter); None: one random image of 64x64 pixels with the first conv's channels.
        weight_format: "auto" (5-8 bits int8, 2-4 bits packed int4), "int8", or "int4"
            (packed whatever the bits, if each row fits 16 levels).
        input_range: (lo, hi) of the model's input; the first layer then quantizes its input
            to 8 bits on this fixed range instead of each batch's own range.
        fuse: pass int8 tensors from layer to layer where the structure allows (a conv
            followed by its ReLU / ReLU6 / Hardswish quantizer, or by a residual add and such
            a quantizer, runs as one kernel with a requantizing epilogue); checked on
            `example`, else off.
    """
    if weight_format not in ("auto", "int8", "int4"):
        raise ValueError(f"weight_format must be 'auto', 'int8' or 'int4', got "
                         f"{weight_format!r}")
    identities = _check_exportable(qmodel)
    qlayers = quant.quant_layers(qmodel)
    if not qlayers:
        raise ValueError("the model has no quantized Conv2d or Linear layer")
    device = next(iter(qlayers.values())).weight.device
    if example is None:
        first = next(iter(qlayers.values()))
        c = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
        shape = (1, c, 64, 64) if isinstance(first, nn.Conv2d) else (1, c)
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    import copy
    # residual additions written in the forward (`out += identity`) become Add modules, which
    # the plan sees and fuses (synq.add_modules; the model as it is when there are none)
    model = with_add_modules(copy.deepcopy(qmodel).eval(), example)
    plan = _make_plan(model, example, identities)
    added = added_names(model)
    if added:
        plan["add_modules"] = {"names": added, "example_shape": list(example.shape)}
    first_name = next(iter(plan["layers"]))
    if input_range is not None:
        lo, hi = float(input_range[0]), float(input_range[1])
        if not lo < hi:
            raise ValueError(f"input_range must be (lo, hi) with lo < hi, got {input_range}")
        plan["input_range"] = [lo, hi]
    plan["weight_format"] = weight_format

    for name, info in plan["layers"].items():
        layer = model.get_submodule(name)
        layer._synq_name = name
        bn = model.get_submodule(info["bn"]) if info["bn"] else None
        ints, scale, bias = _fold(layer, bn)
        wbits = layer.weight_quantizer.bits
        in_scale = in_zero = None
        in_qmax = 255
        if info["input_act"] is not None:
            aq = _call_quantizers(model.get_submodule(info["input_act"]))[info["input_call"]]
            in_scale, in_zero = _act_params(aq)
            in_qmax = aq.qmax
        elif name == first_name and input_range is not None:
            lo, hi = min(plan["input_range"][0], 0.0), max(plan["input_range"][1], 0.0)
            in_scale = max((hi - lo) / 255.0, quant._EPS)
            in_zero = int(min(max(round(-lo / in_scale), 0), 255))
        if isinstance(layer, nn.Conv2d):
            w, offset = _store_as(ints, wbits, weight_format)
            new = IntConv2d(name, w, scale, bias, sk.weight_row_sums(w, ints[0].numel()),
                            offset, in_scale, in_zero, in_qmax, info["relu"], wbits,
                            layer.stride, layer.padding, layer.dilation, layer.groups,
                            layer.in_channels, layer.kernel_size)
        else:
            w, offset = _store_as(ints, wbits, weight_format)
            new = IntLinear(name, w, scale, bias, sk.weight_row_sums(w, ints.shape[1]), offset,
                            in_scale, in_zero, in_qmax, info["relu"], wbits, ints.shape[1])
        _set_child(model, name, new)
        if bn is not None:
            _set_child(model, info["bn"], nn.Identity())
    for name, info in plan["acts"].items():
        qa = model.get_submodule(name)
        scale, zero = zip(*(_act_params(q) for q in _call_quantizers(qa)))
        act = IntAct(name, info["kind"], qa.quantizer.bits, scale, zero,
                     apply_relu=info["fused_from"] is None)
        tops = act.relu6_tops()
        if tops is not None and any(t is not None for t in tops):
            act.tops = info["relu6_tops"] = tops
        _set_child(model, name, act)
    # the new modules' scales and zero points were made from Python numbers (on the CPU):
    # the integer model lives where the quantized model's layers are
    model = model.to(device)
    meta = {"format": FORMAT, "quant_config": dict(qmodel.quant_config),
            "model": getattr(qmodel, "meta", {}).get("model")}
    plan["fused"] = bool(fuse) and _fusion_works(model, plan, example)
    _set_fusion(model, plan, plan["fused"])
    return IntModel(model.eval(), _plan_json(plan), meta).eval()


def _fusion_works(model: nn.Module, plan: dict, example: torch.Tensor) -> bool:
    """Fused mode passes int8 tensors between modules, which the trace cannot prove safe for
    code it does not see (a functional op in a forward). Run the example both ways: fused
    mode is kept only if it runs and gives the unfused result (up to requantization
    rounding)."""
    import warnings
    with torch.no_grad(), sk.value_checks(False):
        _set_fusion(model, plan, False)
        want = model(example)
        _set_fusion(model, plan, True)
        try:
            got = model(example)
            ok = (isinstance(got, torch.Tensor) and got.shape == want.shape
                  and got.dtype == want.dtype
                  and float((got - want).abs().max()) <= 0.25 * float(want.abs().max()) + 1e-6)
            why = "its output differs from the unfused model's"
        except Exception as e:  # noqa: BLE001 - any failure means: do not fuse
            ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        warnings.warn(f"synq.deploy.export: fused int8 layer-to-layer mode disabled ({why}); "
                      f"the model runs with float tensors between layers", stacklevel=3)
    return ok


def _plan_json(plan: dict) -> dict:
    out = {k: v for k, v in plan.items() if k not in ("layers", "acts")}
    out["layers"] = {n: dict(i) for n, i in plan["layers"].items()}
    out["acts"] = {n: dict(i) for n, i in plan["acts"].items()}
    return out


# -- save / load -------------------------------------------------------------------------------

def save_int(model: IntModel, out_dir, model_spec: dict | None = None) -> Path:
    """Write `int_model.safetensors` and `int_model.json` into `out_dir` (atomically each).
    `model_spec` (see `synq.io.build_float_model`) defaults to the one the quantized model was
    loaded with."""
    if not isinstance(model, IntModel):
        raise TypeError(f"save_int takes an IntModel (from synq.deploy.export), got "
                        f"{type(model).__name__}")
    spec = model_spec or model.meta.get("model")
    if spec is None:
        raise ValueError("no model spec: pass model_spec (how to build the float "
                         "architecture, see synq.io.build_float_model)")
    return write_saved(out_dir, "int_model", model.model.state_dict(),
                       {**model.meta, "model": spec, "plan": model.plan})


@normal_tensors
def load_int(path, device="cpu") -> IntModel:
    """Reload a model written by `save_int` (a folder or its int_model.json)."""
    meta, state = read_saved(path, "int_model", FORMAT,
                             "synq.deploy.save_int / `synq export`", device)
    model = quant.quantize_model(build_float_model(meta["model"]), **meta["quant_config"])
    plan = meta["plan"]
    if "add_modules" in plan:  # the export's rewrite, again (the same trace, the same names)
        info = plan["add_modules"]
        model = with_add_modules(model, torch.zeros(info["example_shape"]))
        got = added_names(model)
        if got != info["names"]:
            raise ValueError(f"{path}: the model's residual additions ({got}) are not the "
                             f"exported ones ({info['names']}); was the model code changed?")
    for name, info in plan["layers"].items():
        layer = model.get_submodule(name)
        t = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        static = "in_scale" in t
        in_scale = float(t["in_scale"]) if static else None
        in_zero = int(t["in_zero"]) + 128 if static else None
        in_qmax = 255
        if static and info["input_act"] is not None:
            in_qmax = model.get_submodule(info["input_act"]).quantizer.qmax
        if isinstance(layer, nn.Conv2d):
            new = IntConv2d(name, t["weight"], t["w_scale"], t["bias"], t["w_rowsum"],
                            t.get("offset"), in_scale, in_zero, in_qmax, info["relu"],
                            layer.weight_quantizer.bits, layer.stride, layer.padding,
                            layer.dilation, layer.groups, layer.in_channels,
                            layer.kernel_size)
        else:
            new = IntLinear(name, t["weight"], t["w_scale"], t["bias"], t["w_rowsum"],
                            t.get("offset"), in_scale, in_zero, in_qmax, info["relu"],
                            layer.weight_quantizer.bits, layer.in_features)
        _set_child(model, name, new)
        if info["bn"]:
            _set_child(model, info["bn"], nn.Identity())
    for name, info in plan["acts"].items():
        qa = model.get_submodule(name)
        n = len(_call_quantizers(qa))
        _set_child(model, name, IntAct(name, info["kind"], qa.quantizer.bits, [1.0] * n,
                                       [0] * n, apply_relu=info["fused_from"] is None))
    _set_fusion(model, plan, plan.get("fused", False))
    model.load_state_dict(state, strict=True)
    for m in model.modules():   # ReLU6 tops from the loaded grids (plans before them lack them)
        if isinstance(m, IntAct) and m.kind == "relu6":
            tops = m.relu6_tops()
            m.tops = tops if any(t is not None for t in tops) else None
    meta.pop("plan")
    return IntModel(model.to(device).eval(), plan, meta).eval()
