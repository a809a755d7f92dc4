"""One validated, serialisable config object for every quantizer option."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class QuantizerConfig(BaseModel):
    """All options of :class:`vqmodel.VectorQuantizer` (docs/quantizer.md).

    Unknown keys and wrong types are rejected with the offending field named, so a typo in a
    YAML file fails before any work starts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_codes: int = Field(1024, ge=2, description="K, codes per codebook")
    dim: int = Field(64, ge=1, description="D, feature size of the vectors being quantized")
    channel_dim: int = Field(1, description="axis holding the features: 1 for NCHW, -1 for NLC")

    # L_vq = beta * mean||sg(z) - C_q||^2 + (1 - beta) * mean||z - sg(C_q)||^2 (VQTorch convention)
    beta: float = Field(0.95, ge=0.0, le=1.0)
    # out = z + sg(C_q - z) + nu * (C_q - sg(C_q)): codes also get nu x the task gradient
    sync_nu: float = Field(0.0, ge=0.0)

    affine: Literal["off", "learned", "running"] = "off"
    affine_lr: float = Field(1.0, gt=0.0, description="lambda: step scale of learned scale/bias")
    affine_groups: int = Field(1, ge=1, description="contiguous blocks of codes sharing an affine")
    affine_momentum: float = Field(0.1, gt=0.0, le=1.0, description="EMA rate of running stats")

    kmeans_init: bool = False
    kmeans_samples: int = Field(0, ge=0, description="vectors to collect; 0 means 10 x num_codes")
    kmeans_iters: int = Field(10, ge=0, description="Lloyd iterations after k-means++ seeding")

    replace_freq: int = Field(0, ge=0, description="replace a code unused this many steps; 0 off")
    replace_noise: float = Field(0.01, ge=0.0, description="noise std relative to input std")

    input_norm: Literal["none", "l2"] = "none"
    codebook_norm: Literal["none", "l2"] = "none"

    groups: int = Field(1, ge=1, description="split D into this many sub-vectors")
    shared_codebook: bool = Field(True, description="groups share one codebook (else one each)")
    residual_stages: int = Field(1, ge=1, description="R quantization stages on the residual")

    # init std of the raw codebook; None means 1/sqrt(D_sub): codes of norm ~1, not ~sqrt(D)
    init_std: float | None = Field(None, gt=0.0)
    # 512 rows x 1024 codes = a 2 MiB score block that can stay in a 2 MiB/core L2 between the
    # GEMM that writes it and the row-min that reads it; tokens never depend on it
    chunk_size: int = Field(512, ge=1, description="rows per distance chunk (bounds memory)")

    inplace: bool = Field(False, description="in-place alternating codebook step inside forward")
    inplace_optimizer: Literal["sgd", "adam"] = "adam"
    inplace_lr: float = Field(1e-3, gt=0.0)

    seed: int = Field(0, description="seed for k-means++ and replacement sampling")

    @model_validator(mode="after")
    def _check_divisibility(self) -> QuantizerConfig:
        if self.dim % self.groups:
            raise ValueError(f"dim={self.dim} is not divisible by groups={self.groups}")
        if self.num_codes % self.affine_groups:
            raise ValueError(
                f"num_codes={self.num_codes} is not divisible by affine_groups={self.affine_groups}"
            )
        if self.num_codes > 65536:
            # tokens travel as uint16 on the wire and on disk
            raise ValueError(f"num_codes={self.num_codes} exceeds the uint16 limit 65536")
        return self

    @property
    def sub_dim(self) -> int:
        """Feature size of one group's sub-vector (the size each codebook sees)."""
        return self.dim // self.groups

    @property
    def kmeans_sample_count(self) -> int:
        return self.kmeans_samples or 10 * self.num_codes
