"""fake_quant: argument errors, backend choice, custom-op registration (opcheck),
torch.compile, and CUDA-only behaviour (graphs) when a GPU is present."""
import math

import pytest
import torch

import synq_kernels as sk
from synq_kernels import backends

CPU_BACKENDS = sk.available_backends("fake_quant", "cpu")
GPU = torch.cuda.is_available()


def args(n=10, c=None):
    x = torch.randn(n, 4)
    shape = () if c is None else (c,)
    return x, torch.full(shape, 0.1), torch.zeros(shape)


@pytest.mark.parametrize("bits", [1, 9, 0, -3])
def test_bits_out_of_range(bits):
    x, s, z = args()
    with pytest.raises(ValueError, match=r"bits must be from 2 to 8, got " + str(bits)):
        sk.fake_quant(x, s, z, bits)


@pytest.mark.parametrize("bits", [4.0, "4", True])
def test_bits_wrong_type(bits):
    x, s, z = args()
    with pytest.raises(TypeError, match="bits must be an int"):
        sk.fake_quant(x, s, z, bits)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("bad", [0.0, -0.5, math.inf, math.nan])
def test_bad_scale_values(backend, bad):
    x = torch.randn(8, 3)
    s = torch.tensor([0.1, bad, 0.2])
    with pytest.raises(ValueError, match="scale must be positive and finite.*index 1"):
        sk.fake_quant(x, s, torch.zeros(3), 4, axis=1, backend=backend)


def test_bad_scale_skipped_when_checks_off():
    x = torch.randn(8, 3)
    with sk.value_checks(False):
        sk.fake_quant(x, torch.tensor([0.1, 0.0, 0.2]), torch.zeros(3), 4, axis=1,
                      backend="reference")
    with pytest.raises(ValueError, match=r"scale must be positive and finite everywhere, got "
                                         r"0\.0 at index 1"):
        sk.fake_quant(x, torch.tensor([0.1, 0.0, 0.2]), torch.zeros(3), 4, axis=1)


@pytest.mark.parametrize("axis,shape,name", [(None, (3,), "scale"), (1, (3,), "scale"),
                                             (0, (4,), "scale")])
def test_wrong_qparam_size(axis, shape, name):
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=f"{name} must hold"):
        sk.fake_quant(x, torch.full(shape, 0.1), torch.zeros(shape), 4, axis=axis)


def test_wrong_zero_point_size():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="zero_point must hold 4"):
        sk.fake_quant(x, torch.full((4,), 0.1), torch.zeros(3), 4, axis=1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.float64])
def test_bad_x_dtype(dtype):
    x = torch.ones(5, dtype=dtype)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        sk.fake_quant(x, 0.1, 0.0, 4)


def test_integer_scale_tensor_rejected():
    with pytest.raises(TypeError, match="scale must be a floating tensor"):
        sk.fake_quant(torch.randn(5), torch.tensor(1), 0.0, 4)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_range(axis):
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=f"axis {axis} is out of range"):
        sk.fake_quant(x, torch.ones(5), torch.zeros(5), 4, axis=axis)


def test_negative_axis_equals_positive():
    x = torch.randn(6, 5)
    s, z = torch.rand(5) * 0.1 + 0.05, torch.zeros(5)
    assert torch.equal(sk.fake_quant(x, s, z, 4, axis=-1), sk.fake_quant(x, s, z, 4, axis=1))


def test_tensors_on_different_devices():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="one device.*scale on meta"):
        sk.fake_quant(x, torch.tensor(0.1, device="meta"), torch.tensor(0.0), 4)


def test_grad_factor_must_be_finite():
    with pytest.raises(ValueError, match="grad_factor must be a finite number"):
        sk.fake_quant(torch.randn(4), 0.1, 0.0, 4, grad_factor=float("nan"))


def test_unknown_backend():
    with pytest.raises(ValueError, match="'fast' is not a backend"):
        sk.fake_quant(torch.randn(4), 0.1, 0.0, 4, backend="fast")


def test_cuda_backend_on_cpu_tensor():
    with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors"):
        sk.fake_quant(torch.randn(4), 0.1, 0.0, 4, backend="cuda")


def test_triton_on_cpu_names_an_interpreter_that_cannot_run_it(monkeypatch):
    # Triton 3.6's interpreter fails on the kernels' loops under NumPy 2.4 (its 3.8 does not):
    # the backend is then unavailable on CPU tensors, with the probe's reason, instead of an
    # InterpreterError from inside a kernel
    pytest.importorskip("triton")
    import synq_kernels.triton as skt
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(skt, "_INTERPRETER_PROBLEM", ["Triton 0.0's interpreter cannot run"])
    monkeypatch.setattr(backends, "_DEFAULT_CACHE", {})
    assert "triton" not in sk.available_backends("fake_quant", "cpu")
    with pytest.raises(RuntimeError, match="Triton 0.0's interpreter cannot run"):
        sk.fake_quant(torch.randn(4), 0.1, 0.0, 4, backend="triton")
    monkeypatch.setattr(skt, "_INTERPRETER_PROBLEM", [])
    assert skt.interpreter_problem() == skt._probe()   # probed afresh, and cached


def test_default_backend_is_fastest_available(monkeypatch):
    monkeypatch.delenv("SYNQ_BACKEND", raising=False)
    want = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    assert backends.resolve("fake_quant", torch.device("cpu"), None) == want
    # available_backends lists the preference order (cpu, reference, then the others), so its
    # first entry is the default
    assert CPU_BACKENDS[0] == want
    pref = [b for b in ("cpu", "reference") if b in CPU_BACKENDS]
    assert "reference" in pref and CPU_BACKENDS[:len(pref)] == pref


def test_env_var_sets_default(monkeypatch):
    monkeypatch.setenv("SYNQ_BACKEND", "reference")
    assert backends.resolve("fake_quant", torch.device("cpu"), None) == "reference"
    monkeypatch.setenv("SYNQ_BACKEND", "nope")
    with pytest.raises(ValueError, match="SYNQ_BACKEND='nope'"):
        sk.fake_quant(torch.randn(4), 0.1, 0.0, 4)


def test_compiled_kernels_are_built():
    """CI builds the extension; a missing _C there is a build failure, not a skip."""
    from synq_kernels import _ext
    assert _ext.load_error() is None, _ext.load_error()


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("axis, act", [(None, 0), (1, 0), (None, 1), (1, 2)])
def test_opcheck(backend, axis, act):
    c = None if axis is None else 6
    x = torch.randn(5, 6, 3, requires_grad=True)
    shape = () if c is None else (c,)
    s = (torch.rand(shape) * 0.2 + 0.05).requires_grad_()
    z = (torch.rand(shape) * 10).requires_grad_()
    ax = -1 if axis is None else axis
    torch.library.opcheck(torch.ops.synq.fake_quant.default,
                          (x, s, z, 0, 15, ax, 0.5, act, backend))
    dy = torch.randn(5, 6, 3)
    torch.library.opcheck(torch.ops.synq.fake_quant_backward.default,
                          (dy, x.detach(), s.detach(), z.detach(), 0, 15, ax, 0.5, True,
                           act, backend))
    # channels-last 4-D input: outputs keep the layout (the fake kernels say so too)
    x4 = torch.randn(2, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.synq.fake_quant.default,
                          (x4.requires_grad_(), s, z, 0, 15, ax, 0.5, act, backend))
    torch.library.opcheck(torch.ops.synq.fake_quant_backward.default,
                          (torch.randn(2, 6, 3, 4), x4.detach(), s.detach(), z.detach(), 0, 15,
                           ax, 0.5, True, act, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("axis, channels_last", [(None, False), (1, True), (0, False)])
def test_eager_calls_skip_the_op_layer_with_the_same_gradients(backend, axis, channels_last):
    """An eager call runs the op's forward and backward through a plain autograd Function
    (the custom-op layer cost most of a small call's host time); under a dispatch mode the
    custom op runs. Outputs and the gradients of x, scale and zero point agree bit for bit."""
    from op_spy import OpSpy

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 6, 5, 4, generator=g) * 3
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    n = 1 if axis is None else x0.shape[axis]
    s0 = torch.rand(n, generator=g) * 0.2 + 0.05
    z0 = torch.rand(n, generator=g) * 10 - 2

    def run(spy=None):
        x, s, z = (t.clone().requires_grad_(True) for t in (x0, s0, z0))
        y = sk.fake_quant(x, s, z, 4, axis=axis, grad_factor=0.3, backend=backend)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        return y, x.grad, s.grad, z.grad

    direct = run()
    assert type(direct[0].grad_fn).__name__ == "_DirectBackward"
    with OpSpy() as spy:
        seen = run()
    assert "synq.fake_quant.default" in spy.ops and "synq.fake_quant_backward.default" in spy.ops
    for a, b in zip(direct, seen):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    def step(x, s, z):
        return (sk.fake_quant(x * 2, s, z, 4, axis=0) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(8, 16, requires_grad=True)
    s = (torch.rand(8) * 0.2 + 0.1).requires_grad_()
    z = torch.full((8,), 7.0, requires_grad=True)
    out = compiled(x, s, z)
    out.backward()
    grads = [t.grad.clone() for t in (x, s, z)]
    for t in (x, s, z):
        t.grad = None
    want = step(x, s, z)
    want.backward()
    torch.testing.assert_close(out, want)
    for g, t in zip(grads, (x, s, z)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.skipif(not GPU, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton")
                                     if GPU and b in sk.available_backends("fake_quant", "cuda")])
def test_cuda_graph_capture(backend):
    """Forward and backward run without host synchronisation, so they can be captured."""
    x = torch.randn(64, 32, device="cuda", requires_grad=True)
    s = torch.rand(32, device="cuda").add_(0.05).requires_grad_()
    z = torch.full((32,), 3.0, device="cuda", requires_grad=True)
    dy = torch.randn(64, 32, device="cuda")

    def run():
        y = sk.fake_quant(x, s, z, 4, axis=1, backend=backend)
        return torch.autograd.grad(y, (x, s, z), dy)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up outside the capture (kernel compilation, allocator)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    want = run()
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_python_only_install_runs_reference(tmp_path):
    """Without the compiled extension synq_kernels imports, runs the reference backend, and
    a request for a compiled backend says how to build it."""
    import os
    import shutil
    import subprocess
    import sys
    src = os.path.dirname(sk.__file__)
    shutil.copytree(src, tmp_path / "synq_kernels",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
sys.path.insert(0, {str(tmp_path)!r})
import torch, synq_kernels as sk
assert sk.__file__.startswith({str(tmp_path)!r}), sk.__file__
assert sk.available_backends('fake_quant', 'cpu') == ['reference']
x = torch.randn(9, requires_grad=True)
sk.fake_quant(x, 0.1, 3.0, 4).sum().backward()
try:
    sk.fake_quant(x, 0.1, 3.0, 4, backend='cpu')
except RuntimeError as e:
    assert 'not built' in str(e) and 'pip install' in str(e), e
    print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
