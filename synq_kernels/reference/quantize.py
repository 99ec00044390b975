"""8-bit quantization in plain PyTorch ops: dynamic, per tensor or per row (the exporter's
run-time quantization of a layer input that no activation quantizer fixed, synq.deploy), and
static, on a given grid (an activation quantizer's)."""
import torch
import torch.nn.functional as F


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int,
                    act: int = 0, mul: torch.Tensor | None = None,
                    add: torch.Tensor | None = None) -> torch.Tensor:
    """int8 of clamp(round(f(x') / scale) + zero, lo, hi): x' = x * mul[c] + add[c] per channel
    c (dim 1; an eval-mode BatchNorm), or x without mul / add; f = identity (act 0), Hardswish
    (act 1) or ReLU (act 2); scale, zero: one value each (zero in the int8 domain, any dtype);
    NaN gives 0."""
    if (mul is None) != (add is None):
        raise ValueError("give mul and add together, or neither")
    if mul is not None:
        if x.dim() < 2 or mul.shape != (x.shape[1],) or add.shape != (x.shape[1],):
            raise ValueError(f"mul and add must have shape ({x.shape[1] if x.dim() > 1 else '?'},)"
                             f" (x's channels, dim 1), got {tuple(mul.shape)} and "
                             f"{tuple(add.shape)} for x of shape {tuple(x.shape)}")
        view = (1, -1) + (1,) * (x.dim() - 2)
        x = x * mul.reshape(view) + add.reshape(view)
    if act == 1:
        x = F.hardswish(x)
    elif act == 2:
        x = torch.relu(x)
    elif act != 0:
        raise ValueError(f"act must be 0 (none), 1 (Hardswish) or 2 (ReLU), got {act!r}")
    t = torch.div(x, scale)
    t.round_().add_(zero).clamp_(lo, hi)
    return t.to(torch.int8)


def quantize_dynamic(x: torch.Tensor, eps: float):
    """x float32 -> (q int8 like x, scale float32, zero int32; both of shape (1,) * x.dim()):
    the range of x widened to hold 0 on 256 levels, zero in the int8 domain.

        lo = min(min(x), 0), hi = max(max(x), 0), scale = max((hi - lo) / 255, eps)
        zero = clamp(round(-lo / scale), 0, 255) - 128
        q = clamp(round(x / scale) + zero, -128, 127)        (round half to even)
    """
    one = (1,) * x.dim()
    lo, hi = (t.reshape(one) for t in torch.aminmax(x))
    return _on_range(x, lo, hi, eps)


def _on_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: float):
    """x on the 8-bit grid of the range (lo, hi) (keepdim-reduced), widened to hold 0."""
    lo, hi = lo.float().clamp_(max=0.0), hi.float().clamp_(min=0.0)
    scale = ((hi - lo) / 255.0).clamp_(min=eps)
    zero = torch.round(-lo / scale).clamp_(0, 255) - 128.0
    t = torch.div(x.float(), scale)
    t.round_().add_(zero).clamp_(-128, 127)
    return t.to(torch.int8), scale, zero.to(torch.int32)


def quantize_dynamic_rows(x: torch.Tensor, eps: float):
    """x (M, K) float32 -> (q (M, K) int8 contiguous, scale (M, 1) float32, zero (M, 1)
    int32): `quantize_dynamic` of each row on its own grid (a linear layer's input)."""
    q, scale, zero = _on_range(x, torch.amin(x, dim=1, keepdim=True),
                               torch.amax(x, dim=1, keepdim=True), eps)
    return q.contiguous(), scale, zero
