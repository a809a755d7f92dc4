"""Drop-in replacement for VQTorch's ``vqtorch.nn.VectorQuant`` (switch by changing one import).

Same keyword names and meaning, same ``(z_q, vq_dict)`` return with keys z, z_q, d, q, loss,
perplexity. Differences (bug fixes) are listed in the README ("Coming from VQTorch").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vqmodel.config import QuantizerConfig
from vqmodel.quantizer import VectorQuantizer

_NORMS = {None: "none", "none": "none", "l2": "l2"}


class VectorQuant(VectorQuantizer):
    """VQTorch-compatible constructor over :class:`VectorQuantizer`.

    ``affine_lr > 0`` turns on the learned affine re-parameterisation (as in VQTorch);
    ``inplace_optimizer`` is a callable ``params -> Optimizer`` as in VQTorch.
    """

    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        beta: float = 0.95,
        sync_nu: float = 0.0,
        affine_lr: float = 0.0,
        affine_groups: int = 1,
        replace_freq: int = 0,
        inplace_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        dim: int = 1,
        norm: str | None = "none",
        cb_norm: str | None = "none",
        kmeans_init: bool = False,
        **overrides: Any,
    ) -> None:
        for name, value in (("norm", norm), ("cb_norm", cb_norm)):
            if value not in _NORMS:
                raise ValueError(f"{name}={value!r} is not supported; use one of none, l2")
        config = QuantizerConfig(
            dim=feature_size,
            num_codes=num_codes,
            beta=beta,
            sync_nu=sync_nu,
            affine="learned" if affine_lr > 0 else "off",
            affine_lr=affine_lr if affine_lr > 0 else 1.0,
            affine_groups=affine_groups,
            replace_freq=replace_freq,
            inplace=inplace_optimizer is not None,
            channel_dim=dim,
            input_norm=_NORMS[norm],
            codebook_norm=_NORMS[cb_norm],
            kmeans_init=kmeans_init,
            **overrides,
        )
        super().__init__(config)
        if inplace_optimizer is not None:
            for book in self.codebooks:
                book._optimizers.remove(book.inner_optimizer)
                book.inner_optimizer = inplace_optimizer(book.parameters())
                book._optimizers.append(book.inner_optimizer)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:  # type: ignore[override]
        z_q, info = super().forward(z)
        rows, batch_shape = self._to_rows(z)
        groups = self.config.groups
        # VQTorch's vq_dict: z and z_q channel-last with a group axis, d and q with a group axis
        with torch.no_grad():
            codes = self._from_rows(rows, batch_shape).movedim(self.config.channel_dim, -1)
            quantized = z_q.movedim(self.config.channel_dim, -1)
        vq_dict = {
            "z": codes.unflatten(-1, (groups, -1)),
            "z_q": quantized.detach().unflatten(-1, (groups, -1)),
            "d": info["distances"].reshape(*batch_shape, groups),
            "q": info["indices"].reshape(*batch_shape, groups),
            "loss": info["loss"],
            "perplexity": info["perplexity"],
        }
        return z_q, vq_dict
