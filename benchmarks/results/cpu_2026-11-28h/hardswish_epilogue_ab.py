"""MobileNetV3 small / large (torchvision, random weights, W8A8, 224x224, 1 thread): the
exported model with Hardswish in the packed conv's epilogue (the conv writes int8 on the
activation's grid) against the same model with those convs writing float32 and the
Hardswish fused into the static quantization pass after them (the previous default),
alternating in one process:
    python hardswish_epilogue_ab.py TORCHVISION_DIR [ROUNDS]"""
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, "benchmarks/results/cpu_2026-11-28f")
from torchvision_models import build  # noqa: E402

from synq.deploy import IntAct, _Pending, export  # noqa: E402
from synq.quant import calibrate, quantize_model  # noqa: E402


def median_ms(fn, n=30):
    fn()
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def hardswish_convs(im, x):
    """The convs whose deferred epilogue a Hardswish quantizer runs (one eager forward)."""
    found = []
    hooks = [m.register_forward_pre_hook(
        lambda mod, args: found.append(args[0].layer) if isinstance(args[0], _Pending) else None)
        for m in im.model.modules() if isinstance(m, IntAct) and m.kind == "hardswish"]
    im.replay = False
    with torch.no_grad():
        im(x)
    im.replay = True
    for h in hooks:
        h.remove()
    return found


def main():
    torch.set_num_threads(1)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for name in ("mobilenet_v3_small", "mobilenet_v3_large"):
        m = build(name)
        x = torch.randn(4, 3, 96, 96)
        q = calibrate(quantize_model(m, 8, 8), [x])
        im = export(q, example=x[:1])
        x1 = torch.randn(1, 3, 224, 224)
        convs = hardswish_convs(im, x1)

        def setting(on):
            for c in convs:
                c.defer = on
            im.reset_replay()

        with torch.no_grad():
            ref = q(x1)
            outs = {}
            for on in (True, False):
                setting(on)
                outs[on] = im(x1)
            err = {k: float((v - ref).abs().max() / ref.abs().max()) for k, v in outs.items()}
            print(f"{name}: {len(convs)} convs feed a Hardswish quantizer; max |int - fq| / "
                  f"max |fq|: epilogue {err[True]:.4f}, quantization pass {err[False]:.4f}")
            for r in range(rounds):
                row = []
                for on in (False, True):
                    setting(on)
                    row.append(median_ms(lambda: im(x1)))
                print(f"  round {r}: quantization pass {row[0]:.3f} ms, epilogue {row[1]:.3f} "
                      f"ms, {row[0] / row[1]:.3f}x")


if __name__ == "__main__":
    main()
