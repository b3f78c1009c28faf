"""Data-parallel ``extend`` under torchrun: ``torchrun --nproc_per_node=N -m detgraft extend ...``.

torchrun starts N processes and tells each its ``RANK`` and ``WORLD_SIZE``. Each process trains
the model on its share of every batch (example k of a batch goes to rank k mod N, so a step still
sees ``--batch-size`` images, as in one process) and ``DistributedDataParallel`` averages the
gradients: the steps are those of one process with the whole batch, up to the models' own random
sampling (torchvision's proposal and RoI samplers), which each process draws from a generator
seeded with ``seed + rank``. Only rank 0 writes logs, checkpoints, settings and reports; the
teacher (where a strategy has one) runs in every process, on that process's images. Backends:
gloo on the CPU, NCCL on CUDA (each process on the GPU of its ``LOCAL_RANK``). Without torchrun
nothing here does anything.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["any_process", "is_main", "mean", "start", "stop", "world", "wrap"]


def world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def start(device: str) -> bool:
    """Joins torchrun's process group unless the program already has (on CUDA, "cuda" becomes this
    process's GPU); whether it joined here (then ``stop`` leaves it)."""
    if world()[1] == 1 or dist.is_initialized():
        return False
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when there are several processes (the model itself
    otherwise). Unused parameters are allowed: a strategy may train a head that a batch without
    its classes leaves out of the loss."""
    if world()[1] == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the processes (``values`` itself with one)."""
    if world()[1] == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / world()[1]


def any_process(flag: bool, device) -> bool:
    """Whether ``flag`` is set in any process (all of them agree on the answer)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
