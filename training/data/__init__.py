"""Offline training data: image sources, the cached patch bank, its DataLoader, the loop's stream.

    source = parse_source("debian-photos")           # or folder:/path, pip-photos, fashion-mnist
    bank = build_patch_bank(source, patch_size=64, count=20_000, seed=0)   # cached .npy
    loader = make_patch_loader(bank, batch_size=64, seed=0)            # float32 [B, 3, 64, 64]
    batches = patch_stream(cfg.data, runtime)     # the training loop's endless, resumable batches

Nothing here downloads: every source reads files installed by pip or apt.
"""

from training.data.idx import fashion_mnist, read_idx
from training.data.image_source import (
    ImageItem,
    ImageSource,
    MissingSourceError,
    UnreadableImageError,
    UnreadableImageWarning,
    UnusableSourceError,
    read_rgb,
)
from training.data.loader import PatchDataset, make_patch_loader
from training.data.patch_bank import DEFAULT_CACHE_DIR, build_patch_bank
from training.data.photos import debian_photos, folder_images, pip_photos, wallpaper_photos
from training.data.spec import SOURCE_SPECS, parse_source
from training.data.stream import PatchStream, open_source, patch_stream

__all__ = [
    "DEFAULT_CACHE_DIR",
    "SOURCE_SPECS",
    "ImageItem",
    "ImageSource",
    "MissingSourceError",
    "PatchDataset",
    "PatchStream",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "UnusableSourceError",
    "build_patch_bank",
    "debian_photos",
    "fashion_mnist",
    "folder_images",
    "make_patch_loader",
    "open_source",
    "parse_source",
    "patch_stream",
    "pip_photos",
    "read_idx",
    "read_rgb",
    "wallpaper_photos",
]
