"""Service settings: one pydantic-settings class, read from `VQTOK_*` environment variables.

The CLI (`vqtok-serve`) builds a `Settings` from the environment and overrides the fields given
as flags, so a flag always wins over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cpu import cpu_quota

Providers = Literal["auto", "cpu", "cuda", "tensorrt"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Everything the service can be told; defaults suit one CPU box behind a proxy."""

    model_config = SettingsConfigDict(
        env_prefix="VQTOK_", protected_namespaces=(), extra="ignore", frozen=True
    )

    model_dir: Path = Field(Path("models/default"), description="exported model directory")
    providers: Providers = Field(
        "auto", description="onnxruntime providers; an explicit GPU request never falls back"
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0 = auto)")
    inter_op_threads: int = Field(1, ge=1)
    warmup: bool = Field(True, description="run one dummy batch before reporting ready")

    image_threads: int = Field(
        default_factory=cpu_quota,
        ge=1,
        description="threads decoding uploads / encoding PNGs (default: the CPU quota)",
    )
    # small on a CPU, where a bigger batch costs more CPU per image (benchmarks/service_load.py)
    max_batch: int = Field(4, ge=1, description="most images in one engine call")
    max_wait_ms: float = Field(2.0, ge=0, description="longest a queued image waits for company")
    max_queue: int = Field(256, ge=1, description="most images waiting; more answers 503")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request body limit")
    max_pixels: int = Field(4096 * 4096, ge=1, description="pixels per uploaded image")
    max_images: int = Field(16, ge=1, description="images per encode request / decode batch")
    # 128 x 128 tokens = 1024 x 1024 pixels at f = 8: a photo at native size with resize=pad
    # (~0.7 GiB of onnxruntime working memory for the default model: see max_request_bytes)
    max_token_grid: int = Field(128 * 128, ge=1, description="h*w of one token grid")
    max_request_bytes: int = Field(
        768 * 1024 * 1024,
        ge=1024 * 1024,
        description="decoded-memory budget of one request (pixels, model inputs, engine work), "
        "estimated from the image headers before decoding; more answers 413",
    )
    max_inflight_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1024 * 1024,
        description="decoded memory all requests may hold at once; a request that does not fit "
        "waits up to admission_wait_s, then gets 503 + Retry-After",
    )
    admission_wait_s: float = Field(
        10.0, ge=0, description="how long a request waits for the in-flight memory budget"
    )

    api_key: SecretStr | None = Field(None, description="when set, /v1/* needs this key")
    pre_stop_delay_s: float = Field(
        5.0,
        ge=0,
        description="SIGTERM: answer /health/ready 503 (and close every keep-alive connection "
        "after its response) for this long before the listener closes",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM: wait this long for requests")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503 answers")
    log_level: LogLevel = "info"

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        # `VQTOK_API_KEY=` (set but empty) must not turn on auth with an empty password.
        return None if value == "" else value

    @model_validator(mode="after")
    def _images_fit_in_queue(self) -> Settings:
        # A request is admitted whole or not at all: one bigger than the queue could never run.
        if self.max_images > self.max_queue:
            raise ValueError(
                f"max_images ({self.max_images}) must not exceed max_queue ({self.max_queue})"
            )
        return self

    @model_validator(mode="after")
    def _request_fits_in_flight(self) -> Settings:
        # a request bigger than the process-wide budget would wait forever
        if self.max_request_bytes > self.max_inflight_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) must not exceed "
                f"max_inflight_bytes ({self.max_inflight_bytes})"
            )
        return self
