"""Top-1 / top-5 accuracy on a labelled test set, and an FP-versus-quantized report.

Under several processes (synq.distributed) each rank evaluates one contiguous share of the
test set, without padding, and the hit counts are summed over the ranks: every image counts
exactly once, so the result equals a 1-process evaluation.

On a CPU a model with 2-D convolutions is evaluated as a channels-last copy
(`CPU_CHANNELS_LAST`), as synthesis and fine-tuning run it: oneDNN's convolutions are faster
there (the bundled model on its 10,000 test images: 7.3 -> 5.6 s on 1 thread, the same
accuracy). The caller's model is untouched.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from . import distributed
from .synth import channel_mismatch

__all__ = ["evaluate", "compare", "format_report", "as_loader"]

CPU_CHANNELS_LAST = True


def _channels_last_copy(model: nn.Module) -> nn.Module | None:
    """A channels-last copy of a model with 2-D convolutions that are not channels-last
    already; None where there is nothing to gain or the model cannot be copied."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs or all(m.weight.is_contiguous(memory_format=torch.channels_last)
                        and not m.weight.is_contiguous() for m in convs):
        return None
    try:
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    except Exception:  # a module that does not deep-copy: evaluate it as it is
        return None


def as_loader(data, batch_size: int = 500) -> DataLoader:
    """A DataLoader over `data`: a DataLoader (returned as is), a Dataset of (x, y), or a pair
    of tensors (x, y)."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        data = TensorDataset(*data)
    if not isinstance(data, Dataset):
        raise TypeError(f"expected a DataLoader, a Dataset or an (x, y) pair of tensors, got "
                        f"{type(data).__name__}")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _shard(loader: DataLoader) -> DataLoader:
    """This rank's contiguous share of `loader`'s dataset, in the same batch size and order.
    A dataset without len / indexing (IterableDataset) cannot be split: every rank then runs
    all of it, and evaluate does not sum the counts."""
    ds = loader.dataset
    share = distributed.shard_range(len(ds))
    return DataLoader(Subset(ds, share), batch_size=loader.batch_size or 500, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None) -> dict:
    """{"top1", "top5", "n"}: accuracies in percent over every sample of `loader` (a DataLoader,
    Dataset or (x, y) pair). Top-5 becomes top-k with k = number of classes when there are
    fewer than 5. The model runs in eval mode; its previous mode is restored. Under several
    processes every rank must call it (the counts are summed over ranks); each gets the
    result for the whole set."""
    loader = as_loader(loader)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    sharded = distributed.is_distributed() and not isinstance(loader.dataset, IterableDataset)
    if sharded:
        loader = _shard(loader)
    cl = CPU_CHANNELS_LAST and torch.device(device).type == "cpu"
    copied = _channels_last_copy(model) if cl else None
    run = copied if copied is not None else model
    was_training = model.training
    run.eval()
    correct1 = correct5 = n = 0
    try:
        for x, y in loader:
            if n == 0 and x.dim() == 4:
                why = channel_mismatch(model, tuple(x.shape[1:]))
                if why:
                    raise ValueError(f"test set: {why}")
            x, y = x.to(device), y.to(device)
            if copied is not None and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = run(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            n += int(y.numel())
    finally:
        model.train(was_training)
    if sharded:  # int64 on the model's device (NCCL reduces GPU tensors only); exact sums
        counts = torch.tensor([correct1, correct5, n], dtype=torch.int64, device=device)
        correct1, correct5, n = (int(v) for v in distributed.all_reduce_sum(counts).tolist())
    if n == 0:
        raise ValueError("evaluate got an empty test set")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n}


def compare(fp_model: nn.Module, quant_model: nn.Module, loader, device=None) -> dict:
    """Accuracy of the float and the quantized model on the same test set, and the drop."""
    loader = as_loader(loader)
    fp = evaluate(fp_model, loader, device)
    q = evaluate(quant_model, loader, device)
    return {"fp": fp, "quant": q, "top1_drop": fp["top1"] - q["top1"]}


def format_report(report: dict, label: str = "quantized") -> str:
    """A small markdown table of a `compare` result."""
    fp, q = report["fp"], report["quant"]
    return "\n".join([
        "| model | top-1 % | top-5 % | n |",
        "|---|---|---|---|",
        f"| float | {fp['top1']:.2f} | {fp['top5']:.2f} | {fp['n']} |",
        f"| {label} | {q['top1']:.2f} | {q['top5']:.2f} | {q['n']} |",
        f"\ntop-1 drop: {report['top1_drop']:.2f} points",
    ])
