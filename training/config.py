"""The training run's config: one validated object, loaded from YAML plus ``key=value`` overrides.

    config = load_config("training/configs/tiny.yaml", ["model.quantizer.num_codes=512",
                                                        "optim.lr=3e-4"])

Every mistake (unknown key, wrong type, a downsample factor that is not a power of two, an image or
patch size not divisible by it) fails here, before any data is read, with a :class:`ConfigError`
naming the dotted key, the rule and the value received.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vqmodel import ModelConfig


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the dotted key(s)."""


class DataConfig(BaseModel):
    """Where patches come from (see :func:`training.data.parse_source`) and how they are batched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "pip-photos",
        description="folder:<path> | pip-photos | debian-photos | wallpaper-photos | …",
    )
    patch_size: int = Field(64, ge=1, description="square training crops; a multiple of f")
    bank_size: int = Field(20_000, ge=1, description="patches in the cached patch bank")
    short_side: tuple[int, int] = Field(
        (256, 1024), description="range of the downscaled photos' short side before cropping"
    )
    rotate: bool = Field(
        False,
        description="also turn each drawn patch by a random multiple of 90 degrees (with the "
        "horizontal flip: all 8 symmetries of the square)",
    )
    batch_size: int = Field(32, ge=1, description="per process (global batch = this x ranks)")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    seed: int = Field(0, description="seed of the patch bank and of the batch order")
    cache_dir: str = Field("data_cache", description="where patch banks are cached (.npy)")


class OptimConfig(BaseModel):
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio`` x lr."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0, description="conv/linear weights only")
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor, fraction of lr")
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 turns it off")
    codebook_lr: float = Field(1e-3, gt=0.0, description="alternating mode: codebook optimizer")


class TrainConfig(BaseModel):
    """Everything one training run needs; written to ``<out_dir>/config.yaml`` resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    # standard: one AdamW over everything; alternating: the paper's two-pass codebook/model steps;
    # inplace: the quantizer's in-place codebook step inside forward (sets model.quantizer.inplace)
    mode: Literal["standard", "alternating", "inplace"] = "alternating"
    loss: Literal["mse", "l1"] = "mse"
    alpha: float = Field(1.0, ge=0.0, description="weight of the quantizer loss")

    steps: int = Field(1000, ge=1, description="total optimisation steps")
    log_every: int = Field(50, ge=1, description="metrics.jsonl / TensorBoard window in steps")
    ckpt_every: int = Field(500, ge=1, description="checkpoint interval in steps")
    keep_last: int = Field(3, ge=1, description="step checkpoints kept (plus best)")
    image_every: int = Field(500, ge=0, description="TensorBoard reconstruction grid; 0 off")
    out_dir: str = Field("runs/default", description="the run directory")
    seed: int = Field(0, description="model initialisation seed")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto",
        description="bf16 autocast: auto = on CUDA only, bf16 = on any device (CPU too), off",
    )
    channels_last: bool = Field(
        False, description="model and batches in channels-last (NHWC) memory format"
    )
    compile: bool = Field(False, description="torch.compile the encoder and decoder")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op CPU threads per process; None: torch's default"
    )
    time_limit_s: float | None = Field(
        None, gt=0.0, description="wall-clock limit: save a checkpoint and exit, resumable"
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, value: Any) -> Any:
        # amp: true / false (the older boolean form) mean auto / off
        return {True: "auto", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _inplace_mode_sets_quantizer(cls, data: Any) -> Any:
        # mode=inplace is the one switch; the quantizer flag it needs follows from it, so a
        # command-line `mode=inplace` works without a second override.
        if not isinstance(data, dict) or data.get("mode") != "inplace":
            return data
        model = data.get("model", {})
        if isinstance(model, ModelConfig):
            model = model.model_dump(exclude_unset=True)
        if not isinstance(model, dict):
            return data
        quantizer = model.get("quantizer", {})
        if isinstance(quantizer, BaseModel):
            quantizer = quantizer.model_dump(exclude_unset=True)
        if isinstance(quantizer, dict) and "inplace" not in quantizer:
            data = {**data, "model": {**model, "quantizer": {**quantizer, "inplace": True}}}
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainConfig:
        f = self.model.downsample
        if self.data.patch_size % f:
            raise ValueError(
                f"data.patch_size={self.data.patch_size} is not divisible by "
                f"model.downsample={f}; use a multiple of {f}"
            )
        inplace = self.model.quantizer.inplace
        if (self.mode == "inplace") != inplace:
            raise ValueError(
                f"model.quantizer.inplace={inplace} contradicts mode={self.mode!r}: the in-place "
                "codebook step is mode=inplace (which sets it); leave model.quantizer.inplace out"
            )
        q = self.model.quantizer
        for option, value in (("groups", q.groups), ("residual_stages", q.residual_stages)):
            if value != 1:
                # VQVAE.encode/decode, the export and the service serve one code per position
                raise ValueError(
                    f"model.quantizer.{option}={value} is not supported for training: a trained "
                    f"model must encode to one token per position (VQVAE.encode, the ONNX "
                    f"export), which needs model.quantizer.{option}=1"
                )
        low, high = self.data.short_side
        if not 1 <= low <= high or high < self.data.patch_size:
            raise ValueError(
                f"data.short_side={[low, high]} must satisfy 1 <= low <= high and "
                f"high >= data.patch_size={self.data.patch_size}"
            )
        return self

    def to_yaml(self) -> str:
        """The resolved config as YAML (loads back with :func:`load_config`)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# -- loading ---------------------------------------------------------------------------------------
class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: ``off``/``no``/``on``/``yes`` stay strings
    (``affine: off`` means the string "off") and ``3e-4`` is a float, not a string."""


_REPLACED_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass: no objects


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Read a YAML file (or start from the defaults), apply ``key=value`` overrides, validate.

    Override values are parsed as YAML scalars/flow values (``3e-4``, ``true``, ``[1, 2, 4]``).
    Raises :class:`ConfigError` naming the offending dotted key.
    """
    source = str(path) if path is not None else "defaults"
    data: Any = {}
    if path is not None:
        try:
            data = parse_yaml(Path(path).read_text()) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    return validate_config(data, source)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``data[a][b][c] = value`` for ``"a.b.c=value"``, creating mappings on the way."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like dotted.key=value")
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {text!r}: {err}") from err
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise ConfigError(f"{key}: {parent} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


def validate_config(data: Any, source: str = "config") -> TrainConfig:
    """``TrainConfig.model_validate`` with errors re-worded to name dotted keys."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        lines = [_describe(error) for error in err.errors()]
        raise ConfigError(f"invalid training config ({source}):\n  " + "\n  ".join(lines)) from None


_NAMED_VALUE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)=")


def _describe(error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    # cross-field checks raise at the section level ("model"); their message starts with the
    # field it is about ("image_size=30 is not ..."), which completes the dotted key
    named = _NAMED_VALUE.match(message)
    if named:
        field = named.group(1)
        if not loc:
            key = field
        elif loc.split(".")[-1] == field.split(".")[0]:
            key = loc  # a field validator's own field: "model.downsample" + "downsample=6"
        else:
            key = f"{loc}.{field}"
        return f"{key}: {message}"
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if error["type"] == "missing":
        return f"{loc}: required key missing"
    return f"{loc}: {message} (got {error.get('input')!r})"
