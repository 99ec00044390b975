"""ResNet-20 (Fashion-MNIST, 1x28x28) end to end: the fp32 model against an integer version
built on synq's CPU conv kernels the way an exporter would: BN folded into each conv,
per-channel int8 weights prepacked once, int8 activations carried between layers in
channels-last layout by the requantizing epilogue (ReLU and the residual add fused into the
second conv of each block), and the kernel op called directly (no Python checks per call).

The activation scales are calibrated on one batch of the float model (max of each
activation), which is enough for a timing model whose logits track the float ones; the real
exporter is synq/deploy.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import synq_kernels as sk

_OP = None


def _op():
    global _OP
    if _OP is None:
        _OP = torch.ops.synq._quantized_conv2d_packed.default
    return _OP


def _fold(conv, bn):
    std = torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * bn.weight / std
    return w.detach().float(), b.detach().float()


class FoldedResNet20:
    """The fp32 model with BN folded into the convs (a stronger float baseline)."""

    def __init__(self, model):
        self.stem = (*_fold(model.conv1, model.bn1), 1, 1)
        self.blocks = []
        for stage in (model.layer1, model.layer2, model.layer3):
            for blk in stage:
                s = blk.conv1.stride[0]
                sc = None
                if len(blk.shortcut):
                    sc = (*_fold(blk.shortcut[0], blk.shortcut[1]), s, 0)
                self.blocks.append(((*_fold(blk.conv1, blk.bn1), s, 1),
                                    (*_fold(blk.conv2, blk.bn2), 1, 1), sc))
        self.fc_w = model.fc.weight.detach()
        self.fc_b = model.fc.bias.detach()

    def __call__(self, x, record=None):
        def conv(t, p, relu):
            y = F.conv2d(t, p[0], p[1], p[2], p[3])
            return F.relu(y) if relu else y

        def rec(name, t):
            if record is not None:
                record[name] = max(record.get(name, 0.0), float(t.abs().max()))
            return t

        rec("in", x)
        x = rec("stem", conv(x, self.stem, True))
        for i, (c1, c2, sc) in enumerate(self.blocks):
            h = rec(f"b{i}.h", conv(x, c1, True))
            r = rec(f"b{i}.sc", conv(x, sc, False)) if sc is not None else x
            x = rec(f"b{i}.out", F.relu(conv(h, c2, False) + r))
        return F.linear(x.mean((2, 3)), self.fc_w, self.fc_b)


class IntResNet20:
    """Integer ResNet-20 on synq_kernels' packed conv op (see the module docstring)."""

    def __init__(self, model, calib):
        f = FoldedResNet20(model)
        rec = {}
        with torch.inference_mode():
            f(calib, rec)
        i32 = lambda v: torch.tensor([v], dtype=torch.int32)  # noqa: E731
        f32 = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
        # post-ReLU activations: [0, max] onto int8 -128..127; others symmetric
        self.relu_q = lambda name: (f32(max(rec[name], 1e-6) / 255), i32(-128))  # noqa: E731
        self.sym_q = lambda name: (f32(max(rec[name], 1e-6) / 127), i32(0))  # noqa: E731
        self.in_q = self.sym_q("in")

        def layer(p, in_q, out_q, relu, groups=1):
            w, b, s, pad = p
            wmax = w.abs().amax((1, 2, 3)).clamp_min(1e-12)
            ws = (wmax / 127).float()
            wq = torch.clamp(torch.round(w / ws.reshape(-1, 1, 1, 1)), -127, 127).to(torch.int8)
            return dict(wp=sk.prepack_conv2d_weight(wq, groups), ws=ws, b=b.contiguous(),
                        s=[s, s], p=[pad, pad], xs=in_q[0], xz=in_q[1], os=out_q[0],
                        oz=out_q[1], relu=relu)

        self.stem = layer(f.stem, self.in_q, self.relu_q("stem"), True)
        self.blocks = []
        prev = self.relu_q("stem")
        for i, (c1, c2, sc) in enumerate(f.blocks):
            hq, oq = self.relu_q(f"b{i}.h"), self.relu_q(f"b{i}.out")
            l1 = layer(c1, prev, hq, True)
            lsc = layer(sc, prev, self.sym_q(f"b{i}.sc"), False) if sc is not None else None
            rq = (lsc["os"], lsc["oz"]) if lsc else prev
            l2 = layer(c2, hq, oq, True)
            self.blocks.append((l1, l2, lsc, rq))
            prev = oq
        self.out_q = prev
        self.fc_w, self.fc_b = f.fc_w, f.fc_b

    @staticmethod
    def _conv(x, L, residual=None, rq=(None, None)):
        return _op()(x, L["xs"], L["xz"], L["wp"], L["ws"], L["b"], L["s"], L["p"], [1, 1], 1,
                     L["relu"], torch.int8, L["os"], L["oz"], residual, rq[0], rq[1])

    def __call__(self, x):
        s, z = self.in_q
        q = torch.clamp(torch.round(x * (1.0 / float(s))) + int(z), -128, 127).to(torch.int8)
        q = self._conv(q, self.stem)
        for l1, l2, lsc, rq in self.blocks:
            h = self._conv(q, l1)
            r = self._conv(q, lsc) if lsc is not None else q
            q = self._conv(h, l2, r, rq)
        s, z = self.out_q
        pooled = (q.float().mean((2, 3)) - float(z)) * float(s)
        return F.linear(pooled, self.fc_w, self.fc_b)


def build(seed=0, calib_batch=64):
    """(float model in eval mode, its BN-folded fp32 version, the integer version)."""
    from synq.models import resnet20
    torch.manual_seed(seed)
    model = resnet20(in_channels=1).eval()
    # random BN statistics so the folded scales are not all 1
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    calib = torch.randn(calib_batch, 1, 28, 28)
    return model, FoldedResNet20(model), IntResNet20(model, calib)
