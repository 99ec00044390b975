"""Triton kernels. Importing a module here registers its "triton" backend; on CPU tensors the
kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before import)."""
from __future__ import annotations

_INTERPRETER_PROBLEM: list = []     # [None or the reason], filled on first use


def has_fma(device) -> bool:
    """Whether kernels on `device` run compiled, with a fused multiply-add rounded once (a
    GPU), rather than under the interpreter (NumPy: a multiply and an add, rounded twice).
    The requantizing kernels (conv_tap, quantize) pick their division by it: two fused
    multiply-adds on a reciprocal, or tl.math.div_rn."""
    return device.type != "cpu"


def interpreter_problem() -> str | None:
    """None if the Triton interpreter runs the loop form synq's kernels use (a `range` over a
    run-time bound), else why not. Triton 3.6's interpreter fails on it under NumPy 2.4
    ("only 0-dimensional arrays can be converted to Python scalars"), 3.8's does not. Checked
    once per process with a one-program kernel; GPU compiles are not affected."""
    if not _INTERPRETER_PROBLEM:
        _INTERPRETER_PROBLEM.append(_probe())
    return _INTERPRETER_PROBLEM[0]


def _probe() -> str | None:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_probe(out, n):
        acc = tl.zeros((1,), tl.float32)
        for _ in range(0, n, 2):
            acc += 1.0
        tl.store(out + tl.arange(0, 1), acc)

    got = torch.zeros(1)
    try:
        _loop_probe[(1,)](got, 3)
    except Exception as e:  # noqa: BLE001 - any failure means: this interpreter cannot run us
        return (f"Triton {triton.__version__}'s interpreter cannot run synq's kernels here "
                f"({type(e).__name__}: {e}); Triton >= 3.8 can (GPU compiles are not affected)")
    if float(got[0]) != 2.0:
        return f"Triton {triton.__version__}'s interpreter computed a loop wrongly"
    return None
