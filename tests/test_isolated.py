"""tests/isolated.py: a test body run in a child process; a crash (as a CUDA fault would end
a process's usable context) or a hang fails that test alone, and the parent goes on."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = '''
import os, time
import pytest
from isolated import in_child

def test_passes(request):
    if not in_child(request):
        return
    assert os.environ["SYNQ_TEST_ISOLATED"] == "1"

def test_crashes(request):
    if not in_child(request):
        return
    os.abort()

def test_hangs(request):
    if not in_child(request, timeout=4):
        return
    time.sleep(60)

def test_fails(request):
    if not in_child(request):
        return
    assert 1 == 2, "the child's message"

def test_skips(request):
    if not in_child(request):
        return
    pytest.skip("no GPU here")

def test_after_them():
    assert os.environ.get("SYNQ_TEST_ISOLATED") is None
'''


def test_child_outcomes_reach_the_parent(tmp_path):
    (tmp_path / "test_fake_kernels.py").write_text(TESTS)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    env.pop("SYNQ_TEST_ISOLATED", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                        "-p", "no:xdist", "test_fake_kernels.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    out = r.stdout
    for name, outcome in [("passes", "PASSED"), ("crashes", "FAILED"), ("hangs", "FAILED"),
                          ("fails", "FAILED"), ("skips", "SKIPPED"), ("after_them", "PASSED")]:
        assert f"test_{name} {outcome}" in out, out[-3000:]
    assert "did not finish in 4 s" in out and "the child's message" in out, out[-3000:]
    assert "3 failed, 2 passed, 1 skipped" in out, out[-3000:]
