"""Offline data layer: sources, patch bank cache, Dataset/DataLoader."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DistributedSampler

from training.config import DataConfig
from training.data import (
    ImageItem,
    ImageSource,
    MissingSourceError,
    PatchDataset,
    PatchStream,
    UnreadableImageError,
    UnreadableImageWarning,
    build_patch_bank,
    debian_photos,
    fashion_mnist,
    make_patch_loader,
    parse_source,
    pip_photos,
    read_idx,
)
from training.data.idx import FASHION_MNIST_FILES
from training.data.photos import (
    OPENCV_PHOTOS,
    PHOTO_PACKAGES,
    PLASMA_PHOTOS,
    BundledPhoto,
    PhotoPackage,
    split_of,
)

RED, BLUE = (200, 30, 30), (20, 40, 220)


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (120, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def counting_source(images: list[np.ndarray]) -> tuple[ImageSource, list[int]]:
    """A source over in-memory images that records how often each one is decoded."""
    loads = [0] * len(images)

    def loader(index: int):
        def load() -> np.ndarray:
            loads[index] += 1
            return images[index]

        return load

    items = tuple(ImageItem(f"img{i}", f"img{i}:v1", loader(i)) for i in range(len(images)))
    return ImageSource("counting", items), loads


def colour_of(patch: np.ndarray) -> tuple[int, ...] | None:
    """The patch's colour if every pixel has it, else None."""
    first = patch[0, 0]
    return tuple(int(v) for v in first) if (patch == first).all() else None


# --- sources ---------------------------------------------------------------------------------


def test_folder_source_reads_nested_images_as_rgb_and_skips_broken(tmp_path: Path) -> None:
    solid(tmp_path / "red.png", RED)
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("L", (30, 20), 77).save(tmp_path / "a" / "b" / "gray.png")
    Image.new("RGB", (10, 12), BLUE).save(tmp_path / "blue.BMP")
    # 16-bit greyscale: Pillow's plain convert("RGB") would saturate this to 255.
    Image.fromarray(np.full((8, 9), 0x4D12, dtype=np.uint16)).save(tmp_path / "wide16.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")

    source = parse_source(f"folder:{tmp_path}")

    names = [item.name for item in source.items]
    assert names == ["a/b/gray.png", "blue.BMP", "broken.png", "red.png", "wide16.png"]
    with pytest.warns(UnreadableImageWarning, match=r"broken\.png"):
        images = dict(source.images())
    assert sorted(images) == ["a/b/gray.png", "blue.BMP", "red.png", "wide16.png"]
    for rgb in images.values():
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert images["red.png"].shape == (80, 120, 3)
    assert (images["red.png"] == RED).all()
    assert images["a/b/gray.png"].shape == (20, 30, 3)
    assert (images["a/b/gray.png"] == 77).all()
    assert (images["blue.BMP"] == BLUE).all()
    assert (images["wide16.png"] == 0x4D).all()
    with pytest.raises(UnreadableImageError, match=r"broken\.png"):
        source.items[2].load()


def test_unknown_source_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="imagenet") as err:
        parse_source("imagenet")
    for valid in ("folder:<path>", "pip-photos", "debian-photos", "fashion-mnist"):
        assert valid in str(err.value)
    with pytest.raises(ValueError, match="valid sources"):
        parse_source("folder:")


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(MissingSourceError, match="no-such-dir"):
        parse_source(f"folder:{tmp_path / 'no-such-dir'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingSourceError, match=r"no \.png/\.jpg"):
        parse_source(f"folder:{tmp_path / 'empty'}")


def test_missing_debian_packages_name_the_apt_command(tmp_path: Path) -> None:
    with pytest.raises(MissingSourceError) as err:
        debian_photos(dpkg_info_dir=tmp_path)  # an empty dpkg database: nothing installed
    assert (
        "apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 mate-backgrounds"
        in str(err.value)
    )
    with pytest.raises(MissingSourceError, match=r"apt-get install mate-backgrounds$"):
        debian_photos(("mate-backgrounds",), dpkg_info_dir=tmp_path)


def test_missing_pip_package_names_the_pip_command() -> None:
    ghost = BundledPhoto("ghost", "vqtok_no_such_module", "no-such-package", "ghost.png")
    with pytest.raises(MissingSourceError, match="pip install no-such-package"):
        pip_photos((ghost,))


def test_photo_missing_from_installed_package_is_skipped_with_warning() -> None:
    moved = BundledPhoto("moved", "training", "vqtok", "data/moved-to-pooch.png")
    with (
        pytest.warns(UnreadableImageWarning, match="moved-to-pooch"),
        pytest.raises(MissingSourceError, match="none of the pip-bundled photos"),
    ):
        pip_photos((moved,))


def test_pip_photos_are_the_libraries_own_pixels() -> None:
    skimage_data = pytest.importorskip("skimage.data", reason="pip install scikit-image")
    sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="pip install scikit-learn")
    cbook = pytest.importorskip("matplotlib.cbook", reason="pip install matplotlib")

    images = dict(pip_photos().images())

    assert list(images) == [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "motorcycle",
        "china",
        "flower",
        "grace_hopper",
    ]
    np.testing.assert_array_equal(images["astronaut"], skimage_data.astronaut())
    np.testing.assert_array_equal(images["coffee"], skimage_data.coffee())
    np.testing.assert_array_equal(images["motorcycle"], skimage_data.stereo_motorcycle()[0])
    china, flower = sklearn_datasets.load_sample_images().images
    np.testing.assert_array_equal(images["china"], china)
    np.testing.assert_array_equal(images["flower"], flower)
    with cbook.get_sample_data("grace_hopper.jpg") as hopper:
        np.testing.assert_array_equal(images["grace_hopper"], np.asarray(Image.open(hopper)))


def test_debian_photos_when_installed() -> None:
    try:
        source = debian_photos()
    except MissingSourceError as err:
        pytest.skip(str(err))
    names = [Path(item.name).name for item in source.items]
    assert len(source) >= 25
    assert "Kleiber_by_Lukas_Baubkus.jpg" in names  # lomiri-wallpapers-20.04
    assert "Bridge_by_Sander_Klootwijk.jpg" in names  # lomiri-wallpapers-16.04
    assert "Aqua.jpg" in names  # mate-backgrounds nature/
    assert not any(name.endswith(".png") for name in names)  # mate's abstract renders left out

    bank = build_patch_bank("mate-backgrounds", patch_size=64, count=24, cache_dir=None)
    assert bank.shape == (24, 64, 64, 3)
    assert 20 < bank.mean() < 235 and bank.std() > 10  # real photo content, not blank


def test_kde_wallpapers_are_read_at_their_largest_size(tmp_path: Path) -> None:
    # Plasma's layout in a fake dpkg database: one photo at three sizes, a render not on the
    # list of photos, a listed photo whose files are not on this disk
    root = tmp_path / "wallpapers"
    images = root / "EveningGlow" / "contents" / "images"
    images.mkdir(parents=True)
    sizes = [images / f"{size}.jpg" for size in ("640x480", "2560x1600", "1920x1200")]
    for size in sizes:
        Image.new("RGB", (8, 8)).save(size)
    listing = [
        *sizes,
        root / "Kay/contents/images/5120x2880.png",
        root / "Gone/contents/images/1x1.jpg",
    ]
    (tmp_path / "plasma-workspace-wallpapers.list").write_text("\n".join(map(str, listing)))
    package = {"plasma-workspace-wallpapers": PhotoPackage(str(root), ("Gone", "EveningGlow"))}
    with (
        mock.patch.dict(PHOTO_PACKAGES, package),
        pytest.warns(UnreadableImageWarning, match=r"no longer ships .*\bGone\b"),
    ):
        source = debian_photos(("plasma-workspace-wallpapers",), dpkg_info_dir=tmp_path)
        val = debian_photos(("plasma-workspace-wallpapers",), split="val", dpkg_info_dir=tmp_path)
    assert [item.name for item in source.items] == [str(sizes[1])]
    assert source.spec == "plasma-workspace-wallpapers"
    # the split hashes the wallpaper's name, not its size-named file (which would say train)
    assert split_of("EveningGlow") == "val" and split_of("2560x1600.jpg") == "train"
    assert [item.name for item in val.items] == [str(sizes[1])]


def test_wallpaper_photos_are_the_debian_photos_plus_plasmas() -> None:
    try:
        debian, wallpapers = debian_photos(), parse_source("wallpaper-photos")
        train, val = (parse_source(f"wallpaper-photos:{split}") for split in ("train", "val"))
    except MissingSourceError as err:
        pytest.skip(str(err))
    names = lambda source: [item.name for item in source.items]  # noqa: E731
    plasma = [name for name in names(wallpapers) if name.startswith("/usr/share/wallpapers/")]
    assert names(wallpapers) == names(debian) + plasma  # debian-photos unchanged, Plasma's after
    assert len(plasma) == len(PLASMA_PHOTOS) and not any("/Kay/" in name for name in plasma)
    assert sorted(names(train) + names(val)) == sorted(names(wallpapers))
    assert (train.spec, val.spec) == ("wallpaper-photos:train", "wallpaper-photos:val")
    # the debian-photos split is the same inside the larger set
    assert set(names(parse_source("debian-photos:val"))) < set(names(val))


def test_named_files_keep_only_the_photographs_of_a_plain_directory(tmp_path: Path) -> None:
    # OpenCV's layout in a fake dpkg database: photos among drawings in one directory, and a
    # named photo that a package update dropped
    root = tmp_path / "data"
    apple, chart, other = (solid(root / name, RED) for name in ("apple.jpg", "ml.png", "x.jpg"))
    (tmp_path / "opencv-doc.list").write_text("\n".join(map(str, [apple, chart, other])))
    package = {"opencv-doc": PhotoPackage(str(root), files=("apple.jpg", "gone.jpg"))}
    with (
        mock.patch.dict(PHOTO_PACKAGES, package),
        pytest.warns(UnreadableImageWarning, match=r"opencv-doc no longer ships .*\bgone\.jpg"),
    ):
        source = debian_photos(("opencv-doc",), dpkg_info_dir=tmp_path)
    assert [item.name for item in source.items] == [str(apple)]


def test_package_photos_are_the_wallpaper_photos_plus_palapeli_and_opencv() -> None:
    try:
        wallpapers, everything = parse_source("wallpaper-photos"), parse_source("package-photos")
        train, val = (parse_source(f"package-photos:{split}") for split in ("train", "val"))
    except MissingSourceError as err:
        pytest.skip(str(err))
    names = lambda source: [item.name for item in source.items]  # noqa: E731
    added = names(everything)[len(names(wallpapers)) :]
    assert names(everything)[: len(names(wallpapers))] == names(wallpapers)  # unchanged, first
    opencv = [Path(name).name for name in added if "/opencv-doc/" in name]
    palapeli = [name for name in added if name.startswith("/usr/share/palapeli/collection/")]
    assert sorted(opencv) == sorted(OPENCV_PHOTOS) and len(palapeli) == 5
    assert len(added) == len(opencv) + len(palapeli)
    assert sorted(names(train) + names(val)) == sorted(names(everything))
    assert (train.spec, val.spec) == ("package-photos:train", "package-photos:val")
    assert set(names(parse_source("wallpaper-photos:val"))) < set(names(val))


# --- IDX / Fashion-MNIST ---------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, type_code: int, *, compress: bool) -> Path:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_uint8_and_big_endian_int16(tmp_path: Path, compress: bool) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    signed = np.array([[-2, 300], [7, -32768]], dtype=np.int16)

    read_images = read_idx(write_idx(tmp_path / "images", images, 0x08, compress=compress))
    read_signed = read_idx(write_idx(tmp_path / "signed", signed, 0x0B, compress=compress))

    np.testing.assert_array_equal(read_images, images)
    assert read_images.dtype == np.uint8
    np.testing.assert_array_equal(read_signed, signed)
    assert read_signed.dtype == np.int16 and read_signed.dtype.isnative


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    good = write_idx(tmp_path / "good", np.zeros((2, 3, 3), np.uint8), 0x08, compress=False)
    (tmp_path / "short").write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shape \(2, 3, 3\) \(18 bytes of uint8\) but 17 bytes"):
        read_idx(tmp_path / "short")
    Image.new("RGB", (4, 4)).save(tmp_path / "picture.png")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "picture.png")


def test_fashion_mnist_from_idx_files(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / FASHION_MNIST_FILES["train"], pixels, 0x08, compress=True)

    source = fashion_mnist(root=tmp_path)

    assert len(source) == 3 and source.spec == "fashion-mnist"
    second = source.items[1].load()
    assert second.shape == (28, 28, 3) and second.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(second[..., channel], pixels[1])
    with pytest.raises(MissingSourceError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="'validation'"):
        fashion_mnist("validation", root=tmp_path)


def test_fashion_mnist_debian_package_when_installed() -> None:
    try:
        train = parse_source("fashion-mnist")
        test = parse_source("fashion-mnist:test")
    except MissingSourceError as err:
        pytest.skip(str(err))
    assert (len(train), len(test)) == (60_000, 10_000)
    first = train.items[0].load()
    assert first.shape == (28, 28, 3)
    # Pixel sums of the first images (an ankle boot / the first test image) pin the parsing.
    assert int(first[..., 0].sum()) == 76_247
    assert int(test.items[0].load()[..., 0].sum()) == 33_456


# --- patch bank ------------------------------------------------------------------------------


def test_patch_bank_shares_patches_evenly_between_images(tmp_path: Path) -> None:
    solid(tmp_path / "blue.png", BLUE)
    solid(tmp_path / "red.png", RED)

    bank = build_patch_bank(
        f"folder:{tmp_path}", patch_size=32, count=50, short_side=(40, 80), cache_dir=None
    )

    assert bank.shape == (50, 32, 32, 3) and bank.dtype == np.uint8
    colours = [colour_of(patch) for patch in bank]
    assert colours.count(RED) == 25 and colours.count(BLUE) == 25
    # Shuffled into the bank: the first half is not all one photo.
    assert {colours[i] for i in range(25)} == {RED, BLUE}


def test_fewer_patches_than_images_takes_a_random_subset_of_images() -> None:
    # Fashion-MNIST with count < 60k: the bank must not just be the first `count` images.
    images = [np.full((8, 8, 3), value, np.uint8) for value in range(10)]
    picked = set()
    for seed in range(12):
        source, loads = counting_source(images)
        bank = build_patch_bank(source, patch_size=8, count=4, seed=seed, cache_dir=None)
        assert sum(loads) == 4 and max(loads) == 1  # only the chosen images are decoded
        assert sorted(int(patch[0, 0, 0]) for patch in bank) == [
            i for i, n in enumerate(loads) if n
        ]
        picked |= {i for i, n in enumerate(loads) if n}
    assert picked == set(range(10))


def test_patches_are_exact_crops_or_mirrors_at_native_scale() -> None:
    # Every pixel unique: R = x, G = y, so a patch's top-left pixel says where it was cut.
    y, x = np.mgrid[0:70, 0:90]
    image = np.stack([x, y, np.full_like(x, 9)], axis=-1).astype(np.uint8)
    source, _ = counting_source([image])

    bank = build_patch_bank(source, patch_size=16, count=100, short_side=(70, 70), cache_dir=None)

    mirrored = 0
    for patch in bank:
        flipped = patch[0, 0, 0] > patch[0, -1, 0]
        mirrored += flipped
        unflipped = patch[:, ::-1] if flipped else patch
        top, left = int(unflipped[0, 0, 1]), int(unflipped[0, 0, 0])
        np.testing.assert_array_equal(unflipped, image[top : top + 16, left : left + 16])
    assert 25 <= mirrored <= 75


def test_patches_see_a_range_of_scales() -> None:
    # A horizontal ramp R = x over 256 px: at short side s its slope is 256 / s per pixel.
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (256, 256, 3)).copy()
    source, _ = counting_source([ramp])

    bank = build_patch_bank(source, patch_size=32, count=640, short_side=(64, 256), cache_dir=None)

    rise = np.abs(bank[:, 16, -1, 0].astype(int) - bank[:, 16, 0, 0].astype(int))
    short_sides = 31 * 256 / rise
    assert short_sides.min() > 64 * 0.9 and short_sides.max() < 256 * 1.1
    assert short_sides.min() < 110 and short_sides.max() > 200
    assert len(np.unique(rise)) >= 5  # ten groups of 64 patches, a scale each


def test_patch_bank_is_deterministic_per_seed() -> None:
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8) for _ in range(3)]
    source, _ = counting_source(photos)
    options = {"patch_size": 24, "count": 40, "short_side": (30, 90), "cache_dir": None}

    first = build_patch_bank(source, seed=5, **options)
    again = build_patch_bank(source, seed=5, **options)
    other = build_patch_bank(source, seed=6, **options)

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_patch_bank_cache_is_reused_and_written_atomically(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    photos = [rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8) for _ in range(2)]
    source, loads = counting_source(photos)
    cache = tmp_path / "cache"

    built = build_patch_bank(source, patch_size=16, count=30, seed=3, cache_dir=cache)

    files = sorted(os.listdir(cache))
    assert len(files) == 1 and files[0].endswith(".npy") and "16px-30-seed3" in files[0]
    assert loads == [1, 1]
    mtime = (cache / files[0]).stat().st_mtime_ns

    reloaded = build_patch_bank(source, patch_size=16, count=30, seed=3, cache_dir=cache)

    assert loads == [1, 1]  # nothing decoded: served from the .npy
    assert (cache / files[0]).stat().st_mtime_ns == mtime
    assert isinstance(reloaded, np.memmap) and not reloaded.flags.writeable
    np.testing.assert_array_equal(reloaded, built)
    np.testing.assert_array_equal(np.load(cache / files[0]), built)

    build_patch_bank(source, patch_size=16, count=31, seed=3, cache_dir=cache)
    assert len(os.listdir(cache)) == 2  # a different count is a different bank


def test_failed_build_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    def crash() -> np.ndarray:
        raise RuntimeError("disk on fire")

    good = np.zeros((40, 40, 3), np.uint8)
    items = (ImageItem("ok", "ok", lambda: good), ImageItem("bad", "bad", crash))
    cache = tmp_path / "cache"

    with pytest.raises(RuntimeError, match="disk on fire"):
        build_patch_bank(ImageSource("crashing", items), patch_size=8, count=10, cache_dir=cache)

    assert os.listdir(cache) == []  # no temp file, no half-written bank under the final name


def test_unusable_images_are_skipped_and_their_share_made_up(tmp_path: Path) -> None:
    solid(tmp_path / "a_red.png", RED)
    solid(tmp_path / "b_tiny.png", BLUE, size=(12, 10))
    (tmp_path / "z_broken.png").write_bytes(b"\x89PNG but truncated")

    with pytest.warns(UnreadableImageWarning) as caught:
        bank = build_patch_bank(
            f"folder:{tmp_path}", patch_size=32, count=9, short_side=(40, 80), cache_dir=None
        )

    messages = " ".join(str(warning.message) for warning in caught)
    assert "z_broken.png" in messages
    assert "b_tiny.png: 12x10 is smaller than patch_size 32" in messages
    assert [colour_of(patch) for patch in bank] == [RED] * 9


def test_patch_bank_without_usable_images_fails_clearly(tmp_path: Path) -> None:
    solid(tmp_path / "tiny.png", BLUE, size=(12, 10))
    with (
        pytest.warns(UnreadableImageWarning),
        pytest.raises(RuntimeError, match="no usable image of at least 32x32"),
    ):
        build_patch_bank(f"folder:{tmp_path}", patch_size=32, count=4, cache_dir=None)
    with pytest.raises(ValueError, match="high >= patch_size"):
        build_patch_bank(f"folder:{tmp_path}", patch_size=64, count=4, short_side=(16, 32))


# --- Dataset / DataLoader --------------------------------------------------------------------


@pytest.fixture
def small_bank() -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)


def test_dataset_returns_float_chw_in_unit_range(small_bank: np.ndarray) -> None:
    plain = PatchDataset(small_bank, flip=False)
    item = plain[5]
    assert item.dtype == torch.float32 and item.shape == (3, 8, 8)
    expected = torch.from_numpy(small_bank[5]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item, expected)

    flipping = PatchDataset(small_bank, flip=True, seed=0)
    draws = [flipping[5] for _ in range(40)]
    mirrored = sum(torch.equal(draw, expected.flip(-1)) for draw in draws)
    assert sum(torch.equal(draw, expected) for draw in draws) + mirrored == 40
    assert 5 <= mirrored <= 35

    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        PatchDataset(small_bank.astype(np.float32))


def _square_symmetries(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of a square [C, H, W] image: 4 turns of it, then 4 of its mirror."""
    return [m.rot90(k, dims=(-2, -1)) for m in (image, image.flip(-1)) for k in range(4)]


def test_rotate_draws_all_eight_symmetries_and_leaves_flip_only_draws_unchanged(
    small_bank: np.ndarray,
) -> None:
    expected = torch.from_numpy(small_bank[5]).permute(2, 0, 1).float() / 255
    symmetries = _square_symmetries(expected)
    turning = PatchDataset(small_bank, rotate=True, seed=0)
    draws = [turning[5] for _ in range(200)]
    seen = [next(i for i, s in enumerate(symmetries) if torch.equal(d, s)) for d in draws]
    assert sorted(set(seen)) == list(range(8))  # every draw is one of the 8, and each occurs
    # without rotate the generator is drawn as before the option existed: the same flips per seed
    flips_only = PatchDataset(small_bank, seed=3)
    reference = np.random.default_rng(3)
    for _ in range(20):
        mirrored = reference.random() < 0.5
        assert torch.equal(flips_only[5], expected.flip(-1) if mirrored else expected)

    with pytest.raises(ValueError, match="rotate needs square patches, got 8x6"):
        PatchDataset(small_bank[:, :, :6], rotate=True)


def test_patch_stream_turns_patches_only_when_data_rotate_is_set(small_bank: np.ndarray) -> None:
    def first_batches(rotate: bool) -> torch.Tensor:
        data = DataConfig(batch_size=16, workers=0, rotate=rotate)
        stream = PatchStream(small_bank, data, world_size=1)
        return torch.cat([next(stream) for _ in range(4)])

    plain, turned = first_batches(False), first_batches(True)
    assert torch.equal(plain, first_batches(False)) and torch.equal(turned, first_batches(True))
    # the batch order is the same (torch's generator); each turned patch is a symmetry of the
    # plain one, and some are quarter turns, which no mirror of it equals
    quarter_turns = 0
    for before, after in zip(plain, turned, strict=True):
        mirrors = (before, before.flip(-1))
        assert any(torch.equal(after, t) for t in _square_symmetries(before))
        quarter_turns += not any(torch.equal(after, m) for m in mirrors)
    assert quarter_turns > 0


def test_loader_batches_repeat_exactly_for_a_seed(small_bank: np.ndarray) -> None:
    def two_epochs(seed: int) -> list[torch.Tensor]:
        loader = make_patch_loader(small_bank, batch_size=16, seed=seed, num_workers=2)
        return [batch for _ in range(2) for batch in loader]

    first, again, other = two_epochs(0), two_epochs(0), two_epochs(1)

    assert len(first) == 8 and first[0].shape == (16, 3, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[4])  # epoch 2 is a new shuffle
    # Each epoch still visits every patch once (up to mirroring).
    seen = torch.cat(first[:4]).flatten(1).sum(1).sort().values
    sums = torch.from_numpy(small_bank.astype(np.float32) / 255).flatten(1).sum(1).sort().values
    torch.testing.assert_close(seen, sums)


def test_memory_mapped_bank_pickles_by_file_name(tmp_path: Path) -> None:
    source, _ = counting_source([np.random.default_rng(5).integers(0, 256, (48, 48, 3), np.uint8)])
    bank = build_patch_bank(source, patch_size=16, count=200, cache_dir=tmp_path, progress=False)

    whole = pickle.dumps(PatchDataset(bank, flip=False))
    part = pickle.dumps(PatchDataset(bank[10:], flip=False))

    assert len(whole) < 2_000 < bank.nbytes  # workers started by spawn get a path, not pixels
    assert len(part) > bank[10:].nbytes  # a slice cannot be rebuilt from the file name: copied
    restored = pickle.loads(whole)
    torch.testing.assert_close(restored[199], PatchDataset(bank, flip=False)[199])
    torch.testing.assert_close(pickle.loads(part)[0], PatchDataset(bank, flip=False)[10])


def test_loader_uses_distributed_sampler_under_torch_distributed(
    tmp_path: Path, small_bank: np.ndarray
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        loader = make_patch_loader(small_bank, batch_size=8, seed=0, num_workers=0)
        assert isinstance(loader.sampler, DistributedSampler)
        assert sum(len(batch) for batch in loader) == 64
    finally:
        dist.destroy_process_group()
