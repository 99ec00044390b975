"""benchmarks/bench_conv_tiles.py and bench_gemm_tiles.py run end to end (tiny shapes,
Triton's interpreter on the CPU): a GPU sweep must not be the first place its code runs."""
import pytest

import synq_kernels as sk
from benchmarks import bench_conv_tiles as B


@pytest.mark.skipif("triton" not in sk.available_backends("int_mm", "cpu"),
                    reason="triton is not installed")
def test_sweep_runs_forces_each_config_and_restores_the_default(monkeypatch, tmp_path):
    from synq_kernels.triton import conv_tap
    default = conv_tap._tap_config
    # a block's first conv (no residual) and second (int8 residual in the fused call)
    monkeypatch.setattr(B, "LAYERS", [("t", 32, 5, 4, 40, 3, 1, 1), ("r", 32, 5, 4, 32, 3, 1, 1)])
    monkeypatch.setattr(B, "CONFIGS_QUICK", [(32, 32, 32, 4, 2), (16, 32, 32, 4, 2), (16, 64, 32, 4, 2)])
    monkeypatch.setattr(B, "CONFIGS_MAXNREG", [(16, 32, 32, 4, 2, 128), (16, 64, 32, 4, 2, 128)])
    monkeypatch.setattr(B, "BATCHES_QUICK", (1,))
    rows = B.run(True, "cpu", str(tmp_path), allow_cpu=True)
    for layer in ("t ", "r "):
        for impl in ("synq triton tap", "synq triton tap fused W8A8"):
            tap = [r for r in rows if r["shape"].startswith(layer)
                   and r["impl"].removesuffix(" (default)") == impl]
            # the default first, then each forced config (BN = 64 > 40 output channels:
            # skipped); the register caps only where the fused call adds a residual
            want = ["(32, 32, 32, 4, 2)", "(16, 32, 32, 4, 2)"]
            if layer == "r " and impl.endswith("W8A8"):
                want.append("(16, 32, 32, 4, 2, 128)")
            assert [r["config"] for r in tap][1:] == want, (layer, impl, tap)
            assert all(isinstance(r["ms"], float) for r in tap), tap
    assert not [r for r in rows if "MISMATCH" in r["impl"]]
    assert conv_tap._tap_config is default
    md = next(tmp_path.glob("conv_tiles_*.md")).read_text()
    # the summary: per shape and kernel, the default and the fastest forced configuration
    assert md.count("; best (") == 4 and "x the default's time)" in md, md[-800:]
    assert B.run(True, "cpu") == []         # without allow_cpu: skipped


@pytest.mark.skipif("triton" not in sk.available_backends("int_mm", "cpu"),
                    reason="triton is not installed")
def test_gemm_sweep_runs_forces_each_config_and_restores_the_default(monkeypatch, tmp_path):
    from benchmarks import bench_gemm_tiles as G
    from synq_kernels.triton import int_gemm, int_gemv
    default, default_gemv = int_gemm._mm_config, int_gemv._gemv_config
    monkeypatch.setattr(G, "SHAPES", [(20, 45, 37, False), (1, 45, 37, True),
                                      (9, 45, 37, True)])
    monkeypatch.setattr(G, "CONFIGS_LARGE_QUICK", [(16, 16, 32, 2, 4, 2)])
    monkeypatch.setattr(G, "CONFIGS_SMALL", [(16, 32, 64, 1, 4, 2)])
    monkeypatch.setattr(G, "CONFIGS_GEMV", [(16, 32, 1, 4)])
    monkeypatch.setattr(G, "CONFIGS_LINEAR", [(16, 16, 64, 1, 4, 2)])
    monkeypatch.setattr(G, "LINEAR_SHAPE", (20, 45, 37))
    rows = G.run(True, "cpu", str(tmp_path), allow_cpu=True)
    tap = [r for r in rows if r["impl"].startswith("synq")]
    assert [r["config"] for r in tap] == [
        str(tuple(default(20, 37, 45, False).values())), "(16, 16, 32, 2, 4, 2)",
        str(tuple(default(20, 37, 45, False).values())), "(16, 16, 64, 1, 4, 2)",
        str(tuple(default_gemv(37, 23, False).values())), "(16, 32, 1, 4)",
        str(tuple(default(9, 37, 45, False).values())), "(16, 32, 64, 1, 4, 2)"]
    assert [r["impl"] for r in tap][2:6] == [
        "synq triton quantized_linear (default)", "synq triton quantized_linear",
        "synq triton gemv (default)", "synq triton gemv"]
    assert all("MISMATCH" not in r["impl"] and isinstance(r["ms"], float) for r in tap), tap
    assert int_gemm._mm_config is default and int_gemv._gemv_config is default_gemv
    md = next(tmp_path.glob("gemm_tiles_*.md")).read_text()
    assert md.count("; best (") == 4, md[-800:]
    assert G.run(True, "cpu") == []
