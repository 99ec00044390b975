"""synq.cuda_graphs: CUDA-graph replay of an exported model's forward (IntModel.cuda_graphs).

Without a GPU the cache's bookkeeping is tested with a stand-in for the capture (a "graph"
whose replay runs the module on the static input); the real capture runs on a GPU."""
import copy
import pickle

import pytest
import torch
from torch import nn

import synq_kernels as sk
from synq.cuda_graphs import GraphCache
from synq.deploy import export
from synq.models import resnet20
from synq.quant import calibrate, quantize_model


class _FakeGraph:
    def __init__(self, model, static_in, static_out):
        self.model, self.static_in, self.static_out = model, static_in, static_out

    def replay(self):
        self.static_out.copy_(self.model(self.static_in))


@pytest.fixture
def fake_capture(monkeypatch):
    calls = []

    def capture(model, x):
        calls.append(tuple(x.shape))
        static_in = x.clone()
        static_out = model(static_in).clone()
        tensors = [*model.parameters(), *model.buffers()]
        return (_FakeGraph(model, static_in, static_out), static_in, static_out, tensors,
                [t._version for t in tensors])

    monkeypatch.setattr(GraphCache, "_capture", staticmethod(capture))
    return calls


def test_first_call_eager_second_captures_then_replays(fake_capture):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    cache = GraphCache()
    xs = [torch.randn(4, 5) for _ in range(4)]
    with torch.no_grad():
        outs = [cache(model, x) for x in xs]
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, model(x))
    assert fake_capture == [(4, 5)]                 # captured once, on the second call
    # outputs are copies: a later replay does not overwrite an earlier result
    assert outs[2].data_ptr() != outs[3].data_ptr()
    with torch.no_grad():
        model.weight.mul_(2.0)                      # in place: the graph must be re-made
        x = torch.randn(4, 5)
        torch.testing.assert_close(cache(model, x), model(x))
        torch.testing.assert_close(cache(model, x), model(x))
    assert fake_capture == [(4, 5), (4, 5)]
    with torch.no_grad():
        cache(model, torch.randn(2, 5))             # a new shape starts over: eager first
    assert fake_capture == [(4, 5), (4, 5)]


def test_refused_capture_runs_eagerly_and_says_why(monkeypatch):
    def refuse(model, x):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphCache, "_capture", staticmethod(refuse))
    model = nn.Linear(5, 3)
    cache = GraphCache()
    x = torch.randn(4, 5)
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(cache(model, x), model(x))
    (why,) = cache.refused.values()
    assert "not permitted" in why
    assert not cache.graphs


def test_graph_count_is_bounded(fake_capture):
    model = nn.Linear(5, 3)
    cache = GraphCache()
    with torch.no_grad():
        for m in range(1, GraphCache.MAX_GRAPHS + 3):
            cache(model, torch.randn(m, 5))
    assert len(cache.graphs) == GraphCache.MAX_GRAPHS


def _int_model(device, bits=8):
    torch.manual_seed(3)
    model = resnet20(num_classes=10, in_channels=1).to(device)
    x = torch.randn(8, 1, 28, 28, device=device)
    q = calibrate(quantize_model(model, bits, bits), [x])
    return export(q, example=x[:1])


def test_int_model_flag_is_on_by_default_and_cpu_inputs_ignore_it():
    im = _int_model("cpu")
    assert im.cuda_graphs is True
    x = torch.randn(2, 1, 28, 28)
    im.cuda_graphs = False
    want = im(x)
    im.cuda_graphs = True                           # CUDA tensors only: CPU replay as before
    for _ in range(3):
        torch.testing.assert_close(im(x), want, rtol=0, atol=0)
    assert not im._graphs.graphs
    im.cuda_graphs = False
    im2 = pickle.loads(pickle.dumps(im))            # graphs are not saved, the flag is
    assert im2.cuda_graphs is False and not im2._graphs.graphs
    torch.testing.assert_close(copy.deepcopy(im)(x), want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton")
                                     if b in sk.available_backends("quantized_conv2d", "cuda")])
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_graph_replay_matches_eager(backend, bits):
    im = _int_model("cuda", bits).set_backend(backend)
    xs = [torch.randn(3, 1, 28, 28, device="cuda") for _ in range(4)]
    im.cuda_graphs = False
    want = [im(x) for x in xs]
    im.cuda_graphs = True
    got = [im(x) for x in xs]
    assert im.graph_refusals() == {}
    (entry,) = im._graphs.graphs.values()
    assert entry != "warm"                          # captured, and the later calls replayed
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    layer = next(iter(im.int_layers().values()))
    with torch.no_grad():
        layer.bias.add_(1.0)                        # in place: captured again, new result
    im.cuda_graphs = False
    want = im(xs[0])
    im.cuda_graphs = True
    torch.testing.assert_close(im(xs[0]), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(im(xs[0]), want, rtol=1e-5, atol=1e-5)
