"""The quantization and int8 max-pool benchmark families run and write their tables (tiny
shapes; what they measure is in benchmarks/results, not checked here)."""
import pytest

from benchmarks import bench_pool, bench_quantize
from synq_kernels.ops import quantize as Q


@pytest.mark.skipif(not Q._has_kernel(), reason="synq_kernels._C not built")
def test_families_run_and_write(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_quantize, "QUICK", [("tiny", (1, 8, 5, 6))])
    monkeypatch.setattr(bench_quantize, "ROWS", [("tiny rows", (3, 40))])
    monkeypatch.setattr(bench_pool, "QUICK", [(1, 8, 9, 7)])
    monkeypatch.setattr(bench_quantize, "time_fn", lambda fn, device, t=0.5: (fn(), 1e-6)[1])
    monkeypatch.setattr(bench_pool, "time_fn", lambda fn, device, t=0.5: (fn(), 1e-6)[1])
    rows = bench_quantize.run(quick=True, device="cpu", out_dir=str(tmp_path))
    assert [r["op"] for r in rows] == ["static", "static + Hardswish", "static + BN + ReLU",
                                       "dynamic, per tensor", "dynamic, per row"]
    rows = bench_pool.run(quick=True, device="cpu", out_dir=str(tmp_path))
    assert [r["backend"] for r in rows] == ["cpu"]
    names = sorted(p.name.split("_cpu_")[0] for p in tmp_path.iterdir())
    assert names == ["max_pool_int8", "max_pool_int8", "quantize", "quantize"]
