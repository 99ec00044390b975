"""synq.deploy: ReLU6 whose learned grid reaches past 6 (an LSQ step grown in fine-tuning) keeps
fused mode: the conv epilogue clamps the int8 result to the code of 6.0 (IntAct.tops), as the
fake-quantized model's ReLU6 does before rounding."""
import json
import warnings

import pytest
import torch
from torch import nn

from synq.deploy import export, load_int, save_int
from synq.quant import act_quantizers, calibrate, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    """MobileNetV2's pattern: conv -> BN -> ReLU6 twice, a linear bottleneck, an add."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    net[1].weight.data.fill_(4.0)              # many of the first ReLU6's inputs above 6
    return net


def _rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("bits", [8, 4])
def test_relu6_grid_past_six_stays_fused(tmp_path, bits):
    x = torch.randn(16, 3, 9, 11)
    q = calibrate(quantize_model(_net(), bits, bits, learnable="lsq"), [x])
    aq = act_quantizers(q)["2.quantizer"]
    aq.scale.data.fill_(8.0 / ((1 << bits) - 1))   # the grid's top at 8, past 6
    with torch.no_grad():
        want = q(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # fused mode kept: it gives the unfused result
        im = export(q)
    plan = im.plan
    assert plan["fused"] and plan["layers"]["0"]["defer"] and plan["layers"]["3"]["defer"]
    top = plan["acts"]["2"]["relu6_tops"][0]    # the code of 6.0 (int8 domain)
    assert top == round(6.0 / float(aq.scale.detach())) - 128
    seen = []
    im.model[2].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        got = im(x)
        unfused = export(q, fuse=False)(x)
    bound = 0.02 if bits == 8 else 0.1
    assert _rel_err(want, got) < bound and _rel_err(want, unfused) < bound
    codes = seen[-1]                            # the first ReLU6's int8 output
    assert codes.dtype == torch.int8 and int(codes.max()) == top
    # without the clamp to 6 the fused int8 codes run up to the grid's top
    for a in im.model.modules():
        if getattr(a, "tops", None):
            a.tops = None
            a.__dict__.pop("_grid_caches", None)
    im.reset_replay()
    with torch.no_grad():
        im(x)
    assert int(seen[-1].max()) > top
    save_int(export(q), tmp_path / "int", model_spec={"source": "callable",
                                                      "target": "test_deploy_relu6:_net",
                                                      "kwargs": {}})
    back = load_int(tmp_path / "int")
    with torch.no_grad():
        assert torch.equal(back(x), got)
    # a model saved before the plans held the tops: load_int finds them from the grids
    meta_path = tmp_path / "int" / "int_model.json"
    meta = json.loads(meta_path.read_text())
    for info in meta["plan"]["acts"].values():
        info.pop("relu6_tops", None)
    meta_path.write_text(json.dumps(meta))
    old = load_int(tmp_path / "int")
    assert old.model[2].tops == [top]
    with torch.no_grad():
        assert torch.equal(old(x), got)
