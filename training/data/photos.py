"""Photo sources: a user's folder, photos inside pip wheels, photos in Debian packages.

Every source reads files already on disk; nothing here downloads. The pip-bundled photos are
read straight from the installed packages' directories (the same files `skimage.data`,
`sklearn.datasets.load_sample_images` and `matplotlib.cbook.get_sample_data` open), which keeps
scikit-image's pooch downloader out of the picture and avoids importing three heavy libraries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.image_source import (
    ImageItem,
    ImageSource,
    MissingSourceError,
    UnreadableImageWarning,
    file_item,
    read_rgb,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_images(root: str | os.PathLike[str]) -> ImageSource:
    """Every image file under `root` (recursive, sorted by relative path)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingSourceError(f"image folder {root} does not exist (source 'folder:{root}')")
    paths = sorted(
        (path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    items = tuple(
        file_item(path, path.relative_to(root).as_posix()) for path in paths if path.is_file()
    )
    if not items:
        raise MissingSourceError(f"no {'/'.join(IMAGE_SUFFIXES)} files under {root}")
    return ImageSource(spec=f"folder:{root}", items=items)


@dataclass(frozen=True)
class BundledPhoto:
    """A photo file shipped inside a pip package."""

    name: str
    module: str  # import name of the package holding the file
    pip_name: str  # what `pip install` needs
    path: str  # relative to the package directory


# Colour photographs only: the greyscale (camera, moon, coins...) and specialist ones (retina,
# immunohistochemistry) would skew a colour tokenizer's training and evaluation statistics.
PIP_PHOTOS = (
    BundledPhoto("astronaut", "skimage", "scikit-image", "data/astronaut.png"),
    BundledPhoto("chelsea", "skimage", "scikit-image", "data/chelsea.png"),
    BundledPhoto("coffee", "skimage", "scikit-image", "data/coffee.png"),
    BundledPhoto("rocket", "skimage", "scikit-image", "data/rocket.jpg"),
    BundledPhoto("hubble_deep_field", "skimage", "scikit-image", "data/hubble_deep_field.jpg"),
    BundledPhoto("motorcycle", "skimage", "scikit-image", "data/motorcycle_left.png"),
    BundledPhoto("china", "sklearn", "scikit-learn", "datasets/images/china.jpg"),
    BundledPhoto("flower", "sklearn", "scikit-learn", "datasets/images/flower.jpg"),
    BundledPhoto(
        "grace_hopper", "matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"
    ),
)


def pip_photos(photos: tuple[BundledPhoto, ...] = PIP_PHOTOS) -> ImageSource:
    """The colour photos bundled in scikit-image, scikit-learn and matplotlib wheels.

    All three packages must be installed; a photo a newer release no longer bundles (scikit-image
    moves data to pooch downloads over time) is skipped with a warning.
    """
    package_dirs = {photo.module: _package_dir(photo.module) for photo in photos}
    missing = sorted({photo.pip_name for photo in photos if package_dirs[photo.module] is None})
    if missing:
        raise MissingSourceError(
            f"pip-photos needs {', '.join(missing)}; install with: pip install {' '.join(missing)}"
        )
    items = []
    for photo in photos:
        path = package_dirs[photo.module] / photo.path
        if path.is_file():
            items.append(file_item(path, photo.name))
        else:
            warnings.warn(
                f"skipping {photo.name}: {photo.pip_name} no longer ships {photo.path}",
                UnreadableImageWarning,
                stacklevel=2,
            )
    if not items:
        raise MissingSourceError("none of the pip-bundled photos were found")
    return ImageSource(spec="pip-photos", items=tuple(items))


def _package_dir(module: str) -> Path | None:
    # find_spec locates a top-level package without importing it (importing sklearn costs ~1 s).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class PhotoPackage:
    """Where a Debian package keeps its photographs.

    Plain packages hold one file per photo directly in `directory`; when `files` names some, only
    those are photographs (the rest of the directory is drawings, charts, renders). KDE's layout
    (`wallpapers` set) holds `<directory>/<Name>/contents/images/<W>x<H>.<ext>`, one file per
    screen size: only the named wallpapers are photographs, and each is read at its largest size.
    """

    directory: str
    wallpapers: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


# Which files each Debian package owns comes from dpkg's own file lists, so the two lomiri
# packages (same directory, same naming) are told apart exactly and a package update that adds
# or renames wallpapers needs no change here. The directory keeps only the photographs:
# mate-backgrounds also ships abstract/ and desktop/ renders.
DEBIAN_PHOTO_PACKAGES = {
    "lomiri-wallpapers-16.04": PhotoPackage("/usr/share/backgrounds"),
    "lomiri-wallpapers-20.04": PhotoPackage("/usr/share/backgrounds"),
    "mate-backgrounds": PhotoPackage("/usr/share/backgrounds/mate/nature"),
}
# The KDE Plasma wallpapers that are photographs (chosen by eye; the other 18 are renders).
PLASMA_PHOTOS = (
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
    "Grey", "Kite", "OneStandsOut", "Path", "Volna", "summer_1am",
)  # fmt: skip
# `wallpaper-photos`: the Debian photos plus Plasma's. `debian-photos` keeps naming the three
# packages alone, the photos the first default models were trained and chosen on.
WALLPAPER_PHOTO_PACKAGES = {
    **DEBIAN_PHOTO_PACKAGES,
    "plasma-workspace-wallpapers": PhotoPackage("/usr/share/wallpapers", PLASMA_PHOTOS),
}
# The colour photographs among OpenCV's sample images (chosen by eye on a contact sheet of the
# 42 colour images of 256 px or more). Left out: drawings, charts, renders, a painting, a
# motion-blurred plate, and the second image of each stereo or sequence pair (aloeR, ela_modified,
# graf3, leuvenB, right, rubberwhale2), which would weigh one scene twice.
OPENCV_PHOTOS = (
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg",
    "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg",
    "graf1.png", "home.jpg", "left.jpg", "leuvenA.jpg", "messi5.jpg", "orange.jpg",
    "rubberwhale1.png", "squirrel_cls.jpg", "stuff.jpg",
)  # fmt: skip
# `package-photos`: every packaged photo set above plus two that are not wallpapers: the five
# photographs of KDE's jigsaw game and OpenCV's sample photos (smaller, 350-1280 px).
PHOTO_PACKAGES = {
    **WALLPAPER_PHOTO_PACKAGES,
    "palapeli-data": PhotoPackage("/usr/share/palapeli/collection"),
    "opencv-doc": PhotoPackage("/usr/share/doc/opencv-doc/examples/data", files=OPENCV_PHOTOS),
}
# The spec string of each named package set; any other set is named by joining its packages.
SET_NAMES = {
    tuple(DEBIAN_PHOTO_PACKAGES): "debian-photos",
    tuple(WALLPAPER_PHOTO_PACKAGES): "wallpaper-photos",
    tuple(PHOTO_PACKAGES): "package-photos",
}
DPKG_INFO_DIR = Path("/var/lib/dpkg/info")


# The train/validation split of the Debian photos: a photo is in `val` when the hash of its file
# name falls in the first VAL_FRACTION of the hash range. It depends on nothing but the name, so
# it is the same on every machine and a package update that adds photos moves none of the others.
SPLITS = ("train", "val")
VAL_FRACTION = 0.2
# Validation photos are wallpapers of up to 3840x2400: evaluated downscaled to this short side,
# inside the 256-1024 range the patch bank trains on, so a full checkpoint sweep stays cheap.
VAL_SHORT_SIDE = 512


def split_of(name: str) -> str:
    """'val' or 'train' for a photo's file name, or a KDE wallpaper's name (see VAL_FRACTION)."""
    digest = hashlib.sha256(Path(name).name.encode()).digest()
    return "val" if int.from_bytes(digest[:4], "big") < VAL_FRACTION * 2**32 else "train"


def debian_photos(
    packages: tuple[str, ...] = tuple(DEBIAN_PHOTO_PACKAGES),
    *,
    split: str | None = None,
    dpkg_info_dir: Path = DPKG_INFO_DIR,
) -> ImageSource:
    """The photos of the given Debian wallpaper packages; all must be installed.

    Partial sets are refused rather than used: a training recipe that names `debian-photos` should
    see the same photos on every machine. `split` keeps only the `train` or `val` photos (see
    `split_of`); `val` photos load downscaled to a short side of VAL_SHORT_SIDE.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    unknown = [package for package in packages if package not in PHOTO_PACKAGES]
    if unknown:
        raise ValueError(f"unknown photo package(s) {unknown}; known: {list(PHOTO_PACKAGES)}")
    found = {package: _package_photos(package, dpkg_info_dir) for package in packages}
    missing = [package for package, photos in found.items() if not photos]
    if missing:
        raise MissingSourceError(
            f"Debian package(s) {', '.join(missing)} not installed; "
            f"install with: sudo apt-get install {' '.join(missing)}"
        )
    photos = [photo for package in packages for photo in found[package]]
    if split is not None:
        photos = [(name, path) for name, path in photos if split_of(name) == split]
    items = tuple(_val_item(path) if split == "val" else file_item(path) for _, path in photos)
    spec = SET_NAMES.get(tuple(packages), "+".join(packages))
    return ImageSource(spec=f"{spec}:{split}" if split else spec, items=items)


def wallpaper_photos(
    *, split: str | None = None, dpkg_info_dir: Path = DPKG_INFO_DIR
) -> ImageSource:
    """`debian_photos` of every package in WALLPAPER_PHOTO_PACKAGES (Plasma's photos too)."""
    return debian_photos(tuple(WALLPAPER_PHOTO_PACKAGES), split=split, dpkg_info_dir=dpkg_info_dir)


def _val_item(path: Path) -> ImageItem:
    item = file_item(path)
    return ImageItem(name=item.name, key=item.key, load=lambda: downscale(read_rgb(path)))


def downscale(pixels: np.ndarray, short_side: int = VAL_SHORT_SIDE) -> np.ndarray:
    """uint8 [H, W, 3] resized (Pillow's antialiased bicubic) so min(H, W) == short_side; images
    already that small are returned as they are."""
    height, width = pixels.shape[:2]
    scale = short_side / min(height, width)
    if scale >= 1:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))


def _package_photos(package: str, dpkg_info_dir: Path) -> list[tuple[str, Path]]:
    """(split name, path) of each photo `package` installed, sorted by path."""
    # Architecture-independent packages list their files in <pkg>.list, others in <pkg>:<arch>.list.
    lists = [dpkg_info_dir / f"{package}.list", *sorted(dpkg_info_dir.glob(f"{package}:*.list"))]
    listed = {
        Path(line)
        for listing in lists
        if listing.is_file()
        for line in listing.read_text().splitlines()
        if Path(line).suffix.lower() in IMAGE_SUFFIXES
    }
    owned = {path for path in listed if path.is_file()}  # listed and still on disk
    where = PHOTO_PACKAGES[package]
    if not where.wallpapers:
        photo_dir = Path(where.directory)
        photos = [(path.name, path) for path in owned if path.parent == photo_dir]
        if where.files:
            photos = [(name, path) for name, path in photos if name in where.files]
        named = where.files
    else:
        photos = []
        for wallpaper in where.wallpapers:
            image_dir = Path(where.directory) / wallpaper / "contents" / "images"
            sizes = [path for path in owned if path.parent == image_dir and _pixels(path) > 0]
            if sizes:
                photos.append((wallpaper, max(sizes, key=_pixels)))
        named = where.wallpapers
    absent = sorted(set(named) - {name for name, _ in photos})
    if photos and absent:
        warnings.warn(
            f"{package} no longer ships the photo(s) {', '.join(absent)}: "
            "training on the rest (the patch bank's fingerprint changes with it)",
            UnreadableImageWarning,
            stacklevel=3,
        )
    return sorted(photos, key=lambda photo: photo[1])


def _pixels(path: Path) -> int:
    """Width x height from a KDE wallpaper file name such as 2560x1600.jpg (0 if not one)."""
    width, cross, height = path.stem.partition("x")
    return int(width) * int(height) if cross and width.isdigit() and height.isdigit() else 0
