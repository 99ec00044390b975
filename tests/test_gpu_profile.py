"""benchmarks/gpu_profile.py runs (on the CPU here, tiny sizes) and reports both paths."""
from benchmarks import gpu_profile


def test_profile_runs_and_reports_both_paths(tmp_path, one_thread):
    out = tmp_path / "profile.txt"
    assert gpu_profile.main(["--device", "cpu", "--small", "--out", str(out)]) == 0
    text = out.read_text()
    assert "FAILED" not in text
    assert "exported W8A8 resnet20 (bundled)" in text and "fine-tuning, resnet20" in text
    assert "synq::" in text         # the profile sees synq's own ops
