"""Torch side of the patch bank: a Dataset of float patches and a reproducible DataLoader."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info


class PatchDataset(Dataset[torch.Tensor]):
    """Patches of a uint8 [N, H, W, 3] bank as float32 [3, H, W] in [0, 1], randomly mirrored
    and, with `rotate`, turned by a random multiple of 90 degrees (mirror + turn: all 8
    symmetries of the square, so square patches only).

    Flip and turn decisions come from a NumPy generator seeded with `seed`; `make_patch_loader`
    reseeds it per worker so batches repeat exactly for a given seed and worker count. Without
    `rotate` the generator is drawn exactly as before the option existed.
    """

    def __init__(
        self, bank: np.ndarray, *, flip: bool = True, rotate: bool = False, seed: int = 0
    ) -> None:
        if bank.ndim != 4 or bank.shape[-1] != 3 or bank.dtype != np.uint8:
            raise ValueError(f"bank must be uint8 [N, H, W, 3], got {bank.dtype} {bank.shape}")
        if rotate and bank.shape[1] != bank.shape[2]:
            raise ValueError(f"rotate needs square patches, got {bank.shape[1]}x{bank.shape[2]}")
        self.bank = bank
        self.flip, self.rotate = flip, rotate
        self.reseed(seed)

    def reseed(self, seed: int | list[int]) -> None:
        """Restart the flip generator (called in each DataLoader worker)."""
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, index: int) -> torch.Tensor:
        patch = self.bank[index]
        if self.flip and self._rng.random() < 0.5:
            patch = patch[:, ::-1]
        if self.rotate:
            patch = np.rot90(patch, k=int(self._rng.integers(4)))
        chw = np.ascontiguousarray(patch.transpose(2, 0, 1))
        return torch.from_numpy(chw).to(torch.float32).div_(255.0)

    # Workers started with spawn/forkserver (macOS, Windows, Python >= 3.14 on Linux) receive the
    # dataset pickled: send a memory-mapped bank as its file name, not as gigabytes of pixels.
    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        if _is_whole_file_map(self.bank):
            state["bank"] = ("memmap", self.bank.filename, self.bank.offset, self.bank.shape)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        bank = state["bank"]
        if isinstance(bank, tuple):
            _, filename, offset, shape = bank
            state["bank"] = np.memmap(
                filename, dtype=np.uint8, mode="r", offset=offset, shape=shape
            )
        self.__dict__.update(state)


def _is_whole_file_map(bank: np.ndarray) -> bool:
    # A slice of a memmap keeps the parent's filename and offset, so only a C-contiguous view
    # covering every byte after the header can be rebuilt from (filename, offset, shape).
    return (
        isinstance(bank, np.memmap)
        and bank.filename is not None
        and bank.flags.c_contiguous
        and bank.offset + bank.nbytes == os.path.getsize(bank.filename)
    )


def _seed_worker(worker_id: int) -> None:
    # torch gives worker k the seed base + k, base drawn from the loader's generator each epoch;
    # mixing in the rank keeps DDP ranks from sharing one flip sequence.
    info = get_worker_info()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    info.dataset.reseed([info.seed, rank])


def make_patch_loader(
    bank: np.ndarray,
    *,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 2,
    flip: bool = True,
    rotate: bool = False,
    shuffle: bool = True,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> DataLoader[torch.Tensor]:
    """A DataLoader of float32 [B, 3, H, W] batches over `bank`, identical across runs per seed.

    When torch.distributed is initialised each rank reads its own shard through a
    DistributedSampler (seeded by `seed`: a new seed, a new shuffle; `PatchStream` makes a new
    loader with a new seed per epoch).
    """
    dataset = PatchDataset(bank, flip=flip, rotate=rotate, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if dist.is_available() and dist.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=_seed_worker,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
