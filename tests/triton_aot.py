"""Ahead-of-time compilation of Triton kernels for a GPU target, without a GPU.

Under TRITON_INTERPRET the kernels run as NumPy, which hides GPU-only compile errors (shape
and dtype rules of tl.dot, broadcasting of some builtins, constexpr misuse). The tests that
import this compile each kernel for sm_90 with triton.compile in a subprocess without
TRITON_INTERPRET (the interpreter flag is read at import) and check the PTX.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRELUDE = r'''
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ALIGN = [["tt.divisibility", 16]]


def compile_for(fn, sig, consts, aligned=(), num_warps=4, cc=90, num_stages=None):
    """`fn` compiled for sm_<cc>: sig maps every runtime argument to its Triton type, consts
    the constexpr arguments to their values, `aligned` names arguments known to be multiples
    of 16 (pointers and strides), as Triton's launcher would specialize them."""
    full = dict(sig)
    full.update({k: "constexpr" for k in consts})
    missing = [a for a in fn.arg_names if a not in full]
    assert not missing, f"arguments without a type: {missing}"
    attrs = {(fn.arg_names.index(a),): ALIGN for a in aligned}
    src = ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def build(fn, sig, consts, aligned=(), num_warps=4, cc=90, num_stages=None):
    """PTX of `fn` for sm_<cc> (arguments as compile_for's)."""
    return compile_for(fn, sig, consts, aligned, num_warps, cc, num_stages).asm["ptx"]


def resources(fn, sig, consts, aligned=(), num_warps=4, cc=90, num_stages=None):
    """What a thread of `fn`'s cubin takes (arguments as compile_for's), read by the cuobjdump that
    Triton ships with its NVIDIA backend: a dict of registers, stack bytes (spills), and, in
    the main loop (the one around the last tensor-core MMA, from its backward branch to that
    branch's target), local loads / stores, global loads into registers and asynchronous
    global-to-shared copies, and its length (SASS instructions; None for the last three where
    no loop surrounds the MMA)."""
    import os, subprocess, tempfile
    cubin = compile_for(fn, sig, consts, aligned, num_warps, cc, num_stages).asm["cubin"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    last_mma = max(i for i, (_, op) in enumerate(code) if re.search(r"\b[IH]GMMA|[IH]MMA", op))
    mma_addr, loop = code[last_mma][0], None
    for addr, op in code[last_mma:]:
        back = re.search(r"BRA (?:\S+, )?0x([0-9a-f]+)", op)
        if back and int(back.group(1), 16) <= mma_addr:
            loop = [o for a, o in code if int(back.group(1), 16) <= a <= addr]
            break
    if loop is None:  # no loop around the MMA (a single K block, peeled)
        return {"regs": int(regs), "stack": int(stack), "loop_spills": 0, "loop_loads": None,
                "loop_copies": None, "loop_instructions": None}
    count = lambda pattern: sum(1 for o in loop if re.search(pattern, o))  # noqa: E731
    return {"regs": int(regs), "stack": int(stack), "loop_spills": count(r"\b(LDL|STL)\b"),
            "loop_loads": count(r"\bLDG\.|\bLDG\b"), "loop_copies": count(r"\bLDGSTS\b"),
            "loop_instructions": len(loop)}
'''


def run(script: str, timeout: int = 300) -> str:
    """Runs PRELUDE + script in a fresh Python without TRITON_INTERPRET; the script must
    print "ok" last. Skips where this Triton lacks the ahead-of-time API.

    SYNQ_AOT_EXTRA_TRITON, a list of folders separated by ':' that each hold another Triton
    package (`pip install --target DIR triton==X`), runs the script again with each of them
    first on the path: .ci/run sets it to the GPU machine's Triton, whose compiler can differ
    from the installed one (a kernel that compiles here may not compile there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    extras = [e for e in os.environ.get("SYNQ_AOT_EXTRA_TRITON", "").split(":") if e]
    for i, extra in enumerate([None] + extras):
        if extra:
            env = dict(env, PYTHONPATH=os.pathsep.join(
                filter(None, [extra, os.environ.get("PYTHONPATH")])))
        res = subprocess.run([sys.executable, "-c", PRELUDE + script], env=env,
                             capture_output=True, text=True, timeout=timeout)
        if (i == 0 and res.returncode != 0 and "ImportError" in res.stderr
                and "triton" in res.stderr):
            pytest.skip("this triton version lacks the ahead-of-time compile API used here")
        assert res.returncode == 0 and res.stdout.strip().endswith("ok"), \
            (f"with the Triton in {extra}:\n" if extra else "") + res.stderr[-3000:]
        if i == 0:
            out = res.stdout
    return out
