"""One codebook: raw rows C, the affine re-parameterisation, k-means++ init, dead-code replacement.

Everything here works on flat vectors [M, d]; reshaping, groups, residual stages and the
straight-through output live in :mod:`vqmodel.quantizer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqmodel.affine import CodebookAffine
from vqmodel.config import QuantizerConfig
from vqmodel.distributed import all_reduce_mean_, all_reduce_sum_, broadcast_, is_main_process
from vqmodel.kmeans import kmeans
from vqmodel.search import nearest_codes


class Codebook(nn.Module):
    """K codes of size d with the paper's optimisation toolkit.

    Training-mode side effects of :meth:`quantize` (never in eval mode or for ``train=False``):
    k-means++ init once enough vectors were seen, running-statistics update, dead-code
    replacement, usage counters. Under torch.distributed they are computed identically on every
    rank (counts are all-reduced, new rows are drawn on rank 0 and broadcast).
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
        if not bool(self.kmeans_done):
            self._collect_kmeans(z)
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
    def _collect_kmeans(self, z: torch.Tensor) -> None:
        self._kmeans_samples.append(z.float().clone())
        # the decision is taken on the total over ranks, so every rank initialises at the same step
        seen = torch.tensor(float(sum(s.shape[0] for s in self._kmeans_samples)))
        if all_reduce_mean_(seen) >= self.config.kmeans_sample_count:
            self.init_from_samples(torch.cat(self._kmeans_samples))

    @torch.no_grad()
    def init_from_samples(self, samples: torch.Tensor) -> None:
        """k-means++ + Lloyd on ``samples`` [n, d]; the EFFECTIVE codebook becomes the centroids.

        Works with fewer samples than codes (all K rows kept). Under DDP rank 0 computes and
        broadcasts, so every rank starts from the same codebook.
        """
        samples = samples.float()
        gen = torch.Generator().manual_seed(self.seed)
        need = self.config.kmeans_sample_count
        if samples.shape[0] > need:
            samples = samples[torch.randperm(samples.shape[0], generator=gen)[:need]]
        centers = torch.empty_like(self.weight)
        self.affine.update_statistics(samples, self.weight)  # collective: every rank calls it
        if is_main_process():
            centers.copy_(
                kmeans(samples.cpu(), self.config.num_codes, self.config.kmeans_iters, gen)
            )
        broadcast_(centers)
        all_rows = torch.arange(self.config.num_codes, device=self.weight.device)
        self._write_effective(all_rows, centers)
        for buffer in self.affine.buffers():  # running moments too, so ranks stay identical
            broadcast_(buffer)
        self.kmeans_done.fill_(True)
        self._kmeans_samples.clear()

    @torch.no_grad()
    def replace_codes(self, rows: torch.Tensor, z: torch.Tensor) -> None:
        """Re-initialise codes ``rows`` to recent encoder vectors (+ noise) so that their EFFECTIVE
        value equals that vector, reset their counters and their optimizer state."""
        gen = self._generator()
        n = rows.numel()
        new = torch.empty(n, z.shape[1], device=z.device)
        if is_main_process():
            pick = (
                torch.randperm(z.shape[0], generator=gen)[:n]
                if z.shape[0] >= n
                else torch.randint(z.shape[0], (n,), generator=gen)
            )
            noise_std = self.config.replace_noise * z.float().std(0, unbiased=False).mean()
            noise = torch.randn(n, z.shape[1], generator=gen).to(z.device) * noise_std
            new.copy_(z[pick.to(z.device)].float() + noise)
        broadcast_(new)
        self._write_effective(rows, new)
        self.unused_steps[rows] = 0

    @torch.no_grad()
    def _write_effective(self, rows: torch.Tensor, effective: torch.Tensor) -> None:
        rows = rows.to(self.weight.device)
        self.weight[rows] = self.affine.inverse(effective.to(self.weight), rows)
        for optimizer in self._optimizers:
            state = optimizer.state.get(self.weight)
            for value in (state or {}).values():
                if torch.is_tensor(value) and value.shape == self.weight.shape:
                    value[rows] = 0
