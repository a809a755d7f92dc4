"""Source spec strings ("folder:/path", "pip-photos", ...) -> `ImageSource`."""

from __future__ import annotations

from training.data.idx import fashion_mnist
from training.data.image_source import ImageSource
from training.data.photos import (
    SPLITS,
    WALLPAPER_PHOTO_PACKAGES,
    debian_photos,
    folder_images,
    pip_photos,
    wallpaper_photos,
)

SOURCE_SPECS = (
    "folder:<path>",
    "pip-photos",
    "debian-photos",
    "debian-photos:train",
    "debian-photos:val",
    "wallpaper-photos",
    "wallpaper-photos:train",
    "wallpaper-photos:val",
    *WALLPAPER_PHOTO_PACKAGES,
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
    if name == "debian-photos" and argument in SPLITS:
        return debian_photos(split=argument)
    if name == "wallpaper-photos" and argument in SPLITS:
        return wallpaper_photos(split=argument)
    if not colon:
        if name == "pip-photos":
            return pip_photos()
        if name == "debian-photos":
            return debian_photos()
        if name == "wallpaper-photos":
            return wallpaper_photos()
        if name in WALLPAPER_PHOTO_PACKAGES:
            return debian_photos((name,))
    raise ValueError(f"unknown image source {spec!r}; valid sources: {', '.join(SOURCE_SPECS)}")
