"""One codebook: raw rows C, the affine re-parameterisation, k-means++ init, dead-code replacement.

Everything here works on flat vectors [M, d]; reshaping, groups, residual stages and the
straight-through output live in :mod:`vqmodel.quantizer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqmodel.affine import CodebookAffine
from vqmodel.config import QuantizerConfig
from vqmodel.distributed import (
    all_gather_rows,
    all_reduce_mean_,
    all_reduce_sum_,
    broadcast_,
    is_main_process,
)
from vqmodel.kmeans import kmeans
from vqmodel.search import nearest_codes


class Codebook(nn.Module):
    """K codes of size d with the paper's optimisation toolkit.

    Training-mode side effects of :meth:`quantize` (never in eval mode or for ``train=False``):
    k-means++ init once enough vectors were seen, running-statistics update, dead-code
    replacement, usage counters. Under torch.distributed they are computed identically on every
    rank (counts are all-reduced, new rows are drawn on rank 0 and broadcast), and every tensor
    handed to a collective lives on the codebook's device (NCCL refuses CPU tensors).

    Writing a code (k-means init, dead-code replacement) sets its EFFECTIVE value to the target
    vector x: A(C)_k = x, the affine inverted. With ``codebook_norm='l2'`` the code the model uses
    is A(C)_k / ||A(C)_k||, a unit vector, so "equals x" means equals x / ||x||, the unit vector
    nearest to x (no unit vector equals a target of another norm).
    """

    def __init__(self, config: QuantizerConfig, index: int = 0) -> None:
        super().__init__()
        self.config = config
        k, d = config.num_codes, config.sub_dim
        std = config.init_std if config.init_std is not None else d**-0.5
        gen = torch.Generator().manual_seed(config.seed + 7919 * index)
        self.weight = nn.Parameter(torch.randn(k, d, generator=gen) * std)
        self.affine = CodebookAffine(
            config.affine, k, d, config.affine_groups, config.affine_lr, config.affine_momentum
        )
        self.seed = config.seed + 7919 * index
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("unused_steps", torch.zeros(k, dtype=torch.long))
        self.register_buffer("kmeans_done", torch.tensor(not config.kmeans_init))
        self._kmeans_samples: list[torch.Tensor] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self.inner_optimizer: torch.optim.Optimizer | None = None
        if config.inplace:
            opt = torch.optim.Adam if config.inplace_optimizer == "adam" else torch.optim.SGD
            self.inner_optimizer = opt(self.parameters(), lr=config.inplace_lr)
            self._optimizers.append(self.inner_optimizer)

    # -- k-means samples still being collected (part of a training checkpoint) -----------------
    def kmeans_state(self) -> list[torch.Tensor]:
        """CPU copies of the vectors collected for k-means init so far (empty once it ran).

        Save it with the training state and give it to :meth:`load_kmeans_state` on resume, so a
        run interrupted during collection initialises from the same vectors at the same step.
        """
        return [s.detach().to("cpu", copy=True) for s in self._kmeans_samples]

    def load_kmeans_state(self, samples: Sequence[torch.Tensor]) -> None:
        """Restore what :meth:`kmeans_state` returned (moved to the codebook's device)."""
        d = self.config.sub_dim
        for i, s in enumerate(samples):
            if s.dim() != 2 or s.shape[1] != d:
                raise ValueError(
                    f"k-means sample block {i} has shape {tuple(s.shape)}; this codebook "
                    f"collects [n, {d}] blocks (quantizer dim / groups)"
                )
        self._kmeans_samples = [s.to(self.weight.device, torch.float32) for s in samples]

    # -- the codebook the model uses ------------------------------------------------------------
    def effective(self) -> torch.Tensor:
        """C_hat = A(C), rows L2-normalised when codebook_norm == 'l2'."""
        codebook = self.affine(self.weight)
        if self.config.codebook_norm == "l2":
            codebook = F.normalize(codebook, dim=1)
        return codebook

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Register an optimizer whose per-row state is reset when codes are re-initialised."""
        self._optimizers.append(optimizer)

    def _generator(self) -> torch.Generator:
        # derived from (seed, step) so a resumed run draws exactly what the original would have
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))

    # -- quantize --------------------------------------------------------------------------------
    def quantize(
        self, z: torch.Tensor, train: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest effective codes for rows of ``z`` [M, d].

        Returns (C_hat_q [M, d] differentiable w.r.t. the codebook, indices [M], sq. distances [M]).
        """
        if train:
            self._before_search(z.detach())
        codebook = self.effective()
        indices, distances = nearest_codes(z.detach(), codebook, self.config.chunk_size)
        if train:
            self._after_search(indices)
        return F.embedding(indices, codebook), indices, distances

    def inplace_step(self, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """In-place alternating step: minimise beta * mean||sg(z) - C_hat_q||^2 w.r.t. this
        codebook with its own optimizer, then re-embed from the UPDATED codebook.

        Gradients go through ``torch.autograd.grad`` and the parameters' previous ``.grad`` is
        restored afterwards, so nothing leaks into the outer optimizer.
        """
        assert self.inner_optimizer is not None
        params = [p for p in self.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self.config.beta * F.mse_loss(
                F.embedding(indices, self.effective()), z.detach().float()
            )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        saved = [p.grad for p in params]
        for p, g in zip(params, grads):
            p.grad = None if g is None else all_reduce_mean_(g)
        self.inner_optimizer.step()
        for p, g in zip(params, saved):
            p.grad = g
        return F.embedding(indices, self.effective())

    # -- training-mode bookkeeping ---------------------------------------------------------------
    @torch.no_grad()
    def _before_search(self, z: torch.Tensor) -> None:
        # the running statistics move once per step: the k-means step already moved them, from
        # the samples of every rank, before writing the centroids through the affine
        initialised_now = not bool(self.kmeans_done) and self._collect_kmeans(z)
        if not initialised_now:
            self.affine.update_statistics(z, self.weight)
        if self.config.replace_freq > 0:
            dead = (self.unused_steps >= self.config.replace_freq).nonzero().flatten()
            if dead.numel():
                self.replace_codes(dead, z)

    @torch.no_grad()
    def _after_search(self, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.config.num_codes)
        used = all_reduce_sum_(counts) > 0
        self.unused_steps.add_(1).masked_fill_(used, 0)
        self.steps.add_(1)

    @torch.no_grad()
    def _collect_kmeans(self, z: torch.Tensor) -> bool:
        """Keep ``z``; initialise once all ranks together hold enough. Returns whether it did."""
        self._kmeans_samples.append(z.float().clone())
        # decided on the total over ranks, so every rank initialises at the same step
        held = sum(s.shape[0] for s in self._kmeans_samples)
        seen = torch.tensor(held, dtype=torch.long, device=self.weight.device)
        if int(all_reduce_sum_(seen)) < self.config.kmeans_sample_count:
            return False
        self.init_from_samples(torch.cat(self._kmeans_samples))
        return True

    @torch.no_grad()
    def init_from_samples(self, samples: torch.Tensor) -> None:
        """k-means++ + Lloyd on the ``samples`` [n, d] of every rank; the EFFECTIVE codebook
        becomes the centroids.

        Collective under torch.distributed (every rank calls it at the same step): the samples of
        all ranks are gathered, the running statistics move once, from them, rank 0 clusters them
        (at most ``kmeans_sample_count``, drawn with the codebook's seed) and broadcasts the
        centroids, so every rank starts from the same codebook. Works with fewer samples than
        codes (all K rows kept). The usage counters restart: the new codes have not been used or
        missed yet, so replacement judges them from this step on.
        """
        samples = all_gather_rows(samples.detach().float().to(self.weight.device))
        self.affine.update_statistics(samples, self.weight)
        centers = torch.empty_like(self.weight)
        if is_main_process():
            gen = torch.Generator().manual_seed(self.seed)
            need = self.config.kmeans_sample_count
            if samples.shape[0] > need:
                pick = torch.randperm(samples.shape[0], generator=gen, device="cpu")[:need]
                samples = samples[pick.to(samples.device)]
            k, iters = self.config.num_codes, self.config.kmeans_iters
            centers.copy_(kmeans(samples.cpu(), k, iters, gen))
        broadcast_(centers)
        all_rows = torch.arange(self.config.num_codes, device=self.weight.device)
        self._write_effective(all_rows, centers)
        for buffer in self.affine.buffers():  # running moments too, so ranks stay identical
            broadcast_(buffer)
        self.unused_steps.zero_()
        self.kmeans_done.fill_(True)
        self._kmeans_samples.clear()

    @torch.no_grad()
    def replace_codes(self, rows: torch.Tensor, z: torch.Tensor) -> None:
        """Re-initialise codes ``rows`` to recent encoder vectors (+ noise) so that their EFFECTIVE
        value equals that vector (its direction under codebook_norm='l2'), reset their counters
        and their optimizer state. Rank 0 draws, every rank writes the same rows."""
        gen = self._generator()
        n, m = rows.numel(), z.shape[0]
        new = torch.empty(n, z.shape[1], device=self.weight.device)
        if is_main_process():
            # drawn on the CPU generator, so a seed gives the same codes on any device
            pick = (
                torch.randperm(m, generator=gen, device="cpu")[:n]
                if m >= n
                else torch.randint(m, (n,), generator=gen, device="cpu")
            )
            noise_std = self.config.replace_noise * z.float().std(0, unbiased=False).mean()
            noise = torch.randn(n, z.shape[1], generator=gen, device="cpu").to(z.device)
            new.copy_(z[pick.to(z.device)].float() + noise * noise_std)
        broadcast_(new)
        self._write_effective(rows, new)
        self.unused_steps[rows] = 0

    @torch.no_grad()
    def _write_effective(self, rows: torch.Tensor, effective: torch.Tensor) -> None:
        """C[rows] such that A(C)[rows] == ``effective``; those rows' optimizer state restarts."""
        rows = rows.to(self.weight.device)
        current = self.weight[rows]
        self.weight[rows] = self.affine.inverse(effective.to(self.weight), rows, current)
        for optimizer in self._optimizers:
            state = optimizer.state.get(self.weight)
            for value in (state or {}).values():
                if torch.is_tensor(value) and value.shape == self.weight.shape:
                    value[rows] = 0
