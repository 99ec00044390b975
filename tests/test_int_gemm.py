"""Integer GEMM: int8_matmul, int4_matmul (W4A4 / W4A8), pack/unpack_int4 and
quantized_linear. Integer results bit-exact against the reference (and the reference against
torch._int_mm where that applies); float epilogues against a float64 evaluation; errors;
opcheck; torch.compile."""
import itertools

import os

import pytest
import torch

import synq_kernels as sk
from synq_kernels.reference import int_gemm as R

from isolated import in_child

CPU_BACKENDS = [b for b in ("cpu",) if b in sk.available_backends("int_mm", "cpu")]
BACKENDS = ["reference"] + CPU_BACKENDS
# Triton runs on CPU tensors under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1
# without a GPU), so its tests use fewer shapes than the C++ ones.
TRITON = ["triton"] if "triton" in sk.available_backends("int_mm", "cpu") else []
MS = [1, 2, 15, 16, 17, 128, 1000]
KS = [1, 3, 31, 257]
NS = [1, 3, 31, 257]


def rand_i8(*shape, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, dtype=torch.int8)


def rand_i4(*shape, signed=True):
    lo, hi = R.int4_range(signed)
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8)


def exact(a, b):
    """a (M, K) @ b (N, K).T in int64 (the test's own ground truth)."""
    return (a.to(torch.int64)[:, None, :] * b.to(torch.int64)[None, :, :]).sum(-1)


# -- pack / unpack -----------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip_every_value(signed):
    lo, hi = R.int4_range(signed)
    vals = torch.arange(lo, hi + 1)
    # every ordered pair of values, so each value sits in both nibbles; plus an odd length
    q = torch.stack(torch.meshgrid(vals, vals, indexing="ij"), -1).reshape(-1)
    for t in (q, q[:-1], q.reshape(16, 32), q[:31].reshape(1, 31)):
        p = sk.pack_int4(t, signed)
        assert p.dtype == torch.uint8 and p.shape[-1] == (t.shape[-1] + 1) // 2
        back = sk.unpack_int4(p, signed, t.shape[-1])
        assert back.dtype == torch.int8 and torch.equal(back, t.to(torch.int8))


def test_pack_layout():
    # element 0 in the low nibble, element 1 in the high nibble; -2 = 0b1110; odd pad = 0
    p = sk.pack_int4(torch.tensor([1, -2, 7]))
    assert p.tolist() == [0xE1, 0x07]
    assert sk.pack_int4(torch.tensor([15, 0]), signed=False).tolist() == [0x0F]


def test_pack_errors():
    with pytest.raises(ValueError, match=r"-8\.\.7.*got 8"):
        sk.pack_int4(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"0\.\.15.*got -1"):
        sk.pack_int4(torch.tensor([-1, 3]), signed=False)
    with pytest.raises(TypeError, match="integer tensor"):
        sk.pack_int4(torch.tensor([0.5]))
    with pytest.raises(TypeError, match="uint8"):
        sk.unpack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="n = 3"):
        sk.unpack_int4(torch.zeros(3, dtype=torch.uint8), n=3)


def test_pack_empty_rows():
    assert sk.pack_int4(torch.zeros(0, 5, dtype=torch.int8)).shape == (0, 3)
    assert sk.pack_int4(torch.zeros(3, 0, dtype=torch.int8)).shape == (3, 0)


def test_weight_row_sums():
    # On a CPU with the cpu backend the sums come from its GEMV (a row of ones); against
    # torch's own sum for int8 weights 2-D and 4-D channels-last, packed int4 ones with odd K
    # and a junk padding nibble, empty shapes, and K past the GEMMs' limit (torch's sum).
    for shape in [(37, 70), (0, 5), (5, 0), (64, 3, 3, 3), (3, 70000)]:
        w = rand_i8(*shape)
        want = w.flatten(1).sum(1, dtype=torch.int32)
        got = sk.weight_row_sums(w)
        assert got.dtype == torch.int32 and torch.equal(got, want), shape
    cl = rand_i8(64, 32, 3, 3).to(memory_format=torch.channels_last)
    assert torch.equal(sk.weight_row_sums(cl), cl.flatten(1).sum(1, dtype=torch.int32))
    for n, k in [(9, 33), (9, 34), (0, 7)]:
        q = rand_i4(n, k)
        p = sk.pack_int4(q)
        if k % 2 and n:
            p[:, -1] |= 0x70
        assert torch.equal(sk.weight_row_sums(p, k), q.sum(1, dtype=torch.int32)), (n, k)


# -- int8 ---------------------------------------------------------------------------------------

def test_reference_matches_int64_and_torch_int_mm():
    for m, k, n in [(17, 32, 8), (128, 264, 40), (1000, 64, 16)]:
        a, b = rand_i8(m, k), rand_i8(n, k)
        r = R.int8_matmul(a, b)
        assert r.dtype == torch.int32
        assert torch.equal(r.long(), exact(a, b))
        assert torch.equal(r, torch._int_mm(a, b.T))
    a, b = rand_i8(3, 31), rand_i8(5, 31)
    assert torch.equal(R.int8_matmul(a, b).long(), exact(a, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_int8_matmul_exact(backend, m):
    for k, n in itertools.product(KS, NS):
        a, b = rand_i8(m, k), rand_i8(n, k)
        got = sk.int8_matmul(a, b, backend=backend)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got, R.int8_matmul(a, b)), (m, k, n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_matmul_extremes_large_k_and_torch_int_mm(backend):
    # all -128: the largest products; K past one K block (1024) and not a multiple of 16;
    # the last two have left blocks too large for L2, so K is split into blocks whose partial
    # sums are added (the other shapes run K in one block)
    for m, k, n in [(17, 2056, 24), (33, 1040, 7), (20, 4096, 64), (1000, 1100, 5),
                    (600, 2100, 3), (300, 4160, 9), (70, 2049, 6)]:
        a = torch.full((m, k), -128, dtype=torch.int8)
        b = torch.full((n, k), -128, dtype=torch.int8)
        b[1::2] = 127
        want = R.int8_matmul(a, b)
        assert torch.equal(sk.int8_matmul(a, b, backend=backend), want)
        a, b = rand_i8(m, k), rand_i8(n, k)
        got = sk.int8_matmul(a, b, backend=backend)
        assert torch.equal(got, R.int8_matmul(a, b))
        if k % 8 == 0 and n % 8 == 0:
            assert torch.equal(got, torch._int_mm(a, b.T))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_matmul_exact_at_the_largest_k(backend):
    # With AVX-512 VNNI the cpu backend multiplies a + 128 (or b + 128) and subtracts 128 times
    # a row sum: at the largest K (65536) with a = 127 and b = 127 / -128 those raw sums are
    # 255 * 127 * K = 2.12e9 and 255 * -128 * K = -2.14e9, within 1% of the int32 range.
    # M = 1 (one-row kernel), 4 (tiles that sum the weights themselves), 64 (weight sums
    # taken first).
    k = 65536
    for m in (1, 4, 64):
        a = torch.full((m, k), 127, dtype=torch.int8)
        b = torch.full((3, k), 127, dtype=torch.int8)
        b[1] = -128
        got = sk.int8_matmul(a, b, backend=backend)
        assert torch.equal(got, R.int8_matmul(a, b))
        assert got[0, 0].item() == 127 * 127 * k


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_matmul_non_contiguous_and_empty(backend):
    base = rand_i8(40, 70)
    a = base[::2, 3:40]                       # (20, 37), row stride 140
    b = rand_i8(37, 9).T                      # (9, 37), transposed
    got = sk.int8_matmul(a, b, backend=backend)
    assert got.dtype == torch.int32 and torch.equal(got.long(), exact(a, b))
    assert sk.int8_matmul(rand_i8(0, 5), rand_i8(3, 5), backend=backend).shape == (0, 3)
    z = sk.int8_matmul(rand_i8(4, 0), rand_i8(3, 0), backend=backend)
    assert z.shape == (4, 3) and not z.any()


# -- int4 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_int4_matmul_exact(backend, m):
    for k, n in itertools.product(KS, NS[:3]):
        b4 = rand_i4(n, k)
        pb = sk.pack_int4(b4)
        a8 = rand_i8(m, k)
        got = sk.int4_matmul(a8, pb, backend=backend)                       # W4A8
        assert torch.equal(got.long(), exact(a8, b4)), ("w4a8", m, k, n)
        for signed in (True, False):                                        # W4A4
            a4 = rand_i4(m, k, signed=signed)
            got = sk.int4_matmul(sk.pack_int4(a4, signed), pb, k=k, a_signed=signed,
                                 backend=backend)
            assert torch.equal(got.long(), exact(a4, b4)), ("w4a4", signed, m, k, n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int4_matmul_ignores_the_padding_nibble(backend):
    # odd K: the high nibble of each row's last byte is padding; fill it with 0xF (-1) and 0x7
    # and the product must not change (M = 1 and 2: one-row kernel; 5: 4 x 4 tile + a row)
    for m, k in [(1, 65), (2, 127), (5, 33), (5, 1)]:
        b4 = rand_i4(7, k)
        a8 = rand_i8(m, k)
        want = exact(a8, b4)
        for junk in (0xF0, 0x70):
            pb = sk.pack_int4(b4)
            pb[:, -1] |= junk
            got = sk.int4_matmul(a8, pb, k=k, backend=backend)
            assert torch.equal(got.long(), want), (m, k, junk)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int4_matmul_large(backend):
    for m, k, n in [(16, 1031, 257), (3, 4096, 64), (600, 2100, 3)]:
        b4 = rand_i4(n, k)
        a8 = rand_i8(m, k)
        assert torch.equal(sk.int4_matmul(a8, sk.pack_int4(b4), backend=backend),
                           R.int8_matmul(a8, b4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_panel_kernel_edges(backend):
    # With AVX-512 VNNI, products of >= 24 rows (16 for int4 weights) run the panel kernel:
    # weights packed in 48-column panels of K quads, 8 x 48 tiles, K blocks of 1024 values,
    # row blocks of 256. Columns 47 / 48 / 49 / 97 (part panels), K around a quad and a
    # block (1025: one value in the second block), rows past a tile and a row block; a junk
    # padding nibble on odd K. Exact on every other CPU path as well.
    cases = [(24, 1, 47), (25, 3, 48), (31, 4, 49), (71, 5, 97), (263, 65, 50),
             (40, 1024, 96), (33, 1025, 17), (264, 2053, 95), (16, 7, 3)]
    for m, k, n in cases:
        a, b = rand_i8(m, k), rand_i8(n, k)
        assert torch.equal(sk.int8_matmul(a, b, backend=backend).long(), exact(a, b)), (m, k, n)
        b4 = rand_i4(n, k)
        pb = sk.pack_int4(b4)
        if k % 2:
            pb[:, -1] |= 0xF0
        assert torch.equal(sk.int4_matmul(a, pb, k=k, backend=backend).long(), exact(a, b4)), \
            ("w4a8", m, k, n)
        a4 = rand_i4(m, k, signed=False)
        got = sk.int4_matmul(sk.pack_int4(a4, False), pb, k=k, a_signed=False, backend=backend)
        assert torch.equal(got.long(), exact(a4, b4)), ("w4a4", m, k, n)


# -- quantized_linear ---------------------------------------------------------------------------

def float64_linear(x_q, xs, xz, w8, ws, bias, relu):
    """The exact value in float64 and its magnitude before bias / ReLU."""
    x = x_q.to(torch.float64) - torch.as_tensor(xz, dtype=torch.float64)[..., None]
    v = (x @ w8.to(torch.float64).T) * torch.as_tensor(xs, dtype=torch.float64)[..., None] \
        * torch.as_tensor(ws, dtype=torch.float64)
    y = v + (bias.to(torch.float64) if bias is not None else 0)
    mag = v.abs() + (bias.to(torch.float64).abs() if bias is not None else 0)
    return (y.clamp_min(0) if relu else y), mag


def assert_epilogue_close(y, want, mag, out_dtype):
    """float32 epilogue: the int32 -> float conversion, the scale product and the bias add
    each round once (4 float32 ulps of the terms' magnitude), then one rounding to
    out_dtype (half an ulp of the result)."""
    tol = 4 * torch.finfo(torch.float32).eps * mag + torch.finfo(out_dtype).eps * want.abs()
    # below out_dtype's smallest normal the spacing is fixed (float16: 2^-24), not relative
    tol = tol + torch.finfo(out_dtype).smallest_normal * torch.finfo(out_dtype).eps / 2
    err = (y.to(torch.float64) - want).abs()
    assert y.dtype == out_dtype
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3g}"


def assert_rounded_from_float32(y, y32):
    """A float16 / bfloat16 output is the same backend's float32 output rounded to nearest
    even, bit for bit: assert_epilogue_close's half-ulp allowance alone would also pass a
    cast that truncates (rounds toward zero)."""
    assert y32.dtype == torch.float32 and y.shape == y32.shape
    if y.dtype != torch.float32:
        bad = y != y32.to(y.dtype)
        assert not bad.any(), \
            f"{int(bad.sum())} of {y.numel()} {y.dtype} outputs are not the float32 ones rounded"


def linear_cases(cases, w_int4):
    """Random quantized_linear inputs for each (x shape, N, out_dtype) of `cases` crossed with
    uint8 / int8 x, per-row / per-tensor x grid, bias on / off and ReLU on / off: tuples
    (x_q, xs, xz, w8, w_q, ws, bias, relu, out_dtype, lead, n)."""
    for (shape, n, out_dtype), x_u8, per_row, bias_on, relu in itertools.product(
            cases, (False, True), (False, True), (False, True), (False, True)):
        k = shape[-1]
        x_q = (torch.randint(0, 256, shape, dtype=torch.uint8) if x_u8
               else rand_i8(*shape))
        lo, hi = (0, 255) if x_u8 else (-128, 127)
        lead = shape[:-1]
        xs = torch.rand(lead) * 0.1 + 0.01 if per_row else 0.037
        xz = torch.randint(lo, hi + 1, lead) if per_row else (lo + hi) // 2 + 3
        w8 = rand_i4(n, k) if w_int4 else rand_i8(n, k)
        w_q = sk.pack_int4(w8) if w_int4 else w8
        ws = torch.rand(n) * 0.02 + 0.001
        bias = torch.randn(n) * 10 if bias_on else None
        yield x_q, xs, xz, w8, w_q, ws, bias, relu, out_dtype, lead, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_int4", [False, True])
def test_quantized_linear_matches_float64(backend, w_int4):
    cases = [((1, 257), 31, torch.float32), ((2, 3, 31), 257, torch.float16),
             ((17, 64), 33, torch.bfloat16), ((128, 1000), 40, torch.float32)]
    for x_q, xs, xz, w8, w_q, ws, bias, relu, out_dtype, lead, n in linear_cases(cases, w_int4):
        y = sk.quantized_linear(x_q, xs, xz, w_q, ws, bias, relu=relu, out_dtype=out_dtype,
                                backend=backend)
        assert y.shape == (*lead, n)
        want, mag = float64_linear(x_q, xs, xz, w8, ws.to(torch.float32), bias, relu)
        assert_epilogue_close(y, want, mag, out_dtype)
        if out_dtype != torch.float32:
            y32 = sk.quantized_linear(x_q, xs, xz, w_q, ws, bias, relu=relu, backend=backend)
            assert_rounded_from_float32(y, y32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantized_linear_unit_scales_are_exact(backend):
    # scales 1, no bias: the float32 output is the integer accumulator itself (|acc| < 2^24)
    x_q, w = rand_i8(33, 257), rand_i8(31, 257)
    y = sk.quantized_linear(x_q, 1.0, -5, w, 1.0, backend=backend)
    want = exact(x_q.long() + 5, w)
    assert torch.equal(y.to(torch.int64), want)
    rs = sk.weight_row_sums(w)
    y2 = sk.quantized_linear(x_q, 1.0, -5, w, 1.0, w_rowsum=rs, backend=backend)
    assert torch.equal(y2, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantized_linear_rows_do_not_depend_on_the_batch(backend):
    # The cpu backend picks its kernel by the number of rows (one-row, 4 x 4 tiles, panels
    # with the float32 epilogue in the tile); each row's output must be the same bits
    # whichever ran it. K past a K block (1100), N past a panel (50).
    k, n = 1100, 50
    w = rand_i8(n, k)
    ws, bias = torch.rand(n) * 0.02 + 0.001, torch.randn(n)
    x = rand_i8(300, k)
    xs, xz = torch.rand(300) * 0.1 + 0.01, torch.randint(-128, 128, (300,))
    for relu, b, dt in [(False, None, torch.float32), (True, bias, torch.float32),
                        (True, bias, torch.bfloat16)]:
        full = sk.quantized_linear(x, xs, xz, w, ws, b, relu=relu, out_dtype=dt,
                                   backend=backend)
        for rows in (slice(0, 1), slice(5, 8), slice(40, 70), slice(299, 300)):
            part = sk.quantized_linear(x[rows], xs[rows], xz[rows], w, ws, b, relu=relu,
                                       out_dtype=dt, backend=backend)
            assert torch.equal(part, full[rows]), (relu, dt, rows)


def test_quantized_linear_errors():
    x, w = rand_i8(4, 8), rand_i8(3, 8)
    with pytest.raises(TypeError, match="x_q must have dtype int8 or uint8, got torch.float32"):
        sk.quantized_linear(x.float(), 0.1, 0, w, 0.1)
    with pytest.raises(ValueError, match="K mismatch"):
        sk.quantized_linear(x, 0.1, 0, rand_i8(3, 9), 0.1)
    with pytest.raises(ValueError, match="K mismatch"):
        sk.quantized_linear(x, 0.1, 0, sk.pack_int4(rand_i4(3, 10)), 0.1)
    with pytest.raises(ValueError, match=r"w_scale must be a scalar or have shape \(3,\)"):
        sk.quantized_linear(x, 0.1, 0, w, torch.ones(4))
    with pytest.raises(ValueError, match=r"x_scale must be a scalar .* shape \(4,\)"):
        sk.quantized_linear(x, torch.ones(3), 0, w, 0.1)
    with pytest.raises(ValueError, match="x_scale must be positive"):
        sk.quantized_linear(x, -0.1, 0, w, 0.1)
    with pytest.raises(ValueError, match=r"x_zero must be within .*-128\.\.127.*got 200"):
        sk.quantized_linear(x, 0.1, 200, w, 0.1)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        sk.quantized_linear(x, 0.1, 0, w, 0.1, bias=torch.ones(2))
    with pytest.raises(TypeError, match="out_dtype"):
        sk.quantized_linear(x, 0.1, 0, w, 0.1, out_dtype=torch.int32)


def test_matmul_errors():
    a = rand_i8(4, 8)
    with pytest.raises(TypeError, match="b must have dtype int8, got torch.uint8"):
        sk.int8_matmul(a, torch.zeros(3, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"K mismatch: a is \(4, 8\) \(M, K\) and b is \(3, 7\)"):
        sk.int8_matmul(a, rand_i8(3, 7))
    with pytest.raises(ValueError, match="must have 2 dims"):
        sk.int8_matmul(rand_i8(2, 4, 8), rand_i8(3, 8))
    with pytest.raises(ValueError, match="K mismatch"):
        sk.int4_matmul(a, sk.pack_int4(rand_i4(3, 10)))
    with pytest.raises(ValueError, match="K mismatch"):
        sk.int4_matmul(sk.pack_int4(rand_i4(4, 7)), sk.pack_int4(rand_i4(3, 7)), k=9)
    with pytest.raises(ValueError, match="not a backend"):
        sk.int8_matmul(a, a, backend="gpu")
    with pytest.raises(ValueError, match="K = 70000 is too large"):
        sk.int8_matmul(rand_i8(1, 70000), rand_i8(1, 70000))


# -- registration -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    a, b = rand_i8(5, 19), rand_i8(7, 19)
    torch.library.opcheck(torch.ops.synq.int_mm.default, (a, b, 19, False, True, False, backend))
    pa, pb = sk.pack_int4(rand_i4(5, 19)), sk.pack_int4(rand_i4(7, 19))
    torch.library.opcheck(torch.ops.synq.int_mm.default, (pa, pb, 19, True, True, True, backend))
    args = (a, torch.rand(5) + 0.1, torch.randint(-3, 3, (5,), dtype=torch.int32), pb,
            torch.rand(7) + 0.1, sk.weight_row_sums(pb, 19), torch.randn(7), True,
            torch.bfloat16, True, backend)
    torch.library.opcheck(torch.ops.synq.quantized_linear.default, args)


def test_torch_compile_fullgraph():
    w = rand_i8(24, 40)
    ws = torch.rand(24) + 0.1
    bias = torch.randn(24)

    def layer(x):
        x_q = torch.clamp(torch.round(x / 0.05), -128, 127).to(torch.int8)
        y = sk.quantized_linear(x_q, 0.05, 0, w, ws, bias, relu=True)
        return y * 2 + sk.int8_matmul(x_q, w).float()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 40)
    torch.testing.assert_close(compiled(x), layer(x))


PORTABLE_CHECK = """
import torch, synq_kernels as sk
from synq_kernels.reference import int_gemm as R
torch.manual_seed(1)
for m, k, n in [(1, 3, 5), (7, 31, 4), (17, 257, 31), (4, 1100, 9)]:
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    assert torch.equal(sk.int8_matmul(a, b, backend="cpu"), R.int8_matmul(a, b)), (m, k, n)
    b4 = torch.randint(-8, 8, (n, k))
    got = sk.int4_matmul(a, sk.pack_int4(b4), backend="cpu")
    assert torch.equal(got, R.int8_matmul(a, b4.to(torch.int8))), (m, k, n)
x = torch.randint(-128, 128, (2, 6, 9, 8), dtype=torch.int8)
w = torch.randint(-128, 128, (4, 3, 3, 3), dtype=torch.int8)
y = sk.quantized_conv2d(x, 1.0, 5, w, 1.0, padding=1, groups=2, backend="cpu")
assert torch.equal(y.to(torch.int32), R.quantized_conv2d_int(x, 5, w, (1, 1), (1, 1), (1, 1), 2))
for c, s in [(20, 2), (32, 1)]:  # depthwise kernel: a partial and a full channel block
    x = torch.randint(-128, 128, (2, c, 9, 7), dtype=torch.int8)
    w = torch.randint(-128, 128, (c, 1, 3, 3), dtype=torch.int8)
    y = sk.quantized_conv2d(x, 1.0, -3, w, 1.0, stride=s, padding=1, groups=c, backend="cpu")
    want = R.quantized_conv2d_int(x, -3, w, (s, s), (1, 1), (1, 1), c)
    assert torch.equal(y.to(torch.int32), want), c
# the packed conv with weight offsets (rows of asymmetric 8-bit weights)
x = torch.randint(0, 256, (2, 5, 8, 9), dtype=torch.uint8)
w = torch.randint(-128, 128, (6, 5, 3, 3), dtype=torch.int8)
off = torch.tensor([0, 100, -90, 3, 0, -128], dtype=torch.int32)
args = (x, 0.5, 77, R.conv2d_prepack(w), torch.ones(6))
kw = dict(padding=1, stride=(1, 2), w_offset=off)
assert torch.equal(sk.quantized_conv2d_packed(*args, backend="cpu", **kw),
                   sk.quantized_conv2d_packed(*args, backend="reference", **kw))
print("portable ok")
"""


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="synq_kernels._C not built")
def test_portable_kernels_exact():
    """The scalar fallback for CPUs without AVX2, forced by SYNQ_CPU_PORTABLE=1."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, SYNQ_CPU_PORTABLE="1")
    r = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "portable ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="synq_kernels._C not built")
@pytest.mark.skipif(os.environ.get("SYNQ_CPU_NO_AVX512") == "1",
                    reason="already the AVX2 kernels")
def test_avx2_kernels_where_avx512_vnni_is_present(tmp_path):
    """On a CPU with AVX-512 VNNI the GEMM micro-kernels are vpdpwssd ones; the AVX2 ones
    (SYNQ_CPU_NO_AVX512=1, read once per process) must stay exact too: the cpu backend's
    GEMM tests again in a process that keeps them (on an AVX2-only CPU both runs take AVX2)."""
    import subprocess
    import sys
    env = dict(os.environ, SYNQ_CPU_NO_AVX512="1")
    # its own basetemp, apart from the numbered run folders that pytest rotates in the shared one
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--basetemp={tmp_path / 'child'}",
                        __file__, "-k", "(matmul or quantized_linear) and cpu and not triton"
                        " and not cuda and not opcheck and not compile"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


# -- Triton -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("m", MS)
def test_triton_int_mm_exact(backend, m):
    shapes = [(1, 3), (31, 257), (257, 31), (3, 1)] if m < 128 else [(3, 1), (257, 31)]
    for k, n in shapes:  # the interpreter is slow: fewer shapes for the large M
        a, b = rand_i8(m, k), rand_i8(n, k)
        assert torch.equal(sk.int8_matmul(a, b, backend=backend), R.int8_matmul(a, b))
        b4 = rand_i4(n, k)
        pb = sk.pack_int4(b4)
        assert torch.equal(sk.int4_matmul(a, pb, backend=backend).long(), exact(a, b4))
        a4 = rand_i4(m, k, signed=False)
        got = sk.int4_matmul(sk.pack_int4(a4, False), pb, k=k, a_signed=False, backend=backend)
        assert torch.equal(got.long(), exact(a4, b4))
    a = torch.full((m, 130), -128, dtype=torch.int8)
    assert torch.equal(sk.int8_matmul(a, a[:3], backend=backend), R.int8_matmul(a, a[:3]))


@pytest.mark.parametrize("backend", TRITON)
def test_triton_opcheck(backend):
    a, pb = rand_i8(5, 19), sk.pack_int4(rand_i4(7, 19))
    torch.library.opcheck(torch.ops.synq.int_mm.default, (a, pb, 19, False, True, True, backend))
    args = (a, torch.rand(5) + 0.1, torch.randint(-3, 3, (5,), dtype=torch.int32), pb,
            torch.rand(7) + 0.1, sk.weight_row_sums(pb, 19), torch.randn(7), True,
            torch.bfloat16, True, backend)
    torch.library.opcheck(torch.ops.synq.quantized_linear.default, args)


_AOT_SCRIPT = r"""
import synq_kernels.triton.int_gemm as m

fn = m._int_mm_kernel
for cc in (80, 90):
    for ap, bp in [(False, False), (False, True), (True, True)]:
        sig = {"a_ptr": "*u8" if ap else "*i8", "b_ptr": "*u8" if bp else "*i8",
               "c_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KH": "i32", "sam": "i32",
               "sbn": "i32", "scm": "i32"}
        consts = {"A_PACKED": ap, "A_SIGNED": True, "B_PACKED": bp, "ASM": True,
                  "K_ODD": False, "BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}
        # K = 4096 as the launcher specializes it: sizes and strides multiples of 16
        aligned = ["a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "KH", "sam", "sbn", "scm"]
        ptx = build(fn, sig, consts, aligned, num_warps=8, cc=cc)
        mma = re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx)
        assert mma and all("s8.s8" in x for x in mma), (cc, ap, bp, sorted(set(mma))[:3])
        # every operand, packed ones included, streams through cp.async copies: no
        # synchronous global load is left (the packed ones were, before KH)
        assert "cp.async" in ptx and "ld.global" not in ptx, (cc, ap, bp)
        if bp and cc == 90:
            # the nibbles unpacked four bytes a register (inline PTX): elementwise int32 code
            # took 1698 instructions per K block of this tile's W4A8 main loop, int8 174
            assert "0x78787878" in ptx, (ap, bp)
            r = resources(fn, sig, consts, aligned, num_warps=4, num_stages=3)
            assert r["loop_instructions"] < 3 * 174 * (2 if ap else 1), (ap, bp, r)
print("ok")
"""


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_compiles_to_int8_mma_for_sm80_and_sm90():
    """The interpreter hides GPU-only compile errors: compile ahead of time (no GPU needed)
    and check that the products are int8 tensor-core MMAs (mma.sync s8 on sm_80, wgmma s8 on
    sm_90)."""
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("w_int4", [False, True])
def test_triton_quantized_linear(backend, w_int4):
    """Every (M, K, N) of M in (1, 2, 17), K and N in (1, 3, 31, 257): unit scales without
    bias make the float32 output the int32 accumulator (|acc| <= 257 * 255 * 128 < 2^24), so
    the integer part is compared bit-exactly; then the float epilogue, with the input kind,
    per-row or per-tensor activation parameters, bias, ReLU and output dtype rotating over
    every other shape, against float64."""
    flags = itertools.cycle(itertools.product((False, True), repeat=4))
    dtypes = itertools.cycle((torch.float32, torch.float16, torch.bfloat16))
    for i, (m, k, n) in enumerate(itertools.product((1, 2, 17), KS, NS)):
        x_u8, per_row, bias_on, relu = next(flags)
        out_dtype = next(dtypes)
        x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8) if x_u8 else rand_i8(m, k)
        lo, hi = (0, 255) if x_u8 else (-128, 127)
        w8 = rand_i4(n, k) if w_int4 else rand_i8(n, k)
        w_q = sk.pack_int4(w8) if w_int4 else w8
        xz = torch.randint(lo, hi + 1, (m,))
        y = sk.quantized_linear(x_q, 1.0, xz, w_q, 1.0, backend=backend)
        want = exact(x_q.long() - xz[:, None], w8)
        assert y.dtype == torch.float32 and torch.equal(y.long(), want), (m, k, n)
        if i % 2:  # the interpreter is slow: the epilogue on every other shape
            continue
        xs = torch.rand(m) * 0.1 + 0.01 if per_row else 0.037
        xz = xz if per_row else (lo + hi) // 2 + 3
        ws = torch.rand(n) * 0.02 + 0.001
        bias = torch.randn(n) * 10 if bias_on else None
        y = sk.quantized_linear(x_q, xs, xz, w_q, ws, bias, relu=relu, out_dtype=out_dtype,
                                backend=backend)
        assert y.shape == (m, n)
        want, mag = float64_linear(x_q, xs, xz, w8, ws, bias, relu)
        assert_epilogue_close(y, want, mag, out_dtype)
        if out_dtype != torch.float32:
            y32 = sk.quantized_linear(x_q, xs, xz, w_q, ws, bias, relu=relu, backend=backend)
            assert_rounded_from_float32(y, y32)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_quantized_linear_extremes_and_lead_dims(backend):
    # the largest products (-128 * -128) over K = 1000, several K blocks; (..., K) input
    x_q = torch.full((3, 5, 1000), -128, dtype=torch.int8)
    w = torch.full((40, 1000), -128, dtype=torch.int8)
    w[1::2] = 127
    y = sk.quantized_linear(x_q, 1.0, 0, w, 1.0, backend=backend)
    assert y.shape == (3, 5, 40)
    assert torch.equal(y.reshape(15, 40).long(), exact(x_q.reshape(15, 1000), w))
    # float16 / bfloat16 outputs are the kernel's own float32 result rounded to nearest even
    # (the interpreter's bfloat16 cast alone would truncate)
    x_q, ws, bias = rand_i8(15, 1000), torch.rand(40) * 0.02, torch.randn(40)
    y32 = sk.quantized_linear(x_q, 0.013, -3, w, ws, bias, relu=True, backend=backend)
    for dt in (torch.bfloat16, torch.float16):
        y = sk.quantized_linear(x_q, 0.013, -3, w, ws, bias, relu=True, out_dtype=dt,
                                backend=backend)
        assert torch.equal(y, y32.to(dt)), dt


_AOT_EPILOGUE_SCRIPT = r"""
import synq_kernels.triton.int_gemm as m

EPI = {"xs_ptr": "*fp32", "xz_ptr": "*i32", "ws_ptr": "*fp32", "rs_ptr": "*i32",
       "bias_ptr": "*fp32"}
CONV = {k: "i32" for k in ("P", "OHW", "OW", "H", "W", "sxb", "sxc", "sxh", "sxw", "swn", "sob",
                           "soc", "soh", "sow", "sh", "sw", "ph", "pw", "dh", "dw")}


def build_epi(fn, sig, consts, num_warps):
    return build(fn, sig, consts, ("x_ptr", "w_ptr", "out_ptr"), num_warps=num_warps)


def int8_mma(ptx, what):
    mma = re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx)
    assert mma and all("s8.s8" in x for x in mma), (what, sorted(set(mma))[:3])


for wp, out, relu in [(False, "fp32", False), (True, "bf16", True)]:
    sig = {"x_ptr": "*i8", "w_ptr": "*u8" if wp else "*i8", "out_ptr": f"*{out}", **EPI,
           "M": "i32", "N": "i32", "K": "i32", "KH": "i32", "sxm": "i32", "swn": "i32",
           "som": "i32"}
    int8_mma(build_epi(m._quantized_linear_kernel, sig,
                   {"W_PACKED": wp, "HAS_BIAS": True, "RELU": relu, "ROUND_BF16": out == "bf16",
                    "ASM": True, "BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, 4),
             ("linear", wp))
for wp in (False, True):
    sig = {"x_ptr": "*i8", "w_ptr": "*u8" if wp else "*i8", "out_ptr": "*bf16", **EPI,
           "Cout": "i32", "Og": "i32", "KH": "i32", "KW": "i32", "swy": "i32", "swx": "i32",
           "inv_ohw": "fp32", "inv_ow": "fp32", **CONV}
    # Og = 1 (one output channel per group, MobileNetV2's): Triton's launcher specializes an
    # int argument equal to 1 as a constant, and so does this build
    sig = {a: sig[a] for a in m._conv_depthwise_kernel.arg_names if a in sig and a != "Og"}
    ptx = build_epi(m._conv_depthwise_kernel, sig,
                {"W_PACKED": wp, "HAS_BIAS": True, "RELU": False, "ROUND_BF16": True,
                 "FAST_DIV": True, "BM": 64, "BN": 64, "Og": 1}, 4)
    assert "st.global" in ptx, ("depthwise", wp)
    # the row split by float reciprocals: 97 integer divisions / remainders with // and %
    divs = re.findall(r"\b(?:div|rem)\.[su]32", ptx)
    assert len(divs) <= 2, ("depthwise", wp, len(divs))
print("ok")
"""


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_linear_and_conv_compile_for_sm90():
    """quantized_linear's and the depthwise conv's kernels compiled ahead of time for sm_90
    (the interpreter hides GPU-only compile errors): the GEMMs must be int8 wgmma, int8 and
    packed int4 weights, every output dtype somewhere (conv_tap's kernel: test_int_conv)."""
    import triton_aot
    triton_aot.run(_AOT_EPILOGUE_SCRIPT)

# Triton on CUDA tensors (a GPU machine; skipped here): the interpreter runs the same kernels
# above, but only a GPU runs the compiled code. Named *cuda* so that benchmarks/gpu_check.sh's
# `-k cuda` selects them; few shapes, since every new constexpr combination is a JIT compile.
TRITON_GPU = [pytest.param("triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or "triton" not in sk.available_backends("int_mm", "cuda"),
    reason="needs a CUDA GPU and triton"))]


def triton_linear_cases(device, backend="triton"):
    """Unit scales (the float32 output is the accumulator, compared exactly), then the
    epilogue against float64, on shapes hitting each GPU row-block size (16, 64, 128)."""
    for m, k, n, w_int4, out_dtype, bias_on, relu in [
            (1, 257, 31, False, torch.float32, True, False),
            (17, 31, 257, True, torch.bfloat16, True, True),
            (300, 1000, 130, False, torch.float16, False, True)]:
        x_q = rand_i8(m, k)
        w8 = rand_i4(n, k) if w_int4 else rand_i8(n, k)
        w_q = sk.pack_int4(w8) if w_int4 else w8
        xz = torch.randint(-128, 128, (m,))
        y = sk.quantized_linear(x_q.to(device), 1.0, xz.to(device), w_q.to(device), 1.0,
                                backend=backend)
        want, _ = float64_linear(x_q, 1.0, xz, w8, 1.0, None, False)
        assert y.device.type == device and torch.equal(y.cpu().double(), want), (m, k, n)
        xs, ws = torch.rand(m) * 0.1 + 0.01, torch.rand(n) * 0.02 + 0.001
        bias = torch.randn(n) * 10 if bias_on else None
        args = (x_q.to(device), xs.to(device), xz.to(device), w_q.to(device), ws.to(device),
                bias.to(device) if bias_on else None)
        y = sk.quantized_linear(*args, relu=relu, out_dtype=out_dtype, backend=backend)
        want, mag = float64_linear(x_q, xs, xz, w8, ws, bias, relu)
        assert_epilogue_close(y.cpu(), want, mag, out_dtype)
        if out_dtype != torch.float32:
            y32 = sk.quantized_linear(*args, relu=relu, backend=backend)
            assert_rounded_from_float32(y.cpu(), y32.cpu())


@pytest.mark.parametrize("backend", TRITON_GPU)
def test_triton_cuda_quantized_linear(backend):
    triton_linear_cases("cuda", backend)


@pytest.mark.parametrize("backend", TRITON_GPU)
def test_triton_cuda_int_mm_exact(backend):
    """The Triton GEMM compiled on a GPU (the interpreter runs the tests above): int8, W4A8
    and W4A4 across the MMA kernel's M (M <= 4 with a packed weight: test_int_gemv), ragged
    and 16-aligned K and N, exact against the reference."""
    for m, k, n in [(5, 31, 257), (17, 257, 31), (300, 4096, 130), (1000, 130, 1000)]:
        a, b = rand_i8(m, k), rand_i8(n, k)
        got = sk.int8_matmul(a.cuda(), b.cuda(), backend=backend)
        assert torch.equal(got.cpu(), R.int8_matmul(a, b)), ("int8", m, k, n)
        b4 = rand_i4(n, k)
        pb = sk.pack_int4(b4)
        got = sk.int4_matmul(a.cuda(), pb.cuda(), backend=backend)
        assert torch.equal(got.cpu().long(), exact(a, b4)), ("w4a8", m, k, n)
        for signed in (True, False):
            a4 = rand_i4(m, k, signed=signed)
            got = sk.int4_matmul(sk.pack_int4(a4, signed).cuda(), pb.cuda(), k=k,
                                 a_signed=signed, backend=backend)
            assert torch.equal(got.cpu().long(), exact(a4, b4)), ("w4a4", signed, m, k, n)


# -- CUDA backend (csrc/cuda/int_gemm.cu; skipped without a GPU) --------------------------------
#
# Inputs are made on the CPU and moved, so the ground truth is the CPU reference (and, for the
# float epilogues, the cpu backend bit for bit: both evaluate the same float32 expression).

CUDA_OK = torch.cuda.is_available() and "cuda" in sk.available_backends("int_mm", "cuda")
CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA_OK, reason="needs a CUDA GPU and synq_kernels._C built with its CUDA kernels"))]


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("m", MS)
def test_cuda_int_mm_exact(backend, m):
    # M <= 16 runs the weight-streaming kernel, M > 16 the tiled one
    for k, n in itertools.product(KS, NS):
        a, b = rand_i8(m, k), rand_i8(n, k)
        got = sk.int8_matmul(a.cuda(), b.cuda(), backend=backend)
        assert got.is_cuda and got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got.cpu(), R.int8_matmul(a, b)), ("int8", m, k, n)
        b4 = rand_i4(n, k)
        pb = sk.pack_int4(b4).cuda()
        got = sk.int4_matmul(a.cuda(), pb, backend=backend)
        assert torch.equal(got.cpu().long(), exact(a, b4)), ("w4a8", m, k, n)
        for signed in (True, False):
            a4 = rand_i4(m, k, signed=signed)
            got = sk.int4_matmul(sk.pack_int4(a4, signed).cuda(), pb, k=k, a_signed=signed,
                                 backend=backend)
            assert torch.equal(got.cpu().long(), exact(a4, b4)), ("w4a4", signed, m, k, n)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_int_mm_large_and_extremes(backend):
    # several K steps of 64 with ragged ends, tile edges in M and N, the largest K (all -128:
    # the largest partial sums), 16-byte aligned rows (cp.async path) and unaligned ones
    for m, k, n in [(16, 4096, 300), (17, 2056, 24), (129, 1040, 129), (300, 4096, 257),
                    (1000, 1100, 5), (4, 65536, 9), (130, 65536, 3)]:
        a, b = rand_i8(m, k), rand_i8(n, k)
        want = R.int8_matmul(a, b)
        assert torch.equal(sk.int8_matmul(a.cuda(), b.cuda(), backend=backend).cpu(), want)
        if k % 8 == 0 and n % 8 == 0 and m > 16:
            assert torch.equal(want, torch._int_mm(a.cuda(), b.cuda().T).cpu())
        b4 = rand_i4(n, k)
        got = sk.int4_matmul(a.cuda(), sk.pack_int4(b4).cuda(), backend=backend)
        assert torch.equal(got.cpu(), R.int8_matmul(a, b4)), (m, k, n)
        a = torch.full((m, k), -128, dtype=torch.int8)
        b = torch.full((n, k), -128, dtype=torch.int8)
        b[1::2] = 127
        got = sk.int8_matmul(a.cuda(), b.cuda(), backend=backend)
        assert torch.equal(got.cpu(), R.int8_matmul(a, b)), ("extremes", m, k, n)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_int_mm_strides_and_padding_nibbles(backend):
    for m in (5, 40):
        base = rand_i8(2 * m, 70)
        a = base[::2, 3:40]                            # row stride 140, odd offset
        b = rand_i8(37, 9).T                           # transposed: copied to unit stride
        got = sk.int8_matmul(a.cuda(), b.cuda(), backend=backend)
        assert torch.equal(got.cpu(), R.int8_matmul(a, b))
        big = rand_i8(m, 4096 + 16)
        a = big[:, 16:]                                # 16-byte aligned rows, offset start
        w = rand_i8(20, 4096)
        got = sk.int8_matmul(a.cuda(), w.cuda(), backend=backend)
        assert torch.equal(got.cpu(), R.int8_matmul(a, w))
        # odd K: the padding nibble of packed rows carries garbage; it must not count
        for k in (1, 31, 65, 257):
            a4, b4 = rand_i4(m, k), rand_i4(7, k)
            pa, pb = sk.pack_int4(a4), sk.pack_int4(b4)
            pa[:, -1] |= 0xF0
            pb[:, -1] |= 0x70
            got = sk.int4_matmul(pa.cuda(), pb.cuda(), k=k, backend=backend)
            assert torch.equal(got.cpu().long(), exact(a4, b4)), (m, k)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_gemv_w4a8_exact(backend, monkeypatch, request):
    """The dp4a GEMV (int8 activations, packed int4 weights, M <= 4; opt-in by SYNQ_CUDA_GEMV
    until it has run on a GPU): every M, K around its 32-value chunks and 4096-value warp
    sweeps, ragged N, garbage in the pad nibble of odd K, activation rows that are not
    16-byte aligned, and the extreme values."""
    if not in_child(request):  # never run on a GPU yet: a fault must fail this test alone
        return
    monkeypatch.setenv("SYNQ_CUDA_GEMV", "1")
    for m, k, n in itertools.product((1, 2, 3, 4), (1, 31, 32, 33, 257, 4096, 4100, 8224),
                                     (1, 17, 300)):
        a, b4 = rand_i8(m, k), rand_i4(n, k)
        pb = sk.pack_int4(b4)
        if k % 2:
            pb[:, -1] |= 0x90
        got = sk.int4_matmul(a.cuda(), pb.cuda(), backend=backend)
        assert torch.equal(got.cpu().long(), exact(a, b4)), (m, k, n)
    for m in (1, 3):
        a = rand_i8(2 * m, 4100)[::2, 3:4099]            # row stride 8200, odd offset
        b4 = rand_i4(40, 4096)
        got = sk.int4_matmul(a.cuda(), sk.pack_int4(b4).cuda(), backend=backend)
        assert torch.equal(got.cpu().long(), exact(a, b4)), m
        a = torch.full((m, 65536), -128, dtype=torch.int8)
        b4 = torch.full((3, 65536), -8, dtype=torch.int8)
        got = sk.int4_matmul(a.cuda(), sk.pack_int4(b4).cuda(), backend=backend)
        assert torch.equal(got.cpu().long(), exact(a, b4)), ("extremes", m)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("w_int4", [False, True])
def test_cuda_quantized_linear(backend, w_int4):
    cases = [((1, 257), 31, torch.float32), ((2, 3, 31), 257, torch.float16),
             ((16, 4096), 100, torch.bfloat16), ((17, 64), 33, torch.bfloat16),
             ((300, 1000), 140, torch.float32), ((128, 96), 40, torch.float16)]
    for x_q, xs, xz, w8, w_q, ws, bias, relu, out_dtype, lead, n in linear_cases(cases, w_int4):
        to = (lambda t: t.cuda() if isinstance(t, torch.Tensor) else t)
        y = sk.quantized_linear(x_q.cuda(), to(xs), to(xz), w_q.cuda(), ws.cuda(), to(bias),
                                relu=relu, out_dtype=out_dtype, backend=backend)
        assert y.is_cuda and y.shape == (*lead, n)
        y = y.cpu()
        want, mag = float64_linear(x_q, xs, xz, w8, ws, bias, relu)
        assert_epilogue_close(y, want, mag, out_dtype)
        if out_dtype != torch.float32:
            y32 = sk.quantized_linear(x_q.cuda(), to(xs), to(xz), w_q.cuda(), ws.cuda(),
                                      to(bias), relu=relu, backend=backend)
            assert_rounded_from_float32(y, y32.cpu())
        if CPU_BACKENDS:  # same float32 expression: bit-exact with the cpu backend
            y_cpu = sk.quantized_linear(x_q, xs, xz, w_q, ws, bias, relu=relu,
                                        out_dtype=out_dtype, backend="cpu")
            assert torch.equal(y, y_cpu), (tuple(x_q.shape), x_q.dtype, n, out_dtype,
                                           torch.is_tensor(xs), bias is not None, relu)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_quantized_linear_unit_scales_are_exact(backend):
    for m in (1, 33):
        x_q, w = rand_i8(m, 257), rand_i8(31, 257)
        y = sk.quantized_linear(x_q.cuda(), 1.0, -5, w.cuda(), 1.0, backend=backend)
        assert torch.equal(y.cpu().to(torch.int64), exact(x_q.long() + 5, w))


@pytest.mark.parametrize("backend", CUDA + TRITON_GPU)
def test_cuda_python_number_params_do_not_synchronize(backend):
    """Scales and zero points given as Python numbers become device tensors without the host
    waiting for the GPU (CUDA's sync debug mode raises on a synchronizing call); the value
    checks, which read values back, are off. The result is still right."""
    x_q, w = rand_i8(33, 257).cuda(), rand_i8(31, 257).cuda()
    rs = sk.weight_row_sums(w)
    with sk.value_checks(False):
        sk.quantized_linear(x_q, 1.0, -5, w, 1.0, w_rowsum=rs, backend=backend)  # compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = sk.quantized_linear(x_q, 1.0, -5, w, 1.0, w_rowsum=rs, backend=backend)
            f = sk.fake_quant(y, 0.5, 3.0, 8)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y.cpu().to(torch.int64), exact(x_q.cpu().long() + 5, w.cpu()))
    assert torch.equal(f.cpu(), sk.fake_quant(y.cpu(), 0.5, 3.0, 8, backend="reference"))


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_opcheck(backend):
    a, b = rand_i8(5, 19).cuda(), rand_i8(7, 19).cuda()
    torch.library.opcheck(torch.ops.synq.int_mm.default, (a, b, 19, False, True, False, backend))
    pa, pb = sk.pack_int4(rand_i4(5, 19)).cuda(), sk.pack_int4(rand_i4(7, 19)).cuda()
    torch.library.opcheck(torch.ops.synq.int_mm.default, (pa, pb, 19, True, True, True, backend))
    for m in (5, 40):
        x = rand_i8(m, 19).cuda()
        args = (x, torch.rand(m).cuda() + 0.1, torch.randint(-3, 3, (m,), dtype=torch.int32).cuda(),
                pb, torch.rand(7).cuda() + 0.1, sk.weight_row_sums(pb, 19), torch.randn(7).cuda(),
                True, torch.bfloat16, True, backend)
        torch.library.opcheck(torch.ops.synq.quantized_linear.default, args)


@pytest.mark.parametrize("backend, device", [(b, "cpu") for b in BACKENDS + TRITON] + [
    pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="no CUDA"))])
@pytest.mark.parametrize("w_int4", [False, True])
def test_quantized_linear_empty_k_and_rows(backend, device, w_int4):
    """K = 0 gives the epilogue of an empty sum (bias, then ReLU); no rows gives no rows."""
    bias = torch.tensor([1.0, -2.0, 3.0, 0.5], device=device)
    w = torch.zeros(4, 0, dtype=torch.uint8 if w_int4 else torch.int8, device=device)
    for lead in ((3,), (2, 0), (0,)):
        x = torch.zeros(*lead, 0, dtype=torch.int8, device=device)
        y = sk.quantized_linear(x, 0.1, 3, w, torch.ones(4, device=device), bias, relu=True,
                                backend=backend)
        assert y.shape == (*lead, 4)
        assert torch.equal(y.cpu(), bias.cpu().clamp_min(0).expand(*lead, 4))
    x = torch.zeros(0, 5, dtype=torch.int8, device=device)
    w5 = sk.pack_int4(torch.ones(4, 5, dtype=torch.int8)) if w_int4 else \
        torch.ones(4, 5, dtype=torch.int8)
    assert sk.quantized_linear(x, 0.1, 3, w5.to(device), 1.0, backend=backend).shape == (0, 4)


def test_gpu_default_sends_large_int8_products_to_triton(monkeypatch):
    # The rule measured on an H100 / H200 (TRITON_INT8_MIN_M): with no backend named, int8 x
    # int8 products with M >= 17 on a GPU run on Triton, smaller M and packed int4 weights on
    # cuda; a named backend or SYNQ_BACKEND is obeyed. No GPU here: the registry is faked.
    from synq_kernels import backends
    from synq_kernels.ops import int_gemm as ops
    monkeypatch.delenv("SYNQ_BACKEND", raising=False)
    monkeypatch.setattr(backends, "resolve", lambda op, dev, be: be or "cuda")
    monkeypatch.setattr(backends, "available_backends",
                        lambda op, dev: ["cuda", "triton", "reference"])
    dev = torch.device("cuda")
    assert ops.TRITON_INT8_MIN_M == {"int_mm": 17, "quantized_linear": 257}
    for op, m0 in ops.TRITON_INT8_MIN_M.items():
        assert ops._resolve_gemm(op, dev, None, m0, False) == "triton"
        assert ops._resolve_gemm(op, dev, None, 4096, False) == "triton"
        assert ops._resolve_gemm(op, dev, None, m0 - 1, False) == "cuda"
        assert ops._resolve_gemm(op, dev, None, 1, False) == "cuda"
        assert ops._resolve_gemm(op, dev, None, 4096, True) == "cuda"
        assert ops._resolve_gemm(op, dev, "cuda", 4096, False) == "cuda"
    monkeypatch.setenv("SYNQ_BACKEND", "cuda")
    assert ops._resolve_gemm("int_mm", dev, None, 4096, False) == "cuda"
    monkeypatch.delenv("SYNQ_BACKEND")
    monkeypatch.setattr(backends, "available_backends", lambda op, dev: ["cuda", "reference"])
    assert ops._resolve_gemm("int_mm", dev, None, 4096, False) == "cuda"


@pytest.mark.parametrize("backend", TRITON)
def test_triton_int_mm_grouped_program_order(backend, monkeypatch):
    """The kernel's L2 grouping (GROUP_M row tiles sweep the columns together): every tile is
    computed once, including a last group with fewer row tiles (4 row tiles, groups of 3)."""
    from synq_kernels.triton import int_gemm as T
    monkeypatch.setattr(T, "_mm_config", lambda m, n, k, interp: dict(
        BM=16, BN=16, BK=32, GROUP_M=3))
    a, b = rand_i8(50, 45), rand_i8(37, 45)
    assert torch.equal(sk.int8_matmul(a, b, backend=backend), R.int8_matmul(a, b))
    pb = sk.pack_int4(rand_i4(37, 45))
    assert torch.equal(sk.int4_matmul(a, pb, k=45, backend=backend),
                       R.int8_matmul(a, sk.unpack_int4(pb, True, 45)))
