"""synq.replay (recorded op sequences) and its use by the exported IntModel: replayed results
must equal eager ones bit for bit, calls that depend on their input's values in Python must be
refused, and recordings must follow weight changes."""
import contextlib

import pytest
import torch

from synq import replay
from synq.deploy import export
from synq.models import mobilenet_v2, resnet18, resnet20
from synq.quant import calibrate, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


from synq_kernels import _ext

compiled = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason=str(_ext.load_error()))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))


def _replayed(fn, x, *others):
    """fn recorded on x, then replayed on x and on each of `others` against eager calls, by
    the C++ plan (where built) and by the Python loop."""
    out, rec, why = replay.record(fn, x)
    assert rec is not None, why
    assert _same(out, fn(x))
    assert (rec.plan is not None) == _ext.has_cpu_kernels()
    py = replay.Recording(rec.steps, rec.n_slots, rec.result, compiled=False)
    assert py.plan is None
    for y in (x, *others):
        want = fn(y)
        assert _same(rec(y), want) and _same(py(y), want)
    return rec


def test_replays_multi_output_ops_lists_and_constants():
    w = torch.randn(5, 7)
    scale = torch.tensor([0.5])

    def fn(x):
        lo, hi = torch.aminmax(x, dim=1, keepdim=True)     # two outputs
        y = torch.cat([x - lo, hi.expand(-1, 7)], 0)       # a list argument
        y = y @ w.T * scale.reshape(()) + w.sum()           # constants, folded w.sum()
        return y.clamp_(min=0.0)                            # in place on an intermediate

    rec = _replayed(fn, torch.randn(3, 7), torch.randn(3, 7))
    ops = [str(st.op) for st in rec.steps]
    assert "aten.aminmax.default" in ops and "aten.cat.default" in ops
    assert not any(op.startswith("aten.sum") for op in ops)       # folded, not replayed


def test_replays_list_outputs_kwargs_numbers_and_in_place_ops():
    def fn(x):
        a, b, c = torch.split(x * 2, [1, 2, 3], dim=1)     # a list of outputs
        y = torch.sum(torch.cat((c, b, a), dim=1), dim=0, keepdim=True)   # kwargs
        y = y + 1                                           # a number as a tensor
        z = x.clone()
        z[:, 0] = y[0, 0]                                   # in place, through a view
        return {"y": y, "parts": (a, c), "z": z.relu_()}

    rec = _replayed(fn, torch.randn(4, 6), torch.randn(4, 6))
    assert any(str(st.op) == "aten.split_with_sizes.default" for st in rec.steps)


@compiled
def test_plan_guard_follows_in_place_changes():
    w = torch.randn(3, 3)
    for build in (True, False):
        _, rec, _ = replay.record(lambda x: x @ w, torch.randn(2, 3))
        if not build:
            rec = replay.Recording(rec.steps, rec.n_slots, rec.result, compiled=False)
        rec.guard([w])
        y = torch.randn(2, 3)
        assert torch.equal(rec.run_if_current(y), y @ w)
        w.add_(1.0)
        assert rec.run_if_current(y) is replay.STALE
        assert torch.equal(rec(y), y @ w)             # unguarded: runs on the new w


@compiled
def test_plan_raises_the_ops_errors():
    """An op's error inside the C++ plan (here: an input of another width than recorded,
    which IntModel never passes) comes back as a RuntimeError, and the plan stays usable."""
    w = torch.randn(3, 3)
    _, rec, _ = replay.record(lambda x: (x @ w).relu(), torch.randn(2, 3))
    assert rec.plan is not None
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        rec(torch.randn(2, 5))
    y = torch.randn(2, 3)
    assert torch.equal(rec(y), (y @ w).relu())


def test_plan_build_failure_falls_back_to_python(monkeypatch):
    """A plan that cannot be built (here: a step naming an op the dispatcher does not know)
    warns, and the recording replays in Python."""
    real = replay._step_spec

    def bogus(st):
        spec = real(st)
        return None if spec is None else ("synq::no_such_op", "", *spec[2:])

    monkeypatch.setattr(replay, "_step_spec", bogus)
    x = torch.randn(3)
    with pytest.warns(RuntimeWarning, match="replays in Python") if _ext.has_cpu_kernels() \
            else contextlib.nullcontext():
        _, rec, _ = replay.record(lambda t: t * 2 + 1, x)
    assert rec.plan is None
    assert torch.equal(rec(x), x * 2 + 1)


def test_steps_the_plan_cannot_run_stay_in_python():
    """A slot in a non-Tensor argument (here a Scalar) cannot be filled on the C++ stack."""
    st = replay._Step(torch.ops.aten.add.Scalar, (replay._Slot(0), replay._Slot(1)), {}, 2)
    assert replay._step_spec(st) is None
    st = replay._Step(torch.ops.aten.add.Tensor, (replay._Slot(0), replay._Slot(1)), {}, 2)
    assert replay._step_spec(st) is not None


def test_constants_by_reference_folded_values_frozen():
    """A constant argument is held by reference (in-place changes show); a value computed
    from constants only is kept as recorded (IntModel re-records when weights change)."""
    w = torch.randn(4, 3)
    _, rec, _ = replay.record(lambda x: x @ w.T + w.sum(), torch.randn(2, 3))
    old_sum = w.sum()
    w.mul_(2.0)
    y = torch.randn(2, 3)
    assert torch.equal(rec(y), y @ w.T + old_sum)


def test_frees_every_intermediate_after_its_last_use():
    def fn(x):
        a = x + 1
        b = a * 2
        c = b - a
        return c.sum(1), c

    out, rec, _ = replay.record(fn, torch.randn(4, 3))
    freed = {s for st in rec.steps for s in st.free}
    returned = {leaf.i for leaf in rec.result if isinstance(leaf, replay._Slot)}
    produced = {st.outs for st in rec.steps}
    assert freed == produced - returned - {0} and freed


@pytest.mark.parametrize("fn, reason", [
    (lambda x: x * 2 if bool(x.sum() > 0) else x - 1, "reads an input-derived value"),
    (lambda x: x + int(x.argmax()), "reads an input-derived value"),
    (lambda x: x * 2 if (x + 1).tolist()[0] > 0 else x - 1, "Tensor.tolist reads"),
    (lambda x: x * float((x * 3).numpy().max()), "Tensor.numpy reads"),
])
def test_refuses_value_dependent_python(fn, reason):
    x = torch.randn(6)
    out, rec, why = replay.record(fn, x)
    assert rec is None and reason in why
    assert torch.equal(out, fn(x))


def test_reading_constants_into_python_is_recorded():
    w = torch.randn(3)
    rec = _replayed(lambda x: x * w.tolist()[0] + float(w.numpy().sum()), torch.randn(3),
                    torch.randn(3))
    assert rec is not None


def test_refuses_writing_into_a_constant():
    buf = torch.zeros(4)
    out, rec, why = replay.record(lambda x: buf.add_(x) * 1.0, torch.ones(4))
    assert rec is None and "writes an input-derived value into a constant" in why


def _export(model, bits, shape, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(8, *shape, generator=g)
    return export(calibrate(quantize_model(model.eval(), bits, bits, **kw), [calib]),
                  example=calib[:1])


@pytest.mark.parametrize("build, shape, bits", [
    (lambda: resnet20(num_classes=10, in_channels=1), (1, 20, 20), 4),
    (lambda: resnet20(num_classes=10, in_channels=1), (1, 20, 20), 8),
    (lambda: resnet18(num_classes=7), (3, 36, 36), 8),
    (lambda: mobilenet_v2(num_classes=7), (3, 32, 32), 4),
])
def test_int_model_replay_equals_eager(build, shape, bits):
    torch.manual_seed(0)
    im = _export(build(), bits, shape)
    for b in (1, 3):
        x = torch.randn(b, *shape)
        want = im.model(x)                  # eager, no recording
        outs = [im(x) for _ in range(3)]    # warm, record, replay
        assert all(torch.equal(o, want) for o in outs)
        rec = im._recordings[replay.input_key(x)][0]
        assert isinstance(rec, replay.Recording)
        assert (rec.plan is not None) == _ext.has_cpu_kernels()
        py = replay.Recording(rec.steps, rec.n_slots, rec.result, compiled=False)
        assert torch.equal(py(x), want)
        y = torch.randn(b, *shape)          # new values, same shape
        assert torch.equal(im(y), im.model(y))
    x = torch.randn(2, *shape).contiguous(memory_format=torch.channels_last)
    assert torch.equal(im(x), im(x)) and torch.equal(im(x), im.model(x))


def test_int_model_replay_follows_weight_changes_and_backend():
    shape = (1, 16, 16)
    ims = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        ims.append(_export(resnet20(num_classes=10, in_channels=1), 8, shape, seed,
                           symmetric_weights=True))
    a, b = ims
    x = torch.randn(2, *shape)
    before = [a(x) for _ in range(3)][-1]
    assert isinstance(a._recordings[replay.input_key(x)][0], replay.Recording)
    a.load_state_dict(b.state_dict())       # in place: versions change
    want = b.model(x)
    assert not torch.equal(before, want)
    assert all(torch.equal(a(x), want) for _ in range(3))
    a.set_backend("reference")
    assert a._recordings == {}
    assert all(torch.equal(a(x), a.model(x)) for _ in range(3))
    a.set_backend(None)
    a(x), a(x)
    a.to(torch.float32)
    assert a._recordings == {}


class _Counting(torch.nn.Module):
    """A forward that changes its own buffer in place with a constant-only op (folded by the
    recording, not replayed)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x * self.calls


def test_int_model_guard_reads_versions_from_before_the_recorded_call():
    from synq.deploy import IntModel
    im, x = IntModel(_Counting(), {}, {}), torch.ones(2)
    assert [im(x)[0].item() for _ in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]


class _Buffered(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.register_buffer("w", torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return (x @ self.w).relu()


def test_int_model_load_state_dict_swapping_tensors():
    """load_state_dict under set_swap_module_params_on_conversion swaps the buffers'
    tensors, which refuses tensors held elsewhere: the recordings (whose C++ plan holds the
    weights) are dropped first. (An exported model's nn.Parameters cannot be swapped in either
    case: torch refuses parameters that do not require grad.)"""
    from synq.deploy import IntModel
    im, other = IntModel(_Buffered(0), {}, {}), _Buffered(1)
    x = torch.randn(2, 3)
    [im(x) for _ in range(3)]
    assert im._recordings
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        im.load_state_dict({"model." + k: v for k, v in other.state_dict().items()})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
    assert all(torch.equal(im(x), other(x)) for _ in range(3))


def test_int_model_replay_off_and_bounded():
    im = _export(resnet20(num_classes=10, in_channels=1), 8, (1, 12, 12))
    im.replay = False
    x = torch.randn(1, 1, 12, 12)
    im(x), im(x)
    assert im._recordings == {}
    im.replay = True
    for h in range(12, 12 + im.MAX_RECORDINGS + 3):
        im(torch.randn(1, 1, h, h))
    assert len(im._recordings) == im.MAX_RECORDINGS


def test_int_model_pickles_and_copies_after_replay(tmp_path):
    import copy
    im = _export(resnet20(num_classes=10, in_channels=1), 8, (1, 12, 12))
    x = torch.randn(2, 1, 12, 12)
    want = [im(x) for _ in range(3)][-1]
    assert im._recordings
    torch.save(im, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    twin = copy.deepcopy(im)
    for m in (back, twin):
        assert m._recordings == {}
        assert all(torch.equal(m(x), want) for _ in range(3))
