"""benchmarks/targets.py: the issue targets read back from a GPU run's results folder, on the
ninth session's committed H200 results (whose ratios the README quotes)."""
import shutil
from pathlib import Path

from benchmarks import targets

RUNS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu_2026-11-27b"


def _by_target(folder):
    return {t: (m, v, ok) for t, m, v, _, ok in targets.targets(str(folder))}


def test_targets_of_the_ninth_session_run():
    got = _by_target(RUNS / "run4_gpu_check")
    m, v, ok = got["issue 4: int8 GEMM 4096^3 >= 1.6x fp16"]
    assert m == "synq int8_matmul [triton]" and round(v, 2) == 1.52 and ok is False
    assert got["issue 4: int8 GEMM 4096^3 >= 0.9x torch._int_mm"][2] is True
    m, v, ok = got["issue 4: W4A8 at batch 1 (1x4096x4096) >= 3x fp16"]
    assert "W4A8 [cuda]" in m and round(v, 2) == 1.12 and ok is False
    m, v, ok = got["issue 7: W8A8 ResNet-18 at batch 256 >= 1.3x fp16"]
    assert m.startswith("int W8A8") and v < 0.2 and ok is False
    v, ok = got["issue 7: fine-tuning resnet20 batch 256 >= 1.5x reference"][1:]
    assert round(v, 2) == 1.96 and ok is True
    convs = [k for k in got if "ResNet-18 conv" in k]
    timed = [k for k in convs if got[k][0] != "no row"]
    assert len(timed) >= 3 and all(got[k][2] is False for k in timed)
    # the run did not time the stem and layer4 at batch 256 (--quick): listed, without a row
    for name in ("conv1", "layer4.conv"):
        assert got[f"issue 4: ResNet-18 conv {name} b256 faster than cuDNN fp16"] == (
            "no row", None, None)


def test_targets_name_the_device_and_refuse_cpu_runs(capsys):
    """Every table names its device; a CPU folder says its ratios are not the GPU targets'
    (they are against fp32), an H200 folder that the targets are set for an H100, and
    ResNet-20's convs (sharing the CPU's file) are not read as ResNet-18's."""
    assert targets.main([str(RUNS / "run4_gpu_check")]) == 0
    out = capsys.readouterr().out
    assert "## nvidia-h200" in out and "set for an H100" in out
    cpu = RUNS.parent / "cpu_2026-11-28c"
    assert targets.main([str(cpu)]) == 0
    out = capsys.readouterr().out
    assert "Not a GPU run (cpu)" in out and "r20." not in out


def test_targets_without_rows_and_the_command(tmp_path, capsys):
    """A folder with only the tile sweep: the GEMM targets say "no row", the conv ones come
    from the sweep's default rows; the command prints the table and writes it."""
    for f in (RUNS / "run5_conv_and_inference").glob("conv_tiles_*.csv"):
        shutil.copy(f, tmp_path)
    got = _by_target(tmp_path)
    assert got["issue 4: int8 GEMM 4096^3 >= 1.6x fp16"] == ("no row", None, None)
    m, v, ok = got["issue 4: ResNet-18 conv layer1.conv b256 64x56x56->64 k3s1 faster than "
                   "cuDNN fp16"]
    assert m == "synq triton tap (default)" and round(v, 3) == 0.234 and ok is False
    out = tmp_path / "t.md"
    assert targets.main([str(tmp_path), "--out", str(out)]) == 0
    assert "| issue 4: int8 GEMM 4096^3 >= 1.6x fp16 | no row | - | no row |" in out.read_text()
    assert "layer3.0.down" in capsys.readouterr().out
    assert targets.main([str(tmp_path / "missing")]) == 2


def test_a_folder_of_two_gpus_gets_a_table_each(capsys):
    """The first GPU session's folder holds an H100's and an H200's runs: each target is read
    from one device's files (a ratio is only good against its own run's baseline)."""
    first = RUNS.parent / "gpu_2026-11-27"
    assert targets.devices(str(first)) == ["nvidia-h100-80gb-hbm3", "nvidia-h200"]
    h100 = {t: v for t, _, v, _, _ in targets.targets(str(first), "nvidia-h100-80gb-hbm3")}
    assert round(h100["issue 4: int8 GEMM 4096^3 >= 1.6x fp16"], 2) == 1.39
    assert targets.main([str(first)]) == 0
    out = capsys.readouterr().out
    assert "## nvidia-h100-80gb-hbm3" in out and "## nvidia-h200" in out
