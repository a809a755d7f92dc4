"""The VQ-VAE: a small convolutional encoder/decoder around :class:`vqmodel.VectorQuantizer`.

images [N,3,H,W] in [0,1] --encoder--> z [N,D,H/f,W/f] --quantizer--> tokens [N,H/f,W/f]
tokens --effective codebook--> z_q [N,D,H/f,W/f] --decoder--> images [N,3,H,W] in [0,1]

Encoder: conv_in, then per level ``num_res_blocks`` residual blocks and a stride-2 conv, a middle
residual block at the token resolution, and a 1x1 projection to ``code_dim``. The decoder mirrors
it (1x1 projection out of ``code_dim``, middle block, per level nearest-upsample + conv and
``decoder_res_blocks`` residual blocks (``num_res_blocks`` unless given), conv_out).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from vqmodel.config import QuantizerConfig
from vqmodel.quantizer import VectorQuantizer
from vqmodel.search import SERVED_DTYPE, nearest_codes

DOWNSAMPLE_FACTORS = (4, 8, 16)


class ModelConfig(BaseModel):
    """Architecture of :class:`VQVAE` plus its quantizer; serialised with every checkpoint.

    ``quantizer.dim`` is derived from ``code_dim`` when not given; giving a different value is an
    error, as is any ``quantizer.channel_dim`` other than 1 (the model quantizes NCHW maps).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    downsample: int = Field(8, description="f: tokens are (H/f, W/f); one of 4, 8, 16")
    base_channels: int = Field(32, ge=1, description="width unit; level i has base * mult[i]")
    channel_mult: tuple[int, ...] = Field(
        (1, 2, 4), description="width multiplier per downsampling level; log2(f) entries"
    )
    num_res_blocks: int = Field(1, ge=1, description="residual blocks per level")
    # the decoder alone can be deeper: reconstruction error sits in the decoder's capacity, and
    # serving (encode + decode) pays for each block once
    decoder_res_blocks: int | None = Field(
        None, ge=1, description="residual blocks per decoder level; None: num_res_blocks"
    )
    code_dim: int = Field(16, ge=1, description="D: 1x1 projection size in front of the quantizer")
    # "group" stays the default so that checkpoints written before this option existed load as
    # what they are; new models should use "channel" (training/configs/default.yaml does)
    norm: Literal["channel", "group"] = Field(
        "group",
        description="channel: per-pixel LayerNorm over channels (independent of the image size); "
        "group: GroupNorm(gcd(32, C)) as in VQGAN, whose statistics span the whole image",
    )
    image_size: int = Field(256, ge=1, description="native (square) training/serving image size")
    quantizer: QuantizerConfig = Field(default_factory=QuantizerConfig)

    @field_validator("downsample")
    @classmethod
    def _check_downsample(cls, f: int) -> int:
        if f < 1 or f & (f - 1) or f not in DOWNSAMPLE_FACTORS:
            raise ValueError(f"downsample={f} must be a power of two in {DOWNSAMPLE_FACTORS}")
        return f

    @field_validator("channel_mult")
    @classmethod
    def _check_channel_mult(cls, mult: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in mult):
            raise ValueError(f"channel_mult={list(mult)} must contain positive integers")
        return mult

    @model_validator(mode="before")
    @classmethod
    def _derive_quantizer_dim(cls, data: Any) -> Any:
        # code_dim is the one place the feature size is written; copy it into the quantizer
        # unless the user set quantizer.dim explicitly (then the check below compares them).
        if not isinstance(data, dict):
            return data
        quantizer = data.get("quantizer", {})
        if isinstance(quantizer, QuantizerConfig):
            if "dim" in quantizer.model_fields_set:
                return data
            quantizer = quantizer.model_dump(exclude_unset=True)
        if isinstance(quantizer, dict) and "dim" not in quantizer:
            code_dim = data.get("code_dim", cls.model_fields["code_dim"].default)
            data = {**data, "quantizer": {**quantizer, "dim": code_dim}}
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelConfig:
        f = self.downsample
        levels = int(math.log2(f))
        if len(self.channel_mult) != levels:
            raise ValueError(
                f"channel_mult={list(self.channel_mult)} has {len(self.channel_mult)} entries but "
                f"downsample={f} needs log2({f})={levels} (one per downsampling level)"
            )
        if self.image_size % f:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by downsample={f}; "
                f"use a multiple of {f}, e.g. {max(f, self.image_size // f * f)}"
            )
        if self.quantizer.dim != self.code_dim:
            raise ValueError(
                f"quantizer.dim={self.quantizer.dim} must equal code_dim={self.code_dim} "
                "(leave quantizer.dim out to derive it)"
            )
        if self.quantizer.channel_dim != 1:
            raise ValueError(
                f"quantizer.channel_dim={self.quantizer.channel_dim} must be 1: "
                "the VQ-VAE quantizes NCHW feature maps"
            )
        return self

    @property
    def widths(self) -> list[int]:
        """Channel width of each level, highest resolution first."""
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def decoder_blocks(self) -> int:
        """Residual blocks per decoder level."""
        return self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks

    @property
    def token_size(self) -> int:
        """Tokens per side at the native image size."""
        return self.image_size // self.downsample


# -- building blocks -----------------------------------------------------------------------------
class ChannelNorm(nn.Module):
    """LayerNorm over the channels of every pixel: (x - mean_c) / sqrt(var_c + eps) * w + b.

    Unlike GroupNorm its statistics never span the image, so a model trained on 64-pixel crops
    behaves the same on a 1000-pixel photo (measured on the first default model: GroupNorm's
    whole-image statistics cost 4-15 dB against the same photo tokenized in 64-pixel tiles) and a
    token depends only on its receptive field.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channel means as a 1x1 convolution with weights 1/C (exact: C is a power of two), not
        # a mean over dim 1: exported, a ReduceMean over channels lets onnxruntime pick its
        # summation order from the whole input shape (in order at N = 1, an SGEMM at N > 1), so an
        # image's features, and near-tie tokens, changed with the batch; a convolution runs
        # image by image.
        average = x.new_full((1, x.shape[1], 1, 1), 1.0 / x.shape[1])
        centred = x - F.conv2d(x, average)
        var = F.conv2d(centred * centred, average)
        x_hat = centred * torch.rsqrt(var + self.eps)
        return x_hat * self.weight[:, None, None] + self.bias[:, None, None]


def _norm(channels: int, kind: str) -> nn.Module:
    if kind == "channel":
        return ChannelNorm(channels)
    # 32 groups as in the usual VQGAN/LDM blocks, fewer when the width is not a multiple of 32
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv(SiLU(N(conv(SiLU(N(x)))))), N the configured norm; 1x1 skip if the width changes."""

    def __init__(self, c_in: int, c_out: int, norm: str = "group") -> None:
        super().__init__()
        self.norm1 = _norm(c_in, norm)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, norm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; padding 1 keeps H/2 exact for even H."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (no transposed conv: no checkerboard artefacts)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """[N,3,H,W] in [-1,1] -> [N,code_dim,H/f,W/f]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.widths
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = widths[0]
        for width in widths:
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, width, cfg.norm))
                c = width
            blocks.append(Downsample(c))
        self.down = nn.Sequential(*blocks)
        self.mid = ResBlock(c, c, cfg.norm)
        self.norm_out = _norm(c, cfg.norm)
        self.proj = nn.Conv2d(c, cfg.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.proj(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[N,code_dim,h,w] -> [N,3,h*f,w*f], unbounded ([-1,1] when trained)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.widths
        c = widths[-1]
        self.proj = nn.Conv2d(cfg.code_dim, c, 1)
        self.mid = ResBlock(c, c, cfg.norm)
        blocks: list[nn.Module] = []
        for width in reversed(widths):
            blocks.append(Upsample(c, width))
            c = width
            blocks.extend(ResBlock(c, c, cfg.norm) for _ in range(cfg.decoder_blocks))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(c, cfg.norm)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.proj(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


# -- the model -----------------------------------------------------------------------------------
class VQVAE(nn.Module):
    """Image tokenizer. ``encode``/``decode`` are the inference (and ONNX export) entry points;
    ``forward`` is the one-call reconstruction with the quantizer's losses in ``info`` (standard
    and in-place modes, tests, users' own loops). ``training.loop.train_step`` calls the three
    pieces (``encode_features``, ``quantizer``, ``decode_features``) itself: the alternating mode
    puts the codebook step between encoding and quantizing, and the pieces are what
    ``torch.compile`` wraps."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        self.encoder = Encoder(self.config)
        self.quantizer = VectorQuantizer(self.config.quantizer)
        self.decoder = Decoder(self.config)

    def _check_images(self, images: torch.Tensor) -> None:
        # shape checks only (static under tracing): no data-dependent branches in the tensor path
        f = self.config.downsample
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"image H={h}, W={w} must both be divisible by downsample f={f}")

    def _check_single_token_grid(self) -> None:
        # tokens [N,h,w] <-> one code per position needs one codebook and one stage
        q = self.config.quantizer
        for option, value in (("groups", q.groups), ("residual_stages", q.residual_stages)):
            if value != 1:
                raise NotImplementedError(
                    f"encode/decode support quantizer.{option}=1 only, got {option}={value}"
                )

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N,3,H,W] in [0,1] -> pre-quantizer features z [N,code_dim,H/f,W/f]."""
        self._check_images(images)
        return self.encoder(images * 2.0 - 1.0)

    def decode_features(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized features [N,code_dim,h,w] -> images [N,3,h*f,w*f] in [0,1]."""
        x = (self.decoder(z_q) + 1.0) * 0.5
        if self.training:
            # straight-through clamp: the loss sees exactly the [0,1] values (x - sg(x) is exactly
            # 0), overshooting pixels still get a gradient (a plain clamp would freeze them;
            # a sigmoid would never reach 0 or 1)
            return x.clamp(0.0, 1.0).detach() + (x - x.detach())
        return x.clamp(0.0, 1.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float32 [N,3,H,W] in [0,1] -> tokens int64 [N,H/f,W/f].

        Pure function of the weights: no training-mode side effects, whatever the module's mode.
        """
        self._check_single_token_grid()
        z = self.encode_features(images)
        n, _, h, w = z.shape
        # the quantizer's own row layout (incl. its input norm), then the served token rule
        # (the training search in SERVED_DTYPE), which the exported encoder graph also calls
        rows, _ = self.quantizer._to_rows(z)
        codebook = self.quantizer.codebooks[0].effective()
        indices, _ = nearest_codes(
            rows.reshape(-1, rows.shape[-1]),
            codebook,
            self.config.quantizer.chunk_size,
            dtype=SERVED_DTYPE,
        )
        return indices.view(n, h, w)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [N,h,w] in [0, num_codes) -> images float32 [N,3,h*f,w*f] in [0,1].

        Token values are not range-checked here (that would be data-dependent control flow in an
        exported graph); callers validate them. Wrap ``decode_features`` for gradients.
        """
        self._check_single_token_grid()
        if tokens.dim() != 3:
            raise ValueError(f"expected tokens [N,h,w], got shape {tuple(tokens.shape)}")
        codebook = self.quantizer.codebooks[0].effective()
        # channels last, as the quantizer's forward hands it on: the same decoder kernels, the
        # same image bits
        z_q = F.embedding(tokens.long(), codebook).permute(0, 3, 1, 2)
        return self.decode_features(z_q)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Reconstruction for training: (images [N,3,H,W] in [0,1], the quantizer's info dict)."""
        z = self.encode_features(images)
        z_q, info = self.quantizer(z)
        return self.decode_features(z_q), info
