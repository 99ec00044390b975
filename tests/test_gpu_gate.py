"""benchmarks/gpu_gate.py: gpu_check.sh times an opt-in GPU kernel only when its own GPU test
passed, read from the JUnit XML that pytest writes (a real pytest run here, so the format is
the one gpu_check sees)."""
import subprocess
import sys

from benchmarks import gpu_gate
from benchmarks.common import unverified_kernel_allowed

TESTS = '''
import pytest

def test_cuda_gluon_int8_matmul_exact():
    pass

def test_cuda_gluon_conv_exact():
    assert OUTCOME_CONV

@pytest.mark.parametrize("backend", ["cuda", "cpu"])
def test_cuda_gemv_w4a8_exact(backend):
    if backend == "cpu":
        pytest.skip("OUTCOME_GEMV")
'''


def _junit(tmp_path, conv_ok, gemv_skip):
    src = TESTS.replace("OUTCOME_CONV", str(conv_ok))
    if not gemv_skip:
        src = src.replace('if backend == "cpu"', "if False")
    f = tmp_path / "test_fake_gpu.py"
    f.write_text(src)
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(f),
                    f"--junitxml={xml}", f"--basetemp={tmp_path / 'bt'}"],
                   capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return str(xml)


def test_gate_reads_pytest_junit(tmp_path):
    got = gpu_gate.passed(_junit(tmp_path, conv_ok=False, gemv_skip=True))
    # passed / failed / one parametrized case skipped
    assert got == {"GLUON_GEMM": True, "GLUON_CONV": False, "CUDA_GEMV": False}
    got = gpu_gate.passed(_junit(tmp_path, conv_ok=True, gemv_skip=False))
    assert got == {"GLUON_GEMM": True, "GLUON_CONV": True, "CUDA_GEMV": True}


def test_gate_without_results_turns_everything_off(tmp_path, capsys):
    assert not any(gpu_gate.passed(str(tmp_path / "missing.xml")).values())
    (tmp_path / "bad.xml").write_text("<testsuites><testsuite>")  # cut off by a time limit
    assert not any(gpu_gate.passed(str(tmp_path / "bad.xml")).values())
    assert gpu_gate.main([str(tmp_path / "missing.xml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "export SYNQ_BENCH_GLUON_GEMM=0" in lines and "export SYNQ_BENCH_CUDA_GEMV=0" in lines


def test_benchmarks_read_the_gate(monkeypatch):
    monkeypatch.delenv("SYNQ_BENCH_GLUON_CONV", raising=False)
    assert unverified_kernel_allowed("GLUON_CONV")      # unset: rows run (manual use)
    monkeypatch.setenv("SYNQ_BENCH_GLUON_CONV", "0")
    assert not unverified_kernel_allowed("GLUON_CONV")
    monkeypatch.setenv("SYNQ_BENCH_GLUON_CONV", "1")
    assert unverified_kernel_allowed("GLUON_CONV")
