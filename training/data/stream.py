"""The training loop's batches: the configured source's patch bank as an endless, resumable stream.

batches = patch_stream(cfg.data, runtime)   # on every rank
x = next(batches)                            # float32 [B, 3, P, P]
position = batches.state_dict()              # {"epoch", "batch"}: all a resume needs
"""

from __future__ import annotations

import numpy as np
import torch

from training import ddp
from training.config import ConfigError, DataConfig
from training.data.image_source import ImageSource, MissingSourceError, UnusableSourceError
from training.data.loader import make_patch_loader
from training.data.patch_bank import build_patch_bank
from training.data.spec import parse_source


def open_source(spec: str, key: str) -> ImageSource:
    """The image source ``spec`` names; a :class:`ConfigError` naming ``key`` (the config key or
    flag the spec came from) when it is unknown or not installed here."""
    try:
        return parse_source(spec)
    except (MissingSourceError, ValueError) as err:
        raise ConfigError(f"{key}={spec!r}: {err}") from None


def patch_stream(data: DataConfig, runtime: ddp.Runtime, progress: bool = True) -> PatchStream:
    """The cached patch bank of ``data.source`` as a :class:`PatchStream`.

    Every rank opens the source (a missing package fails on all of them alike); rank 0 builds the
    bank, the others then memory-map the same file.
    """
    source = open_source(data.source, "data.source")
    bank = None
    for builder in (True, False):
        if runtime.is_main == builder:
            try:
                bank = build_patch_bank(
                    source,
                    patch_size=data.patch_size,
                    count=data.bank_size,
                    seed=data.seed,
                    short_side=data.short_side,
                    cache_dir=data.cache_dir,
                    progress=progress and runtime.is_main,
                )
            except UnusableSourceError as err:
                raise ConfigError(f"data.source={data.source!r}: {err}") from None
        ddp.barrier()
    described = {"source": source.spec, "images": len(source), "fingerprint": source.fingerprint()}
    return PatchStream(bank, data, runtime.world_size, described)


class PatchStream:
    """Endless batches of the patch bank. Epoch e reads a fresh loader seeded by (data.seed, e),
    so the position (epoch, batches read) is all a resumed run needs to continue exactly."""

    def __init__(
        self,
        bank: np.ndarray,
        data: DataConfig,
        world_size: int,
        source: dict[str, object] | None = None,
    ) -> None:
        per_rank = len(bank) // world_size
        if per_rank < data.batch_size:
            raise ConfigError(
                f"data.bank_size={len(bank)} gives {per_rank} patches per process, fewer than "
                f"data.batch_size={data.batch_size}: no full batch per epoch"
            )
        self.bank, self.data = bank, data
        self.source = source or {}  # what the bank was cut from: spec, image count, fingerprint
        self.epoch, self.batch = 0, 0
        self._batches = None

    def __iter__(self) -> PatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._batches is None:
            seed = int(np.random.SeedSequence([self.data.seed, self.epoch]).generate_state(1)[0])
            loader = make_patch_loader(
                self.bank,
                batch_size=self.data.batch_size,
                seed=seed,
                num_workers=self.data.workers,
                rotate=self.data.rotate,
            )
            self._batches = iter(loader)
            for _ in range(self.batch):  # resuming mid-epoch: skip what was already trained on
                next(self._batches)
        try:
            x = next(self._batches)
        except StopIteration:
            self.epoch, self.batch, self._batches = self.epoch + 1, 0, None
            return next(self)
        self.batch += 1
        return x

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._batches = int(state["epoch"]), int(state["batch"]), None
