"""Data parallel training under torchrun, in a few helpers: every rank samples its own prompts and rollouts, and
the update sums token counts and gradients over the ranks. On one process (WORLD_SIZE unset or 1) nothing is
started and every helper returns its input unchanged."""
import os
import sys

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world size). Under torchrun, join its process group: nccl with one GPU per rank (LOCAL_RANK),
    gloo on CPU. Only rank 0 prints; stderr stays open everywhere so that any rank's error shows."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), world


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _reduce(x, op):
    if not dist.is_initialized():
        return x
    t = x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64, device=_device())
    dist.all_reduce(t, op)
    return t if isinstance(x, torch.Tensor) else t.item()


def all_sum(x):
    """x summed over the ranks: a tensor (on the backend's device) in place, or a number."""
    return _reduce(x, dist.ReduceOp.SUM)


def all_max(x):
    """x's maximum over the ranks (e.g. a step's wall time, so that every rank counts the same clock)."""
    return _reduce(x, dist.ReduceOp.MAX)


def broadcast(params) -> None:
    """Rank 0's values in every rank's parameters (a random LoRA init must start equal everywhere)."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, 0)


def all_sum_grads(params) -> None:
    """Sum the gradients over the ranks, one flat buffer per dtype; a rank without one adds zeros.

    A sum, not DDP's mean: the DAPO loss is already divided by the global token count."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
