"""A patch bank: N random square crops of downscaled photos in one uint8 [N, P, P, 3] array.

Built once per (source, patch size, count, seed, scale range) and cached as .npy, so training
runs and DDP ranks memory-map the same file instead of decoding photos again.

Sampling, per image i of the source (in order):
    n_i       patches from it: the remaining count shared evenly over the remaining images, the
              remainder given to a uniformly random subset (selection sampling, exact total);
    scale     short side s ~ log-uniform[max(lo, P), hi], clamped to the native short side (never
              upscaled); one fresh s per group of up to PATCHES_PER_SCALE patches;
    crop      uniform position in the resized image, horizontal flip with probability 1/2.
Patches land at random positions of the bank, so any slice of it mixes all images.
An image that cannot be decoded or is smaller than P is skipped with a warning, and the images
after it make up its share.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from service.files import fsync_directory
from training.data.image_source import (
    ImageItem,
    ImageSource,
    UnreadableImageError,
    UnreadableImageWarning,
    UnusableSourceError,
)
from training.data.spec import parse_source

DEFAULT_CACHE_DIR = Path("data_cache")
PATCHES_PER_SCALE = 64
# Part of the cache key: bump it when the sampling above changes so stale banks are not reused.
BANK_FORMAT = 1


def build_patch_bank(
    source: str | ImageSource,
    *,
    patch_size: int,
    count: int,
    seed: int = 0,
    short_side: tuple[int, int] = (256, 1024),
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> np.ndarray:
    """`count` patches of `patch_size`² pixels from `source`, as uint8 [count, P, P, 3].

    With a `cache_dir` the bank is read from (or written atomically to) a .npy there whose name
    hashes every input, and returned as a read-only memory map; `cache_dir=None` builds in memory.
    `short_side` is the range of the downscaled images' short side in pixels.
    """
    if patch_size < 1 or count < 1:
        raise ValueError(f"patch_size and count must be >= 1, got {patch_size} and {count}")
    low, high = short_side
    if not 1 <= low <= high or patch_size > high:
        raise ValueError(
            f"short_side must satisfy 1 <= low <= high and high >= patch_size ({patch_size}), "
            f"got {short_side}"
        )
    images = parse_source(source) if isinstance(source, str) else source
    shape = (count, patch_size, patch_size, 3)
    if cache_dir is None:
        bank = np.empty(shape, dtype=np.uint8)
        _fill(bank, images, seed, (low, high), progress)
        return bank

    path = Path(cache_dir) / _cache_name(images, patch_size, count, seed, (low, high))
    if path.is_file():
        cached = np.load(path, mmap_mode="r")
        if cached.shape == shape and cached.dtype == np.uint8:
            return cached
        warnings.warn(f"rebuilding {path}: holds {cached.dtype} {cached.shape}", stacklevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temp file in the same directory, then rename: a crash or a concurrent reader
    # (another DDP rank) never sees a half-written bank under the final name.
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        bank = np.lib.format.open_memmap(temp_name, mode="w+", dtype=np.uint8, shape=shape)
        _fill(bank, images, seed, (low, high), progress)
        bank.flush()
        del bank
        with open(temp_name, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; a shared cache should be readable
        os.replace(temp_name, path)
        fsync_directory(path.parent)  # the rename itself survives a power cut
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r")


def _cache_name(
    images: ImageSource, patch_size: int, count: int, seed: int, short_side: tuple[int, int]
) -> str:
    inputs = {
        "format": BANK_FORMAT,
        "source": images.fingerprint(),
        "patch_size": patch_size,
        "count": count,
        "seed": seed,
        "short_side": list(short_side),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", images.spec).strip("-")[-40:]
    return f"{slug}-{patch_size}px-{count}-seed{seed}-{digest}.npy"


def _fill(
    bank: np.ndarray, images: ImageSource, seed: int, short_side: tuple[int, int], progress: bool
) -> None:
    count, patch_size = bank.shape[0], bank.shape[1]
    rng = np.random.default_rng(seed)
    slots = rng.permutation(count)
    made = 0
    candidates = list(range(len(images)))
    desc = f"patch bank {images.spec}"
    with (
        tqdm(total=count, unit="patch", desc=desc, disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
    ):
        # A second pass over the images that worked covers the shares of images skipped last.
        for _ in range(2):
            usable = []
            for position, index in enumerate(candidates):
                n = _share(count - made, len(candidates) - position, rng)
                pixels = _load_usable(images.items[index], patch_size) if n else None
                if pixels is None:
                    continue
                usable.append(index)
                _crop_into(bank, slots[made : made + n], pixels, short_side, rng, pool)
                made += n
                bar.update(n)
            candidates = usable
            if made == count or not usable:
                break
    if made < count:
        raise UnusableSourceError(
            f"source {images.spec!r} gave no usable image of at least {patch_size}x{patch_size} "
            f"pixels among its {len(images)} images"
        )


def _share(patches: int, images: int, rng: np.random.Generator) -> int:
    """Patches for the next of `images` images: an even share, the remainder going to a random
    subset (selection sampling: the shares always add up to exactly `patches`)."""
    share, remainder = divmod(patches, images)
    return share + int(rng.random() * images < remainder)


def _load_usable(item: ImageItem, patch_size: int) -> np.ndarray | None:
    """The item's pixels, or None (with a warning) if unreadable or smaller than a patch."""
    try:
        pixels = item.load()
    except UnreadableImageError as err:
        warnings.warn(f"skipping {err}", UnreadableImageWarning, stacklevel=4)
        return None
    if min(pixels.shape[:2]) < patch_size:
        height, width = pixels.shape[:2]
        warnings.warn(
            f"skipping {item.name}: {width}x{height} is smaller than patch_size {patch_size}",
            UnreadableImageWarning,
            stacklevel=4,
        )
        return None
    return pixels


def _shrink(photo: Image.Image, short_side: int) -> Image.Image:
    """`photo` resized so its short side is `short_side`, or unchanged if it is already smaller."""
    native = min(photo.size)
    if short_side >= native:
        return photo
    width, height = photo.size
    size = (
        max(short_side, round(width * short_side / native)),
        max(short_side, round(height * short_side / native)),
    )
    # reducing_gap: box-reduce first, then Lanczos; visually equal to full Lanczos, much faster.
    return photo.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _crop_into(
    bank: np.ndarray,
    slots: np.ndarray,
    pixels: np.ndarray,
    short_side: tuple[int, int],
    rng: np.random.Generator,
    pool: ThreadPoolExecutor,
) -> None:
    """Fill bank[slots] with crops of one image, drawing a new scale per PATCHES_PER_SCALE."""
    patch_size = bank.shape[1]
    # Shrinking once to the largest scale first makes every later resize start from <= 1024 px.
    photo = _shrink(Image.fromarray(pixels), short_side[1])
    high = min(photo.size)
    low = min(max(short_side[0], patch_size), high)
    groups = [slots[i : i + PATCHES_PER_SCALE] for i in range(0, len(slots), PATCHES_PER_SCALE)]
    targets = [round(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in groups]
    # Pillow releases the GIL while resizing, so one photo's scales resize in parallel.
    scaled = (pool.map if len(targets) > 1 else map)(partial(_shrink, photo), targets)
    for group, image in zip(groups, scaled, strict=True):
        scaled_pixels = np.asarray(image)
        tops = rng.integers(0, scaled_pixels.shape[0] - patch_size + 1, size=len(group))
        lefts = rng.integers(0, scaled_pixels.shape[1] - patch_size + 1, size=len(group))
        flips = rng.random(len(group)) < 0.5
        for slot, top, left, flip in zip(group, tops, lefts, flips, strict=True):
            patch = scaled_pixels[top : top + patch_size, left : left + patch_size]
            bank[slot] = patch[:, ::-1] if flip else patch
