"""The vector quantizer: straight-through estimator with synchronised commitment, groups and
residual stages on top of :class:`vqmodel.codebook.Codebook`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqmodel.codebook import Codebook
from vqmodel.config import QuantizerConfig
from vqmodel.distributed import all_reduce_mean_
from vqmodel.usage import perplexity_of_counts


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly C_hat_q, in z's shape (a view of the rows: no copy). Backward: upstream g
    to z, nu * g to C_hat_q (one fused node instead of four elementwise autograd ops)."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, quantized: torch.Tensor, nu: float, layout: tuple[int, ...]
    ) -> torch.Tensor:
        batch_shape, channel_dim = layout[:-1], layout[-1]
        ctx.nu, ctx.rows_shape = nu, z.shape
        ctx.batch_shape, ctx.channel_dim = batch_shape, channel_dim
        # the rows' own layout (channels last for NCHW input), not a contiguous NCHW copy: the
        # copy cost a transposition each way, and channels-last maps keep the convs around the
        # layer in their fast path (benchmarks/vq_in_context.py)
        return quantized.detach().reshape(*batch_shape, -1).movedim(-1, channel_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_rows = grad.movedim(ctx.channel_dim, -1).reshape(ctx.rows_shape)
        return grad_rows, (grad_rows * ctx.nu if ctx.nu else None), None, None


class _SquaredError(torch.autograd.Function):
    """(mean||sg(z) - q||^2, mean||z - sg(q)||^2): the codebook and commitment terms share one
    value, so it is computed once; the codebook term's gradient goes to q only, the commitment
    term's to z only."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = z.detach() - q.detach()
        ctx.save_for_backward(diff)
        flat = diff.reshape(-1)
        value = torch.dot(flat, flat) / flat.numel()  # no squared temporary
        return value, value.clone()

    @staticmethod
    def backward(
        ctx: Any, grad_codebook: torch.Tensor, grad_commitment: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (diff,) = ctx.saved_tensors
        scale = 2.0 / diff.numel()
        grad_z = diff * (grad_commitment * scale) if ctx.needs_input_grad[0] else None
        grad_q = diff * (grad_codebook * -scale) if ctx.needs_input_grad[1] else None
        return grad_z, grad_q


class VectorQuantizer(nn.Module):
    """Quantize the ``channel_dim`` axis of any tensor ((N,C,H,W) images, (N,L,C) sequences).

    ``forward(z) -> (z_q, info)`` with z_q the same shape as z and ``info``:

    - ``indices``: int64, z's shape without the channel axis, plus a trailing R axis when
      residual_stages > 1 and a trailing G axis when groups > 1 (in that order).
    - ``loss``: L_vq = beta * loss_codebook + (1 - beta) * loss_commitment, summed over stages.
      With ``inplace`` the codebook term was already minimised inside forward, so ``loss`` is the
      commitment term only and ``loss_codebook`` is reported detached.
    - ``loss_codebook`` = mean||sg(z) - C_hat_q||^2,
      ``loss_commitment`` = mean||z - sg(C_hat_q)||^2.
    - ``distances``: squared distance of every vector (last stage) to its code, indices' shape.
    - ``usage``, ``perplexity``: THIS batch only (mean over codebooks); whole-set numbers come from
      :class:`vqmodel.UsageAccumulator`.
    """

    def __init__(self, config: QuantizerConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        base = config.model_dump() if config is not None else {}
        self.config = QuantizerConfig(**{**base, **overrides})
        cfg = self.config
        per_stage = 1 if cfg.shared_codebook else cfg.groups
        self.codebooks = nn.ModuleList(
            Codebook(cfg, index=i) for i in range(cfg.residual_stages * per_stage)
        )

    # -- helpers ---------------------------------------------------------------------------------
    def _book(self, stage: int, group: int) -> Codebook:
        per_stage = 1 if self.config.shared_codebook else self.config.groups
        return self.codebooks[stage * per_stage + (0 if self.config.shared_codebook else group)]

    def _to_rows(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """[..., C, ...] -> [M, G, d] rows (input norm applied) and the batch shape."""
        cfg = self.config
        if z.shape[cfg.channel_dim] != cfg.dim:
            raise ValueError(
                f"expected {cfg.dim} features on axis {cfg.channel_dim}, got shape {tuple(z.shape)}"
            )
        x = z.movedim(cfg.channel_dim, -1)
        batch_shape = x.shape[:-1]
        rows = x.reshape(-1, cfg.groups, cfg.sub_dim)
        if cfg.input_norm == "l2":
            rows = F.normalize(rows, dim=-1)
        return rows, batch_shape

    def _from_rows(self, rows: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
        x = rows.reshape(*batch_shape, self.config.dim)
        return x.movedim(-1, self.config.channel_dim)

    def _quantize_stage(
        self, stage: int, residual: torch.Tensor, train: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stage on [M, G, d] -> (C_hat_q [M, G, d], indices [M, G], distances [M, G])."""
        m, g, d = residual.shape
        if self.config.shared_codebook:
            q, idx, dist = self._book(stage, 0).quantize(residual.reshape(m * g, d), train)
            return q.view(m, g, d), idx.view(m, g), dist.view(m, g)
        parts = [self._book(stage, j).quantize(residual[:, j], train) for j in range(g)]
        return tuple(torch.stack(t, dim=1) for t in zip(*parts))  # type: ignore[return-value]

    def _inplace_stage(
        self, stage: int, residual: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        m, g, d = residual.shape
        if self.config.shared_codebook:
            book = self._book(stage, 0)
            return book.inplace_step(residual.reshape(m * g, d), indices.reshape(-1)).view(m, g, d)
        parts = [self._book(stage, j).inplace_step(residual[:, j], indices[:, j]) for j in range(g)]
        return torch.stack(parts, dim=1)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        rows, batch_shape = self._to_rows(z)
        train = self.training
        inplace = cfg.inplace and train and torch.is_grad_enabled()

        residual = rows
        quantized = rows  # replaced by the first stage's codes below
        codebook_terms, commitment_terms = [], []
        all_indices, counts = [], []
        distances = None
        for stage in range(cfg.residual_stages):
            q, idx, distances = self._quantize_stage(stage, residual, train)
            if inplace:  # the codebook term is minimised by the inner step: no outer gradient
                q = self._inplace_stage(stage, residual, idx)
                codebook_term, commitment_term = _SquaredError.apply(residual, q.detach())
            else:
                codebook_term, commitment_term = _SquaredError.apply(residual, q)
            codebook_terms.append(codebook_term)
            commitment_terms.append(commitment_term)
            quantized = q if stage == 0 else quantized + q
            if stage + 1 < cfg.residual_stages:
                residual = residual - q.detach()
            all_indices.append(idx)
            per_book = [idx] if cfg.shared_codebook else list(idx.unbind(1))
            counts += [torch.bincount(i.flatten(), minlength=cfg.num_codes) for i in per_book]

        # out = z + sg(C_hat_q - z) + nu * (C_hat_q - sg(C_hat_q)), written so the forward value is
        # exactly C_hat_q (z - sg(z) is exactly 0; z + (q - z) would round): d out/d z = I and the
        # selected codes get nu x the task gradient.
        out = _StraightThrough.apply(rows, quantized, cfg.sync_nu, (*batch_shape, cfg.channel_dim))

        loss_codebook, loss_commitment = sum(codebook_terms), sum(commitment_terms)
        if inplace:
            loss = (1.0 - cfg.beta) * loss_commitment
        else:
            loss = cfg.beta * loss_codebook + (1.0 - cfg.beta) * loss_commitment
        info = {
            "indices": self._shape_indices(torch.stack(all_indices, dim=1), batch_shape),
            "distances": distances.reshape(*batch_shape, cfg.groups).squeeze(-1)
            if cfg.groups == 1
            else distances.reshape(*batch_shape, cfg.groups),
            "loss": loss,
            "loss_codebook": loss_codebook,
            "loss_commitment": loss_commitment,
            **self._batch_usage(counts),
        }
        return out, info

    def _shape_indices(self, idx: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
        """[M, R, G] -> batch_shape (+ R if R > 1) (+ G if G > 1)."""
        cfg = self.config
        idx = idx.reshape(*batch_shape, cfg.residual_stages, cfg.groups)
        if cfg.groups == 1:
            idx = idx.squeeze(-1)
        if cfg.residual_stages == 1:
            idx = idx.squeeze(len(batch_shape))
        return idx

    @staticmethod
    def _batch_usage(counts: list[torch.Tensor]) -> dict[str, float]:
        usage = sum(float((c > 0).double().mean()) for c in counts) / len(counts)
        perplexity = sum(perplexity_of_counts(c) for c in counts) / len(counts)
        return {"usage": usage, "perplexity": perplexity}

    # -- two-pass alternating optimisation ------------------------------------------------------
    def codebook_step(self, z: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        """Step (1) of the paper's alternating optimisation, computed on the model's own z.

        Minimises beta * mean||sg(z) - C_hat_q||^2 over the codebook (and affine) parameters with
        ``optimizer``, using the assignments of the CURRENT codebook; no training-mode side effects
        (those happen in the following ``forward``, the re-assignment of step (2)). Gradients
        already sitting on the codebook (the sync term nu x task gradient of the previous model
        step) are applied together with this step; the optimizer's grads are cleared afterwards.

        Returns the codebook loss before the step.
        """
        rows, _ = self._to_rows(z.detach())
        residual = rows
        loss = rows.new_zeros(())
        for stage in range(self.config.residual_stages):
            q, _, _ = self._quantize_stage(stage, residual, train=False)
            loss = loss + F.mse_loss(residual, q)
            residual = residual - q.detach()
        (self.config.beta * loss).backward()
        for param in self.codebook_parameters():  # outside DDP's forward: average by hand
            if param.grad is not None:
                all_reduce_mean_(param.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def codebook_parameters(self) -> list[nn.Parameter]:
        """Raw codebooks and affine parameters (the codebook optimizer's parameter group)."""
        return list(self.codebooks.parameters())

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let dead-code replacement and k-means init reset ``optimizer``'s per-code state."""
        for book in self.codebooks:
            book.attach_optimizer(optimizer)
