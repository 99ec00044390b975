"""fake_quant forward and forward+backward against PyTorch's fake-quant ops.

Byte counts (fp32): forward reads x and writes y, 8 B/element; backward reads x and dy and
writes dx, 12 B/element; forward+backward 20 B/element. "copy %" compares the achieved rate
with a plain copy of the same tensor (8 B/element) measured in the same run.

Per-tensor rows also time a quantized activation's ReLU: torch.relu then fake_quant against
fake_quant(activation="relu"), the same backend ("vs relu then fq": unfused / fused time).

    python -m benchmarks.bench_fake_quant [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import contextlib

import torch

import synq_kernels as sk

from .common import bench_main, markdown_table, time_fn, write_results

CHANNELS = 64


def _torch_ops(x, s, z, zi, axis):
    """PyTorch baselines: (name, forward, forward+backward or None)."""
    if axis is None:
        return [
            ("torch.fake_quantize_per_tensor_affine",
             lambda: torch.fake_quantize_per_tensor_affine(x, float(s.detach()), int(zi), 0, 15), None),
            ("torch._fake_quantize_learnable_per_tensor_affine",
             lambda: torch._fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 15, 1.0),
             lambda: torch._fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 15, 1.0)),
        ]
    return [
        ("torch.fake_quantize_per_channel_affine",
         lambda: torch.fake_quantize_per_channel_affine(x, s.detach(), zi, 0, 0, 15), None),
        ("torch._fake_quantize_learnable_per_channel_affine",
         lambda: torch._fake_quantize_learnable_per_channel_affine(x, s, z, 0, 0, 15, 1.0),
         lambda: torch._fake_quantize_learnable_per_channel_affine(x, s, z, 0, 0, 15, 1.0)),
    ]


def _fwd_bwd(f, x, s, z, dy):
    def run():
        y = f()
        return torch.autograd.grad(y, (x, s, z), dy)
    return run


def run(quick: bool = False, device: str = "cpu", out_dir: str | None = None,
        backends: list[str] | None = None) -> list[dict]:
    sizes = [1 << 16, 1 << 20, 1 << 24] if quick else [1 << 16, 1 << 20, 1 << 24, 1 << 26]
    if backends is None:
        backends = [b for b in sk.available_backends("fake_quant", device)
                    if not (device == "cpu" and b == "triton")]
    rows = []
    for n in sizes:
        x = torch.randn(CHANNELS, n // CHANNELS, device=device).requires_grad_()
        dy = torch.randn_like(x)
        copy_dst = torch.empty_like(x)
        t_copy = time_fn(lambda: copy_dst.copy_(x.detach()), device)
        copy_gbs = 8 * n / t_copy / 1e9
        for axis in (None, 0):
            shape = () if axis is None else (CHANNELS,)
            s = torch.full(shape, 0.05, device=device, requires_grad=True)
            z = torch.full(shape, 7.0, device=device, requires_grad=True)
            zi = z.detach().to(torch.int32)
            kind = "per-tensor" if axis is None else "per-channel"
            base = {}
            for name, fwd, fb in _torch_ops(x, s.reshape(1) if axis is None else s,
                                            z.reshape(1) if axis is None else z, zi, axis):
                t_f = time_fn(fwd, device)
                t_fb = time_fn(_fwd_bwd(fb, x, s, z, dy), device) if fb else None
                if fb:
                    base = {"fwd": t_f, "fwd+bwd": t_fb}
                elif "fwd" not in base:
                    base["fwd_plain"] = t_f
                rows.append(_row(n, kind, name, t_f, t_fb, copy_gbs, None, None))
            first = len(rows) - 2
            # On a GPU also without the scale's value check, which waits for the GPU at
            # every call (synq.finetune turns it off: sk.value_checks(False)); torch's ops
            # check nothing.
            for b, checked in [(b, c) for b in backends
                               for c in ((True, False) if device == "cuda" else (True,))]:
                def fwd(b=b):
                    return sk.fake_quant(x, s, z, 4, axis=axis, backend=b)
                with contextlib.ExitStack() as stack:
                    if not checked:
                        stack.enter_context(sk.value_checks(False))
                    with torch.no_grad():
                        t_f = time_fn(fwd, device)
                    t_fb = time_fn(_fwd_bwd(fwd, x, s, z, dy), device)
                rows.append(_row(n, kind, f"synq[{b}]" + ("" if checked else " unchecked"),
                                 t_f, t_fb, copy_gbs, base["fwd"] / t_f,
                                 base["fwd+bwd"] / t_fb))
            if axis is None:
                rows += _relu_rows(n, x, s, z, dy, backends, copy_gbs, device)
            print(markdown_table(rows[first:]), flush=True)
    if out_dir:
        write_results("fake_quant", rows, device, out_dir,
                      notes="speedup = PyTorch learnable op time / synq time, same tensor, "
                            "same run. 4 bits, unsigned; per-channel along dim 0 of a "
                            f"({CHANNELS}, n/{CHANNELS}) tensor. 'vs relu then fq': "
                            "torch.relu then fake_quant over fake_quant(activation='relu'), "
                            "same backend, time ratios (forward / forward+backward).")
    return rows


def _relu_rows(n, x, s, z, dy, backends, copy_gbs, device):
    rows = []
    with sk.value_checks(device != "cuda"):  # as synq.finetune runs on a GPU
        for b in (b for b in backends if b != "reference"):  # the kernels' fusion only
            def apart(b=b):
                return sk.fake_quant(torch.relu(x), s, z, 4, backend=b)

            def fused(b=b):
                return sk.fake_quant(x, s, z, 4, activation="relu", backend=b)
            t = {}
            for name, f in (("apart", apart), ("fused", fused)):
                with torch.no_grad():
                    t_f = time_fn(f, device)
                t[name] = (t_f, time_fn(_fwd_bwd(f, x, s, z, dy), device))
            rows.append(_row(n, "per-tensor", f"torch.relu, then synq[{b}]", *t["apart"],
                             copy_gbs, None, None))
            rows.append(_row(n, "per-tensor", f"synq[{b}] relu fused", *t["fused"], copy_gbs,
                             None, None, vs_apart=(t["apart"][0] / t["fused"][0],
                                                   t["apart"][1] / t["fused"][1])))
    return rows


def _row(n, kind, impl, t_f, t_fb, copy_gbs, sp_f, sp_fb, vs_apart=None):
    return {
        "elements": n, "quant": kind, "impl": impl,
        "fwd_ms": t_f * 1e3, "fwd_GB/s": 8 * n / t_f / 1e9,
        "fwd+bwd_ms": t_fb * 1e3 if t_fb else "",
        "fwd+bwd_GB/s": 20 * n / t_fb / 1e9 if t_fb else "",
        "fwd+bwd_copy_%": 100 * (20 * n / t_fb / 1e9) / copy_gbs if t_fb else "",
        "speedup_fwd": sp_f if sp_f else "", "speedup_fwd+bwd": sp_fb if sp_fb else "",
        "vs relu then fq (fwd / fwd+bwd)": (f"{vs_apart[0]:.2f}x / {vs_apart[1]:.2f}x"
                                            if vs_apart else ""),
    }


def main(argv=None):
    bench_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
