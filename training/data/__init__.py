"""Offline training data: image sources, the cached patch bank, its DataLoader, the eval set.

    source = parse_source("debian-photos")           # or folder:/path, pip-photos, fashion-mnist
    bank = build_patch_bank(source, patch_size=64, count=20_000, seed=0)   # cached .npy
    loader = make_patch_loader(bank, batch_size=64, seed=0)            # float32 [B, 3, 64, 64]
    eval_images = load_eval_images(multiple_of=8)                       # float32 [3, H, W] each

Nothing here downloads: every source reads files installed by pip or apt.
"""

from training.data.idx import fashion_mnist, read_idx
from training.data.image_source import (
    ImageItem,
    ImageSource,
    MissingSourceError,
    UnreadableImageError,
    UnreadableImageWarning,
    read_rgb,
)
from training.data.loader import PatchDataset, make_patch_loader, set_loader_epoch
from training.data.patch_bank import DEFAULT_CACHE_DIR, build_patch_bank
from training.data.photos import debian_photos, folder_images, load_eval_images, pip_photos
from training.data.spec import SOURCE_SPECS, parse_source

__all__ = [
    "DEFAULT_CACHE_DIR",
    "SOURCE_SPECS",
    "ImageItem",
    "ImageSource",
    "MissingSourceError",
    "PatchDataset",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "build_patch_bank",
    "debian_photos",
    "fashion_mnist",
    "folder_images",
    "load_eval_images",
    "make_patch_loader",
    "parse_source",
    "pip_photos",
    "read_idx",
    "read_rgb",
    "set_loader_epoch",
]
