"""DDP plumbing for the training loop: process group, devices, gradient and metric all-reduce.

The loop calls the same functions on 1 or N processes; without torchrun (no RANK/WORLD_SIZE in
the environment) every collective here is a no-op. Gradients are averaged by hand rather than by
wrapping the model in DistributedDataParallel because the alternating step calls the encoder,
quantizer and decoder separately (DDP only syncs gradients of its own ``forward``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.config import ConfigError
from vqmodel.distributed import is_distributed


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among ``world_size`` and its torch device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Runtime:
    """Pick the device and, under torchrun, join the process group (nccl on CUDA, gloo on CPU)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(  # a user error: one line and exit 2 from every CLI
            "device: cuda was requested, but this torch build sees no CUDA device "
            "(torch.cuda.is_available() is False); use device=cpu or device=auto"
        )
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Runtime(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments on first
        # import (building a torch.optim optimizer imports it). Imported after the group exists,
        # it would keep the group alive past destroy_process_group, and gloo's threads would run
        # into interpreter shutdown and abort the process ("terminate called without an active
        # exception"). Imported now, the defaults are None.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Runtime(dist.get_rank(), dist.get_world_size(), target)


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_module_(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (same start, whatever each rank seeded)."""
    if is_distributed():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0)


def all_reduce_gradients_(params: list[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flat buffer per dtype (one collective, not hundreds)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(dist.get_world_size())
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (stop requests, time limits)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def state_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (sorted by name): equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def digests_by_rank(module: nn.Module, device: torch.device) -> list[str]:
    """Every rank's :func:`state_digest` (16 hex digits each), gathered on all ranks."""
    own = state_digest(module)[:16]
    if not is_distributed():
        return [own]
    mine = torch.tensor([int(own, 16) - 2**63], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [f"{int(t.item()) + 2**63:016x}" for t in gathered]
