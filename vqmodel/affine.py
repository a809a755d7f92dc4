"""Affine re-parameterisation of a codebook: every code moves, selected or not.

The codebook the model uses is C_hat = A(C), one transform shared per contiguous block of codes
(``affine_groups`` blocks), so a gradient that reaches the transform through the few selected codes
also moves the unselected ones towards the data: the paper's cure for index collapse.
"""

from __future__ import annotations

import torch
from torch import nn

from vqmodel.distributed import all_reduce_mean_

_EPS = 1e-5
# below this |scale| the affine has collapsed a dimension: inverse() does not divide by it
_MIN_SCALE = 1e-5


class CodebookAffine(nn.Module):
    """``off``: C_hat = C.

    ``learned``: C_hat_k = (1 + lr * s_g) * C_k + lr * b_g, s = b = 0 at init (identity); ``lr``
    (affine_lr) scales the parameters' effective step without touching the optimizer.

    ``running``: C_hat = sigma_z / sigma_C * (C - mu_C) + mu_z, per dimension and code block, with
    EMA moments of the encoder outputs (z) and of the raw codebook (C). The first training batch
    sets the moments directly, so the codebook matches the input's scale from step one. Moments are
    only updated in training mode (:meth:`update_statistics` is a no-op in eval).
    """

    def __init__(
        self, mode: str, num_codes: int, dim: int, groups: int, lr: float, momentum: float
    ) -> None:
        super().__init__()
        self.mode = mode
        self.groups = groups
        self.codes_per_group = num_codes // groups
        self.lr = lr
        self.momentum = momentum
        if mode == "learned":
            self.scale = nn.Parameter(torch.zeros(groups, 1, dim))
            self.bias = nn.Parameter(torch.zeros(groups, 1, dim))
        elif mode == "running":
            self.register_buffer("z_mean", torch.zeros(dim))
            self.register_buffer("z_var", torch.ones(dim))
            self.register_buffer("c_mean", torch.zeros(groups, 1, dim))
            self.register_buffer("c_var", torch.ones(groups, 1, dim))
            self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, bias) of shape [groups, 1, D] such that C_hat = scale * C + bias."""
        if self.mode == "learned":
            return 1.0 + self.lr * self.scale, self.lr * self.bias
        if self.mode == "running":
            scale = (self.z_var / (self.c_var + _EPS)).sqrt()
            return scale, self.z_mean - scale * self.c_mean
        return None

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        params = self.scale_and_bias()
        if params is None:
            return codebook
        scale, bias = params
        k, d = codebook.shape
        return (codebook.view(self.groups, k // self.groups, d) * scale + bias).view(k, d)

    @torch.no_grad()
    def inverse(
        self, effective: torch.Tensor, rows: torch.Tensor, current: torch.Tensor
    ) -> torch.Tensor:
        """Raw rows C[rows] such that A(C)[rows] == ``effective`` (used to write codes).

        Where the transform has collapsed a dimension (|scale| < 1e-5: a learned scale driven to
        0, or a running scale over a constant input channel) every code maps to the bias there,
        so no raw value reaches the target, and dividing would write inf/NaN or a huge value into
        the codebook; those entries keep their ``current`` raw value.
        """
        params = self.scale_and_bias()
        if params is None:
            return effective
        scale, bias = params
        group = rows // self.codes_per_group
        scale, bias = scale[group, 0], bias[group, 0]
        # C = (C_hat - b) / s, only where s can be divided by
        usable = scale.abs() >= _MIN_SCALE
        raw = (effective - bias) / torch.where(usable, scale, torch.ones_like(scale))
        return torch.where(usable, raw, current)

    @torch.no_grad()
    def update_statistics(self, z: torch.Tensor, codebook: torch.Tensor) -> None:
        """EMA update of the running moments; call in training mode only."""
        if self.mode != "running":
            return
        k, d = codebook.shape
        z = z.float()
        cb = codebook.float().view(self.groups, k // self.groups, d)
        # E[z] and E[z^2] averaged over ranks: every rank keeps identical statistics under DDP
        z_moments = all_reduce_mean_(torch.stack([z.mean(0), z.pow(2).mean(0)]))
        z_mean, z_var = z_moments[0], (z_moments[1] - z_moments[0].pow(2)).clamp_min(0.0)
        c_mean, c_var = cb.mean(1, keepdim=True), cb.var(1, unbiased=False, keepdim=True)
        if not bool(self.initialised):
            self.z_mean.copy_(z_mean)
            self.z_var.copy_(z_var)
            self.c_mean.copy_(c_mean)
            self.c_var.copy_(c_var)
            self.initialised.fill_(True)
            return
        m = self.momentum
        self.z_mean.lerp_(z_mean, m)
        self.z_var.lerp_(z_var, m)
        self.c_mean.lerp_(c_mean, m)
        self.c_var.lerp_(c_var, m)
