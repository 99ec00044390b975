"""Runs one test again in a child process, for GPU kernels that have never run on a GPU.

A kernel that faults (an illegal address) leaves its process's CUDA context unusable, so in
gpu_check.sh's xdist run every later test on the same worker would fail too, and one that
hangs would hold the whole step until its time limit. In a child, a fault or a hang fails
this test alone, with the child's output in the message.

    def test_new_kernel(request):
        if not in_child(request):
            return          # the child ran the body; its result is this test's
        ...                 # the body
"""
import os
import subprocess
import sys

import pytest

_FLAG = "SYNQ_TEST_ISOLATED"


def in_child(request, timeout: float = 45.0) -> bool:
    """True inside the child (run the body). In the parent: runs this test's node in a child
    pytest (same environment, plus the flag) and fails unless it passed; returns False."""
    if os.environ.get(_FLAG) == "1":
        return True
    env = dict(os.environ, **{_FLAG: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-p", "no:randomly", request.node.nodeid]
    try:
        r = subprocess.run(cmd, env=env, cwd=str(request.config.rootpath), capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:]
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        pytest.fail(f"{request.node.nodeid}: the child did not finish in {timeout:.0f} s "
                    f"(hung kernel?); its output:\n{out}", pytrace=False)
    tail = (r.stdout[-3000:] + r.stderr[-2000:]).strip()
    if r.returncode == 0 and " skipped" in r.stdout and " passed" not in r.stdout:
        pytest.skip(f"skipped in the child: {tail[-300:]}")
    if r.returncode != 0 or " passed" not in r.stdout:
        pytest.fail(f"{request.node.nodeid} failed in its child process (exit status "
                    f"{r.returncode}):\n{tail}", pytrace=False)
    return False
