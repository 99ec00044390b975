"""Runs selected cases of a test file again in a child process with SYNQ_CPU_PORTABLE=1: the
CPU kernels' scalar code, for CPUs without AVX2 (the switch is read once per process)."""
import os
import subprocess
import sys


def run_portable(test_file: str, select: str, tmp_path, passed: int) -> None:
    """pytest `test_file -k select` in a child with the scalar kernels; `passed` cases must
    pass."""
    env = dict(os.environ, SYNQ_CPU_PORTABLE="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--basetemp={tmp_path / 'child'}", test_file, "-k", select],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{passed} passed" in r.stdout, (r.stdout[-2000:]
                                                                  + r.stderr[-2000:])
