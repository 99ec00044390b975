#!/usr/bin/env python
"""Candidate default budgets of `synq quantize`, scored on held-out training images (plan:
benchmarks/results/tune_default/plan.md). One process per synthesis seed: A's synthesis,
then fine-tuning A and C on it; B's synthesis, then fine-tuning B. Top-1 on the 2,000
held-out Fashion-MNIST training images of tune_ablation.py (the decision) and on the test
set (reported). One JSON line per candidate.

    python benchmarks/tune_default_budget.py SEED [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tune_ablation import heldout  # noqa: E402
from synq.assets import load_default_teacher  # noqa: E402
from synq.data import fashion_mnist_dataset  # noqa: E402
from synq.evaluate import evaluate  # noqa: E402
from synq.finetune import FinetuneConfig, finetune  # noqa: E402
from synq.synth import synthesize  # noqa: E402

SHORT_FT = dict(epochs=6, calib_epochs=1, iters_per_epoch=24, batch_size=64, lr=1e-5, d0=10.0)
LONG_FT = dict(SHORT_FT, epochs=17, lr=3e-5)
# candidate: (synthesis num_images, steps, fine-tuning settings)
CANDIDATES = {"A": (256, 150, SHORT_FT), "C": (256, 150, LONG_FT), "B": (512, 200, LONG_FT),
              # round 2 (plan2.md): twice B's fine-tuning on B's synthetic sets
              "D": (512, 200, dict(LONG_FT, epochs=34))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("seed", type=int)
    p.add_argument("--out", default="/tmp/synq_tune_default")
    p.add_argument("--only", nargs="*", default=list(CANDIDATES))
    a = p.parse_args()
    torch.set_num_threads(1)
    teacher = load_default_teacher()[0]
    hx, hy = heldout()
    test = fashion_mnist_dataset("test")
    for name in a.only:
        n, steps, ft = CANDIDATES[name]
        t0 = time.time()
        path = Path(a.out) / f"syn_{n}x{steps}_seed{a.seed}.pt"
        if not path.exists():  # A and C share theirs
            synthesize(teacher, path, (1, 28, 28), num_images=n, batch_size=256, steps=steps,
                       seed=a.seed, progress=False)
        t1 = time.time()
        res = finetune(teacher, path, FinetuneConfig(**ft), progress=False)
        t2 = time.time()
        print(json.dumps({"candidate": name, "seed": a.seed,
                          "heldout": evaluate(res.student, (hx, hy))["top1"],
                          "test": evaluate(res.student, test)["top1"],
                          "synth_s": round(t1 - t0), "finetune_s": round(t2 - t1)}), flush=True)


if __name__ == "__main__":
    main()
