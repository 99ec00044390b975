#!/usr/bin/env python
"""Does keeping each synthesis batch's lowest-loss iterate (SynthConfig.keep_best) help at
`synq quantize`'s default budget? One process per (seed, keep_best): synthesis of 256 images x
150 steps from the bundled ResNet-20, the default W4A4 SynQ fine-tuning, then top-1 on 2,000
held-out Fashion-MNIST training images (the decision) and on the test set (reported). Prints
one JSON line.

    python benchmarks/synth_keep_best.py SEED 0|1 [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synq.assets import load_default_teacher  # noqa: E402
from synq.data import fashion_mnist_dataset  # noqa: E402
from synq.evaluate import evaluate  # noqa: E402
from synq.finetune import FinetuneConfig, finetune  # noqa: E402
from synq.synth import synthesize  # noqa: E402

# synq quantize's defaults for the bundled model (synq.cli.QUICK_FINETUNE, d0 80 scaled to 28px)
FINETUNE = dict(epochs=6, calib_epochs=1, iters_per_epoch=24, batch_size=64, lr=1e-5, d0=10.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("seed", type=int)
    p.add_argument("keep_best", type=int, choices=[0, 1])
    p.add_argument("--out", default="/tmp/synq_keep_best")
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    teacher = load_default_teacher()[0]
    path = Path(a.out) / f"syn_seed{a.seed}_kb{a.keep_best}.pt"
    path.unlink(missing_ok=True)
    out = synthesize(teacher, path, (1, 28, 28), num_images=256, batch_size=256, steps=150,
                     seed=a.seed, keep_best=bool(a.keep_best), progress=False)
    res = finetune(teacher, path, FinetuneConfig(**FINETUNE), progress=False)
    x, y = fashion_mnist_dataset("train").tensors
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))[-2000:]
    print(json.dumps({"seed": a.seed, "keep_best": bool(a.keep_best),
                      "bns": out["meta"]["batch_losses"][0]["bns"],
                      "heldout": evaluate(res.student, (x[idx], y[idx]))["top1"],
                      "test": evaluate(res.student, fashion_mnist_dataset("test"))["top1"],
                      "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
