"""An exported integer model under torch.compile(fullgraph=True): the eager bits (with the
aot_eager backend, which runs the traced graph on the eager kernels), and a clear error for a
model whose first call has not prepared its packed weights yet."""
import pytest
import torch

import synq_kernels as sk
from synq.deploy import export, load_int, save_int
from synq.models import resnet18, resnet20

from test_deploy import _MOBILE_V3_MODULE, _quantized, _randomize_bn
from test_deploy_float_bn import _DENSE_MODULE
from test_quant import _shared_relu_model
from test_quant_compile import _compiled

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


def _from_text(text):
    ns = {}
    exec(text, ns)  # noqa: S102 - a test module's own source text
    return _randomize_bn(ns["model"]())


CASES = {  # W4: packed int4 weights and offsets, fused residual epilogues; W8: max-pool
    "resnet20_w4": (lambda: _randomize_bn(resnet20(num_classes=10, in_channels=1)), 4,
                    (4, 1, 16, 16)),
    "resnet18_w8": (lambda: _randomize_bn(resnet18(num_classes=10)), 8, (2, 3, 32, 32)),
    "shared_relu_w4": (lambda: _shared_relu_model(False), 4, (4, 1, 9, 9)),  # calls per grid
    # Hardswish fused into the static quantization, SiLU, SE gates
    "mobile_v3_w8": (lambda: _from_text(_MOBILE_V3_MODULE), 8, (2, 3, 17, 15)),
    # float BatchNorms, applied in the next ReLU's quantization; torch.cat in the forward
    "dense_w4": (lambda: _from_text(_DENSE_MODULE), 4, (2, 3, 13, 11)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_integer_model_gives_the_eager_bits(case):
    build, bits, shape = CASES[case]
    torch.manual_seed(7)
    x = torch.randn(*shape)
    im = export(_quantized(build(), bits, x), x[:1])
    with torch.no_grad():
        want = im(x)  # eager (recorded and replayed on a CPU)
        run = _compiled(im)
        for _ in range(2):
            assert torch.equal(run(x), want)
        assert torch.equal(run(x * 0.5), im(x * 0.5))


def test_compiling_before_the_first_call_says_what_to_do(tmp_path):
    torch.manual_seed(8)
    x = torch.randn(2, 1, 16, 16)
    im = export(_quantized(_randomize_bn(resnet20(num_classes=10, in_channels=1)), 4, x), x[:1])
    save_int(im, tmp_path, {"source": "registry", "name": "resnet20",
                            "kwargs": {"num_classes": 10, "in_channels": 1}})
    fresh = load_int(tmp_path)
    with torch.no_grad():
        with pytest.raises(Exception, match="run the integer model once without torch.compile"):
            _compiled(fresh)(x)
        torch._dynamo.reset()
        want = fresh(x)  # the eager call prepares the packed weights
        assert torch.equal(_compiled(fresh)(x), want)


@pytest.mark.skipif(not sk._ext.has_cpu_kernels(), reason="needs the compiled extension")
@pytest.mark.parametrize("packed", [False, True])
def test_direct_linear_kernel_opcheck(packed):
    torch.manual_seed(9)
    m, k, n = 3, 37, 5
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    rowsum = sk.weight_row_sums(w)
    wq = sk.pack_int4(w) if packed else w
    args = (x, torch.rand(m) + 0.1, torch.randint(-5, 5, (m,), dtype=torch.int32), wq,
            torch.rand(n) + 0.1, rowsum, torch.randn(n), False, torch.float32, packed)
    torch.library.opcheck(torch.ops.synq._quantized_linear.default, args)
