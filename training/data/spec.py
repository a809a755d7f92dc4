"""Source spec strings ("folder:/path", "pip-photos", ...) -> `ImageSource`."""

from __future__ import annotations

from training.data.idx import fashion_mnist
from training.data.image_source import ImageSource
from training.data.photos import (
    PHOTO_PACKAGES,
    SET_NAMES,
    SPLITS,
    debian_photos,
    folder_images,
    pip_photos,
)

# the named package sets: debian-photos, wallpaper-photos, package-photos (training/data/photos.py)
PHOTO_SETS = {name: packages for packages, name in SET_NAMES.items()}
SOURCE_SPECS = (
    "folder:<path>",
    "pip-photos",
    *(f"{name}{split}" for name in PHOTO_SETS for split in ("", ":train", ":val")),
    *PHOTO_PACKAGES,
    "fashion-mnist",
    "fashion-mnist:test",
)


def parse_source(spec: str) -> ImageSource:
    """The image source a spec string names; see `SOURCE_SPECS` for the valid forms.

    Raises ValueError for an unknown spec and `MissingSourceError` (naming the pip or apt package
    to install) for a known source that is not installed.
    """
    name, colon, argument = spec.strip().partition(":")
    if name == "folder" and argument:
        return folder_images(argument)
    if name == "fashion-mnist":
        return fashion_mnist(argument if colon else "train")
    if name in PHOTO_SETS and (not colon or argument in SPLITS):
        return debian_photos(PHOTO_SETS[name], split=argument or None)
    if not colon:
        if name == "pip-photos":
            return pip_photos()
        if name in PHOTO_PACKAGES:
            return debian_photos((name,))
    raise ValueError(f"unknown image source {spec!r}; valid sources: {', '.join(SOURCE_SPECS)}")
