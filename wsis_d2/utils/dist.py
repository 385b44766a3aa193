"""
The model inside DistributedDataParallel, and loss normalisers of a distributed run.
DistributedDataParallel averages the processes' gradients, so a loss that each process divides by
its own count (bags, labelled pixels) weighs the items of a process with few of them more than one
process over the whole batch would; dividing by the count averaged over the processes gives the
gradient of the mean over all of the batch's items.
"""

import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["mean_over_processes", "unwrap"]


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """
    ``x`` (any shape, e.g. counts (K,)) averaged over the processes of a distributed run (one
    ``all_reduce``), ``x`` itself in a single process; detached, float. A collective: every process
    must call it at the same point.
    """
    x = x.detach().float()
    if comm.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / comm.get_world_size()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (a trainer's model on several processes) or
    DataParallel, else ``model`` itself."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return model.module
    return model
