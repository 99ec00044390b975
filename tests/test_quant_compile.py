"""A fake-quantized model under torch.compile(fullgraph=True): the same values and gradients
as eager, calibration included, and the eager errors. The aot_eager backend runs the traced
graph with the eager kernels, so any difference is in what was traced (inductor's own
arithmetic can move values across a rounding boundary of the grid)."""
import pytest
import torch

from synq.quant import act_quantizers, calibrate, quantize_model, set_calibration

from test_quant import _shared_relu_model

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


def _compiled(model):
    return torch.compile(model, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("learnable", [None, "lsq+"])
def test_compiled_training_step_gives_the_eager_bits(learnable):
    # a ReLU module called twice per forward: the per-call counter runs inside the graph too
    model = quantize_model(_shared_relu_model(False), 4, 4, learnable=learnable)
    torch.manual_seed(0)
    xs = [torch.randn(6, 1, 9, 9) for _ in range(2)]
    calibrate(model, xs)
    model.train()
    grads = []
    for run in (model, _compiled(model)):
        model.zero_grad()
        out = run(xs[0])
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.equal(a, b)


def test_calibration_under_compile_gives_the_eager_ranges():
    torch.manual_seed(1)
    xs = [torch.randn(6, 1, 9, 9) * s for s in (1.0, 2.0, 0.5)]
    eager = quantize_model(_shared_relu_model(False), 4, 4)
    compiled = quantize_model(_shared_relu_model(False), 4, 4)
    calibrate(eager, xs)
    compiled.eval()
    set_calibration(compiled, True)
    run = _compiled(compiled)
    for x in xs:  # the first batch takes its range as is, the next ones fold in by EMA
        run(x)
    set_calibration(compiled, False)
    a, b = eager.state_dict(), compiled.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(run(xs[0]), eager(xs[0]))


def test_compiled_model_loaded_from_a_checkpoint():
    torch.manual_seed(2)
    x = torch.randn(6, 1, 9, 9)
    calibrated = calibrate(quantize_model(_shared_relu_model(False), 4, 4), [x])
    fresh = quantize_model(_shared_relu_model(False), 4, 4).eval()
    fresh.load_state_dict(calibrated.state_dict())  # no eager forward since
    with torch.no_grad():
        assert torch.equal(_compiled(fresh)(x), calibrated(x))


def test_uncalibrated_model_fails_to_compile_with_the_eager_message():
    model = quantize_model(_shared_relu_model(False), 4, 4).eval()
    with pytest.raises(Exception, match="has no range: calibrate the model first"):
        _compiled(model)(torch.randn(2, 1, 9, 9))
    assert not any(q.is_initialized() for q in act_quantizers(model).values())
