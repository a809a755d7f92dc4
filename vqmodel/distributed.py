"""The few collective operations the quantizer needs; no-ops when not running distributed.

Callers pass tensors on the codebook's device: NCCL (the GPU backend) refuses CPU tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src`` so every rank holds identical values."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (exact for equal per-rank batch sizes)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` [n_r, ...] concatenated in rank order, on every rank; the counts
    n_r may differ between ranks."""
    if not is_distributed():
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    # all_gather needs one shape on every rank: pad to the largest count, trim afterwards
    padded = rows.new_zeros(max(sizes), *rows.shape[1:])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
