"""Inputs of vqtok-tokenize: brace patterns, WebDataset keys, the part rule, damaged inputs
listed (never fatal), and command-line mistakes answered with one line and exit code 2."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from tokenize_support import MODEL_DIR

from service.tokenize import main
from service.tokenize_inputs import (
    UsageError,
    expand_braces,
    list_part,
    part_of,
    read_items,
    resolve_inputs,
    webdataset_key,
)


def test_brace_patterns_expand_like_a_shell() -> None:
    assert expand_braces("data/{00000..00002}.tar") == [
        "data/00000.tar",
        "data/00001.tar",
        "data/00002.tar",
    ]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]  # no leading zero: no padding
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("s{a,b}-{1..2}.tar") == ["sa-1.tar", "sa-2.tar", "sb-1.tar", "sb-2.tar"]
    assert expand_braces("x{a,b{0..1}}y") == ["xay", "xb0y", "xb1y"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("odd{}name{x}.tar") == ["odd{}name{x}.tar"]  # bash keeps these
    for bad, why in (("a{1..3.tar", "never closed"), ("a}.tar", "without a matching")):
        with pytest.raises(UsageError, match=why):
            expand_braces(bad)


def test_webdataset_keys_split_at_the_first_dot() -> None:
    assert webdataset_key("00042/sample.jpg") == ("00042/sample", "jpg")
    assert webdataset_key("a.b/c.seg.PNG") == ("a.b/c", "seg.png")
    assert webdataset_key("noext") == ("noext", "")


def test_the_part_rule_is_a_stable_hash_of_the_unit_name() -> None:
    # pinned: any machine, any Python, any run must put a unit in the same part
    assert [part_of(f"{i:05d}.tar", 7) for i in range(8)] == [
        part_of(f"{i:05d}.tar", 7) for i in range(8)
    ]
    assert part_of("anything", 1) == 0
    counts = [0] * 4
    for i in range(4000):
        counts[part_of(f"images/{i:06d}.jpg", 4)] += 1
    assert min(counts) > 900  # ~1000 each: a hash, not a prefix


@pytest.mark.parametrize("kind", ["folder", "webdataset", "parquet"])
def test_parts_cover_every_item_exactly_once(inputs, kind: str) -> None:
    spec = _spec(inputs, kind)
    whole = list_part(spec)
    assert len(whole.items) >= 10
    for parts in (2, 3, 5):
        listings = [list_part(spec, parts, index) for index in range(parts)]
        keys = [item.key for listing in listings for item in listing.items]
        assert sorted(keys) == sorted(item.key for item in whole.items)
        assert len(set(keys)) == len(keys)
        bad = [name for listing in listings for name, _ in listing.unreadable]
        assert sorted(bad) == sorted(name for name, _ in whole.unreadable)
        assert sum(listing.units_in_part for listing in listings) == whole.units


def test_damaged_containers_keep_what_they_can(inputs) -> None:
    spec = _spec(inputs, "webdataset")
    tars = list_part(spec)
    keys = [item.key for item in tars.items]
    assert "cut/ok" in keys and "cut/lost" in keys and "zz/garbage" in keys
    assert len(keys) == len(inputs.images) + 3  # .json members are not images
    read = {item.key: data for item, data in read_items(spec, tars.items)}
    assert read["cut/ok"] == inputs.images[sorted(inputs.images)[0]][1]
    assert "cut short" in read["cut/lost"]  # an error message, not bytes

    parquet = list_part(_spec(inputs, "parquet"))
    ((name, error),) = parquet.unreadable
    assert name == "p-00002.parquet" and "not a readable Parquet file" in error
    read = {item.key: data for item, data in read_items(_spec(inputs, "parquet"), parquet.items)}
    assert isinstance(read["a/000"], bytes) and read["a/000"] == inputs.images["a/000"][1]
    assert "no image bytes" in read["zz/no-bytes"]


def test_a_damaged_tar_header_is_reported(tmp_path: Path, inputs) -> None:
    extension, data = inputs.images["a/000"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in ("first", "second"):
            info = tarfile.TarInfo(f"{name}.{extension}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    second = 512 + -(-len(data) // 512) * 512  # the first member's header + padded data
    raw = bytearray(buffer.getvalue())
    raw[second + 148 : second + 156] = b"9999999\0"  # a wrong header checksum
    (tmp_path / "damaged.tar").write_bytes(bytes(raw))
    listing = list_part(resolve_inputs([str(tmp_path / "damaged.tar")]))
    assert [item.key for item in listing.items] == ["first"]
    ((name, error),) = listing.unreadable
    assert name == "damaged.tar" and f"damaged tar header at byte {second}" in error


def test_parquet_without_a_key_column_uses_file_and_row(tmp_path: Path, inputs) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [inputs.images[key][1] for key in sorted(inputs.images)[:5]]
    pq.write_table(pa.table({"jpg": rows}), tmp_path / "nokey.parquet", row_group_size=2)
    listing = list_part(resolve_inputs([str(tmp_path / "nokey.parquet")]))
    assert [item.key for item in listing.items] == [f"nokey.parquet/{i}" for i in range(5)]
    assert listing.units == 3  # row groups of 2, 2, 1


def _spec(inputs, kind: str):
    paths = {
        "folder": [str(inputs.folder)],
        "webdataset": [inputs.tar_pattern],
        "parquet": inputs.parquets,
    }[kind]
    return resolve_inputs(paths)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--num-shards", "0"], "--num-shards=0 must be >= 1"),
        (
            ["--num-shards", "3", "--shard-index", "3"],
            "--shard-index=3 must be in [0, --num-shards=3)",
        ),
        (["--batch-size", "0"], "--batch-size=0 must be >= 1"),
        (["--threads", "-1"], "--threads=-1 must be >= 0"),
        (["--actors", "-2"], "--actors=-2 must be >= 0"),
    ],
)
def test_bad_flags_end_with_one_line_and_exit_2(inputs, tmp_path, capsys, flags, says) -> None:
    code = main([str(inputs.folder), "--out", str(tmp_path / "o"), "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "o").exists()


def test_bad_inputs_end_with_one_line_and_exit_2(inputs, tmp_path, capsys) -> None:
    out = ["--out", str(tmp_path / "o"), "--model-dir", str(MODEL_DIR), "--quiet"]
    cases = [
        ([str(tmp_path / "x/{1..3.tar")], "'{' at position"),
        ([*inputs.parquets[:1], str(Path(inputs.folder) / "a" / "000.png")], "not mixed"),
        ([inputs.parquets[0], "--image-column", "photo"], "--image-column='photo' is not a column"),
    ]
    for argv, says in cases:
        assert main([*argv, *out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    # a missing input stops the run (exit 1, as a missing IMAGE_DIR always has)
    assert main([str(tmp_path / "missing-{0..1}.tar"), *out]) == 1
    assert "missing-0.tar does not exist" in capsys.readouterr().err
