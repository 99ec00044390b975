// Schemas of the compiled kernels, all in one place. The public ops (synq::fake_quant, ...)
// are declared in Python (synq_kernels/ops/); they pick a backend and, for the "cpu" and
// "cuda" backends, call these kernels, whose CPU and CUDA implementations are registered per
// dispatch key in csrc/cpu/ and csrc/cuda/.
#include <torch/library.h>

namespace synq {

bool compiled_with_cuda() {
#ifdef SYNQ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(synq, m) {
  m.def("_compiled_with_cuda() -> bool", &compiled_with_cuda);
  // qmin/qmax already resolved from bits and signedness; axis = -1 means per-tensor. act: an
  // activation applied to x first (0 none, 1 ReLU, 2 ReLU6), so y = fq(act(x)) and the
  // backward's dx is masked by the activation's gradient too (x: the activation's input).
  m.def("_fake_quant_fwd(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, "
        "int axis, int act=0) -> Tensor");
  m.def("_fake_quant_bwd(Tensor dy, Tensor x, Tensor scale, Tensor zero_point, int qmin, "
        "int qmax, int axis, float grad_factor, bool qparam_grads, int act=0) "
        "-> (Tensor, Tensor, Tensor)");
  // y = a_h @ x @ a_w over the last two dims; a_h, a_w: the Gaussian low-pass circulants.
  m.def("_lowpass_gaussian(Tensor x, Tensor a_h, Tensor a_w) -> Tensor");
  // x (B, C, H, W) float32: per-channel mean and biased variance over (B, H, W) (CPU only),
  // and dx of a loss given its gradients with respect to them.
  m.def("_channel_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("_channel_stats_backward(Tensor g_mean, Tensor g_var, Tensor x, Tensor mean) -> Tensor");
  // eval-mode BatchNorm of x (B, C, H, W) float32 with the running statistics, then the
  // activation act (0 none, 1 ReLU, 2 ReLU6), together with x's channel statistics as
  // _channel_stats gives them (CPU only): (y, mean, var); and dx given the gradients of y,
  // mean and var (y: the forward's output, read for the activation's mask).
  m.def("_batch_norm_stats(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, "
        "Tensor running_var, float eps, int act) -> (Tensor, Tensor, Tensor)");
  m.def("_batch_norm_stats_backward(Tensor g_y, Tensor g_mean, Tensor g_var, Tensor x, "
        "Tensor y, Tensor mean, Tensor weight, Tensor running_var, float eps, int act) "
        "-> Tensor");
  // a (M, K) @ b (N, K).T in int32; a packed int4 of a_signed-ness or int8, b packed signed
  // int4 or int8 (packed rows: ceil(K/2) bytes, element 2i in the low nibble of byte i).
  m.def("_int_mm(Tensor a, Tensor b, int k, bool a_packed, bool a_signed, bool b_packed) "
        "-> Tensor");
  // x (M, K) int8; x_scale (M,) float32, x_zero (M,) int32; w (N, K) int8 or packed int4;
  // w_scale (N,) float32; w_rowsum (N,) int32; bias (N,) float32.
  m.def("_quantized_linear(Tensor x, Tensor x_scale, Tensor x_zero, Tensor w, Tensor w_scale, "
        "Tensor w_rowsum, Tensor? bias, bool relu, ScalarType out_dtype, bool w_packed) "
        "-> Tensor");
  // x (B, C, H, W) int8 (any strides); x_scale / x_zero one element; w (Cout, C/g, kh, kw).
  m.def("_quantized_conv2d(Tensor x, Tensor x_scale, Tensor x_zero, Tensor w, "
        "Tensor w_scale, Tensor w_rowsum, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool relu, ScalarType out_dtype) -> Tensor");
  // w (Cout, C/g, kh, kw) int8 -> int8 (groups, ceil(Cout/g/16), kh, kw, ceil(C/g/4), 64),
  // the CPU conv kernel's layout (16 output channels x channel quads).
  m.def("_conv2d_prepack(Tensor w, int groups) -> Tensor");
  // x float32 (any layout; dense keeps it) -> (q int8 like x, scale float32, zero int32, both
  // of shape (1,) * x.dim()): 8-bit asymmetric per-tensor quantization over x's own range
  // widened to hold 0 (synq.deploy._quantize_dynamic's steps; scale at least eps).
  m.def("_quantize_dynamic(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  // x (M, K) float32 (any strides) -> (q (M, K) int8 contiguous, scale (M, 1) float32, zero
  // (M, 1) int32): the same per row (a linear layer's input).
  m.def("_quantize_dynamic_rows(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  // x float32 (any layout; dense keeps it) -> int8 like x: clamp(round(f(x') / scale) +
  // zero, lo, hi), x' = x * mul[c] + add[c] (per channel, dim 1; x itself without mul / add),
  // f the identity (act 0), Hardswish (act 1) or ReLU (act 2); scale, zero one value each
  // (zero in the int8 domain); NaN gives 0 (synq.deploy._quantize_static's steps).
  m.def("_quantize_static(Tensor x, Tensor scale, Tensor zero, int lo, int hi, int act=0, "
        "Tensor? mul=None, Tensor? add=None) -> Tensor");
  // x (B, C, H, W) int8 (any strides): max pooling with the geometry resolved by
  // synq_kernels.reference.pool.pool_geometry (two values each; out_size: (OH, OW)). Padding
  // never wins. Output channels-last for a channels-last input, else contiguous.
  m.def("_max_pool2d_int8(Tensor x, int[] kernel, int[] stride, int[] padding, "
        "int[] dilation, int[] out_size) -> Tensor");
  // x (B, C, H, W) int8 or uint8 (any strides), x_zero in x's own range; w_packed from
  // _conv2d_prepack; w_scale (Cout,) float32. Output channels-last (B, Cout, OH, OW).
  // y = float(acc) * (x_scale * w_scale) + bias, + residual (float32, or int8 / uint8 with
  // residual_scale / residual_zero), ReLU (or Hardswish: hardswish, F.hardswish's steps);
  // out_dtype float32 / float16 / bfloat16, or int8 /
  // uint8: clamp(round(y * (1 / out_scale)) + out_zero, lowest, out_max), out_max defaulting
  // to the dtype's highest value (a lower one for grids narrower than 8 bits). w_offset
  // (Cout,) int32: per-row offsets o of weights packed as w - o (rows beyond int8).
  m.def("_quantized_conv2d_packed(Tensor x, Tensor x_scale, Tensor x_zero, Tensor w_packed, "
        "Tensor w_scale, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, "
        "bool relu, ScalarType out_dtype, Tensor? out_scale, Tensor? out_zero, "
        "Tensor? residual, Tensor? residual_scale, Tensor? residual_zero, int? out_max=None, "
        "Tensor? w_offset=None, bool hardswish=False) -> Tensor");
}

}  // namespace synq
