"""k-means++ seeding + Lloyd refinement in pure torch (CPU or CUDA, no extra dependencies)."""

from __future__ import annotations

import torch

from vqmodel.search import nearest_codes


def _sq_dist_to(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    return (x - center).pow(2).sum(1)


@torch.no_grad()
def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2.

    Never returns fewer than ``k`` rows: with n < k samples, every sample becomes a centre and the
    remaining rows are samples plus noise at 1% of the data's std (distinct, near the data).
    """
    x = x.float()
    n, d = x.shape
    if n == 0:
        raise ValueError("k-means needs at least one sample vector, got 0")
    if n < k:
        std = x.std(0, unbiased=False).mean().clamp_min(1e-6) if n > 1 else x.abs().mean() + 1e-3
        extra = torch.randint(n, (k - n,), generator=generator, device=x.device)
        noise = torch.randn(k - n, d, generator=generator, device=x.device) * 0.01 * std
        return torch.cat([x, x[extra] + noise])

    centers = torch.empty(k, d, device=x.device)
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centers[0] = x[first[0]]
    closest = _sq_dist_to(x, centers[0])
    for i in range(1, k):
        total = closest.sum()
        # every sample already coincides with a centre: draw uniformly
        probs = torch.ones_like(closest) if total <= 0 else closest / total
        pick = torch.multinomial(probs, 1, generator=generator)[0]
        centers[i] = x[pick]
        torch.minimum(closest, _sq_dist_to(x, centers[i]), out=closest)
    return centers


@torch.no_grad()
def kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator, chunk_size: int = 4096
) -> torch.Tensor:
    """k-means++ seeds refined by ``iters`` Lloyd steps; empty clusters keep their centre."""
    x = x.float()
    centers = kmeans_plus_plus(x, k, generator)
    if x.shape[0] < k:
        return centers
    for _ in range(iters):
        assign, _ = nearest_codes(x, centers, chunk_size)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    return centers
