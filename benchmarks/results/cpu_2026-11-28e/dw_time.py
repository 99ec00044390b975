"""MobileNetV2's depthwise convs at batch 1 (and one at batch 8), 1 thread, int8 -> int8 with
ReLU, the op called directly as an exported model calls it, with and without weight offsets
(W8A8 rows beyond int8), against fp32 F.conv2d channels-last:
    python dw_time.py ROOT
ROOT: a checkout with its extension built in place. Alternate ROOTs between processes."""
from _ab import start

torch, sk, median_us, op = start()
F = torch.nn.functional
g = torch.Generator().manual_seed(0)
tot = {False: 0.0, True: 0.0}
tf_tot = 0.0
for (b, c, hw, s) in [(1, 32, 112, 1), (1, 96, 112, 2), (1, 144, 56, 1), (1, 144, 56, 2),
                      (1, 192, 28, 1), (1, 384, 14, 1), (1, 576, 14, 1), (1, 960, 7, 1),
                      (8, 144, 56, 1)]:
    w = torch.randint(-127, 127, (c, 1, 3, 3), dtype=torch.int8, generator=g)
    wp = sk.prepack_conv2d_weight(w, c)
    ws = torch.rand(c, generator=g) * 0.01 + 0.001
    bias = torch.randn(c, generator=g)
    x = torch.randint(-128, 127, (b, c, hw, hw), dtype=torch.int8, generator=g).contiguous(
        memory_format=torch.channels_last)
    xs, xz = torch.tensor([0.02]), torch.tensor([3], dtype=torch.int32)
    os_, oz = torch.tensor([0.05]), torch.tensor([-128], dtype=torch.int32)
    woff = torch.randint(-60, 60, (c,), dtype=torch.int32, generator=g)
    xf, wf = x.float(), w.float()
    row = []
    for off in (False, True):
        t = median_us(lambda: op(x, xs, xz, wp, ws, bias, [s, s], [1, 1], [1, 1], c, True,
                                 torch.int8, os_, oz, None, None, None, None,
                                 woff if off else None), 50)
        tot[off] += t if b == 1 else 0
        row.append(t)
    tf = median_us(lambda: F.conv2d(xf, wf, None, s, 1, 1, c), 50)
    tf_tot += tf if b == 1 else 0
    print(f"b{b} c{c} {hw}x{hw} s{s}: int {row[0]:.1f} us, with offsets {row[1]:.1f} us, "
          f"fp32 CL {tf:.1f} us ({tf / row[0]:.2f}x)")
print(f"batch-1 sum: int {tot[False]:.0f} us, with offsets {tot[True]:.0f} us, "
      f"fp32 {tf_tot:.0f} us")
