"""Process-group helpers for running synq on several processes (GPUs, machines) with PyTorch's
own engine: `torchrun` starts the processes, torch.distributed connects them, and
DistributedDataParallel averages the student's gradients during fine-tuning.

Everything here degrades to a single process: without a process group `world_size()` is 1,
`rank()` 0, and the collectives return their input, so synthesis, fine-tuning and evaluation
call them unconditionally. `process_group()` starts a group only when torchrun's environment
says there are several processes (WORLD_SIZE > 1): NCCL for CUDA devices, gloo otherwise.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["env_world_size", "is_distributed", "world_size", "rank", "local_rank", "is_main",
           "barrier", "all_reduce_sum", "all_reduce_min_max", "broadcast_object",
           "gather_objects", "resolve_device", "process_group", "shard_range", "local_slice"]

# How long a collective waits for a missing rank before failing; generous because rank 0
# alone writes the (possibly multi-GB) synthetic set between two collectives.
TIMEOUT = timedelta(minutes=int(os.environ.get("SYNQ_DIST_TIMEOUT_MIN", "60")))


def env_world_size() -> int:
    """Number of processes torchrun started (its WORLD_SIZE variable; 1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE must be an integer, got "
                         f"{os.environ['WORLD_SIZE']!r}") from e


def is_distributed() -> bool:
    """Whether a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK), which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the one process that writes files, logs and shows progress."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks (a new tensor; `t` itself is left alone)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min_max(lo: torch.Tensor, hi: torch.Tensor):
    """(min of `lo`, max of `hi`) over all ranks, in one collective: max(-lo) = -min(lo) is
    exact in floating point."""
    if not is_distributed():
        return lo, hi
    both = torch.stack([-lo.detach(), hi.detach()])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return -both[0], both[1]


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src`, on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj, dst: int = 0):
    """The list of every rank's `obj` (in rank order) on rank `dst`; None on the others."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def shard_range(n: int, parts: int | None = None, index: int | None = None) -> range:
    """Contiguous share `index` of range(n) cut into `parts` nearly equal pieces (sizes differ
    by at most one; no padding, so every element belongs to exactly one share)."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    return range(n * index // parts, n * (index + 1) // parts)


def local_slice(global_batch: int) -> slice:
    """This rank's slice of a global batch that every rank draws identically; the batch must
    split evenly so that DDP's gradient average equals the global batch mean."""
    w = world_size()
    if global_batch % w:
        raise ValueError(f"batch_size {global_batch} must be divisible by the number of "
                         f"processes ({w}): each process takes batch_size / {w} samples of the "
                         f"global batch")
    per = global_batch // w
    return slice(rank() * per, (rank() + 1) * per)


def resolve_device(device) -> torch.device:
    """The device of this process: under several processes, "cuda" means cuda:LOCAL_RANK (one
    GPU per process); an explicit cuda index is refused there, since every rank would take it."""
    device = torch.device(device)
    if env_world_size() > 1 and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device {device} names one GPU, but torchrun started "
                             f"{env_world_size()} processes: pass 'cuda' and each process takes "
                             f"the GPU of its LOCAL_RANK")
        device = torch.device("cuda", local_rank())
    return device


@contextmanager
def process_group(device="cpu"):
    """Join the process group torchrun describes (env:// variables), if there is more than
    one process and no group yet; leave it on exit. NCCL when `device` is a GPU, gloo
    otherwise. Yields this process's device (see resolve_device)."""
    device = resolve_device(device)
    created = False
    if env_world_size() > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is {env_world_size()} but {', '.join(missing)} "
                               f"is not set: start the processes with torchrun")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before init: NCCL binds each rank to its GPU
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method="env://", timeout=TIMEOUT, **kwargs)
        created = True
    try:
        yield device
    finally:
        if created:
            dist.destroy_process_group()
