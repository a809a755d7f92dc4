"""Codebook usage: per-batch numbers for logging, whole-set numbers from an accumulator."""

from __future__ import annotations

import torch


def perplexity_of_counts(counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution given by ``counts`` (1 .. K; 0 for no data)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.double() / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class UsageAccumulator:
    """Counts code use over a whole data set (or a training window), not one batch.

    ``usage`` is the fraction of codes used at least once, ``perplexity`` exp(entropy) of the
    pooled distribution, ``dead_codes`` the number never used.
    """

    def __init__(self, num_codes: int) -> None:
        self.num_codes = num_codes
        self.counts = torch.zeros(num_codes, dtype=torch.long)

    def update(self, indices: torch.Tensor) -> None:
        flat = indices.detach().reshape(-1).cpu()
        if flat.numel():
            low, high = int(flat.min()), int(flat.max())
            if low < 0 or high >= self.num_codes:
                raise ValueError(f"indices must lie in [0, {self.num_codes}), got {low}..{high}")
        self.counts += torch.bincount(flat, minlength=self.num_codes)

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def usage(self) -> float:
        return float((self.counts > 0).double().mean())

    @property
    def perplexity(self) -> float:
        return perplexity_of_counts(self.counts)

    @property
    def dead_codes(self) -> int:
        return int((self.counts == 0).sum())

    def summary(self) -> dict[str, float]:
        return {"usage": self.usage, "perplexity": self.perplexity, "dead_codes": self.dead_codes}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].clone().long()
