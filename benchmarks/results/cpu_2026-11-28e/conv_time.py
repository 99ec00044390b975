"""General (non-depthwise) packed convs, int8 -> int8, 1 thread, the op called directly as an
exported model calls it: MobileNetV2's 1x1 expansions and a projection (batch 1), ResNet-18's
layer1 3x3 with an int8 residual (batch 1) and ResNet-20's 16-channel 3x3 (batch 64):
    python conv_time.py ROOT
ROOT: a checkout with its extension built in place. Alternate ROOTs between processes."""
from _ab import start

torch, sk, median_us, op = start()
g = torch.Generator().manual_seed(0)
xs, xz = torch.tensor([0.02]), torch.tensor([3], dtype=torch.int32)
os_, oz = torch.tensor([0.05]), torch.tensor([-128], dtype=torch.int32)
rs, rz = torch.tensor([0.04]), torch.tensor([2], dtype=torch.int32)
for name, (b, c, hw, cout, k, res) in {"mbv2 16->96 1x1 112": (1, 16, 112, 96, 1, False),
                                       "mbv2 24->144 1x1 56": (1, 24, 56, 144, 1, False),
                                       "mbv2 144->24 1x1 56": (1, 144, 56, 24, 1, False),
                                       "r18 64->64 3x3 56 +res": (1, 64, 56, 64, 3, True),
                                       "r20 16->16 3x3 28 b64": (64, 16, 28, 16, 3, False)}.items():
    w = torch.randint(-127, 127, (cout, c, k, k), dtype=torch.int8, generator=g)
    wp = sk.prepack_conv2d_weight(w, 1)
    ws = torch.rand(cout, generator=g) * 0.01 + 0.001
    bias = torch.randn(cout, generator=g)
    x = torch.randint(-128, 127, (b, c, hw, hw), dtype=torch.int8, generator=g).contiguous(
        memory_format=torch.channels_last)
    r = torch.randint(-128, 127, (b, cout, hw, hw), dtype=torch.int8, generator=g).contiguous(
        memory_format=torch.channels_last) if res else None
    p = k // 2
    t = median_us(lambda: op(x, xs, xz, wp, ws, bias, [1, 1], [p, p], [1, 1], 1, True,
                             torch.int8, os_, oz, r, rs if res else None,
                             rz if res else None, None, None), 50)
    print(f"{name}: {t:.1f} us")
