"""Which opt-in GPU kernels the benchmarks may time, from gpu_check.sh's test results.

    python -m benchmarks.gpu_gate RESULTS.xml   ->   lines `export SYNQ_BENCH_<NAME>=0|1`

Kernels that are off by default because they have not run on a GPU yet are timed in the
benchmark step only when their own GPU test passed in the test step (a JUnit XML file): a
kernel that hangs, or faults (an illegal address ends the process's CUDA context), would
otherwise take the rest of the benchmark run, and its other families' numbers, with it. A
missing or unreadable file, or a test that failed, errored, was skipped or did not run,
turns the kernel's rows off. `benchmarks.common.unverified_kernel_allowed` reads the result."""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

# kernel -> the name (prefix: parametrized ids follow) of the GPU test that must pass
GATES = {
    "GLUON_GEMM": "test_cuda_gluon_int8_matmul_exact",
    "GLUON_CONV": "test_cuda_gluon_conv_exact",
    "CUDA_GEMV": "test_cuda_gemv_w4a8_exact",
}


def passed(xml_path: str) -> dict[str, bool]:
    try:
        cases = list(ET.parse(xml_path).iter("testcase"))
    except (OSError, ET.ParseError):
        cases = []
    out = {}
    for kernel, test in GATES.items():
        mine = [c for c in cases if c.get("name", "").split("[")[0] == test]
        bad = ("failure", "error", "skipped")
        out[kernel] = bool(mine) and not any(c.find(t) is not None for c in mine for t in bad)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    for kernel, ok in passed(argv[0]).items():
        print(f"export SYNQ_BENCH_{kernel}={int(ok)}")
        if not ok:
            print(f"echo 'benchmarks: {kernel} rows skipped, its GPU test "
                  f"({GATES[kernel]}) did not pass in this run'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
