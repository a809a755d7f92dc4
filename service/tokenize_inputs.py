"""What `vqtok-tokenize` reads: a folder, WebDataset ``.tar`` shards or Parquet files.

Every input is listed as *units* (the smallest piece a machine can read on its own: one image
file of a folder, one ``.tar`` file, one Parquet row group), each holding *items* (one image,
named by its key). Item keys:

- folder: the path relative to the folder (``b/c.jpg``), as before;
- WebDataset: the member path without its extensions (``00042/sample.jpg`` -> ``00042/sample``,
  WebDataset's ``__key__``); a sample's first image member counts, a second one is reported;
- Parquet: the ``--key-column`` value, or ``FILE_NAME/ROW`` (row index in that file) without one.

The part rule (``--num-shards N --shard-index I``): a unit belongs to part
``sha256(unit name)[:8] mod N`` (``part_of``). The unit name is the folder-relative path, the
``.tar`` file name, or ``FILE_NAME#ROW_GROUP``. Why units and a hash: a part reads only its own
tar files and row groups (no machine reads the whole data set), and a unit's part depends on its
name alone, so every machine agrees without seeing the same listing and files added later do
not move finished ones to another part.

Reading needs Pillow for nothing: bytes only. Parquet needs pyarrow (imported when used).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

InputKind = Literal["folder", "webdataset", "parquet"]
INPUT_KINDS: tuple[InputKind, ...] = ("folder", "webdataset", "parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMN_DEFAULTS = ("image", "jpg")
MAX_EXPANSION = 1_000_000  # paths one brace pattern may expand to
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class TokenizeError(RuntimeError):
    """The run cannot start or continue (missing input, another model's output...): exit 1."""


class UsageError(TokenizeError):
    """A command-line value is invalid; the message names the flag and the value: exit 2."""


@dataclass(frozen=True)
class Item:
    """One image to read: ``key`` names it in the outputs; ``source`` is the file holding it.

    ``start``/``length``: the member's data offset and size in a tar; the row group and the row
    inside it in a Parquet file; unused for a folder.
    """

    key: str
    source: str
    start: int = 0
    length: int = 0


@dataclass
class Listing:
    """One part of the input: its items in reading order and what could not even be listed."""

    kind: InputKind
    items: list[Item]
    unreadable: list[tuple[str, str]]  # (unit or member name, why)
    units: int  # units of the whole input
    units_in_part: int


@dataclass(frozen=True)
class InputSpec:
    """Where the images are and how to find them in the files."""

    kind: InputKind
    paths: tuple[str, ...]  # the folder, or the expanded .tar / .parquet paths
    image_column: str | None = None  # Parquet: None = "image", else "jpg"
    key_column: str = "key"

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"kind": self.kind, "paths": list(self.paths)}
        if self.kind == "parquet":
            described |= {"image_column": self.image_column, "key_column": self.key_column}
        return described


# -- brace patterns --------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """``data/{000..002}.tar`` -> data/000.tar, data/001.tar, data/002.tar.

    ``{a..b}`` is an integer range (zero-padded to the wider end when either end has a leading
    zero, descending when a > b), ``{x,y}`` alternatives; groups may repeat and nest. A group
    that is neither is kept literally, as bash does.
    """
    expanded = _expand(pattern, pattern)
    if len(expanded) > MAX_EXPANSION:
        raise UsageError(f"pattern {pattern!r} expands to more than {MAX_EXPANSION} paths")
    return expanded


def _expand(text: str, pattern: str) -> list[str]:
    open_at = text.find("{")
    if open_at < 0:
        if "}" in text:
            raise UsageError(f"pattern {pattern!r}: '}}' without a matching '{{'")
        return [text]
    close_at, commas, depth = -1, [], 0
    for index in range(open_at, len(text)):
        char = text[index]
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 1:
            commas.append(index)
        if depth == 0:
            close_at = index
            break
    if close_at < 0:
        raise UsageError(f"pattern {pattern!r}: '{{' at position {open_at} is never closed")
    head, body, tail = text[:open_at], text[open_at + 1 : close_at], text[close_at + 1 :]
    if "}" in head:
        raise UsageError(f"pattern {pattern!r}: '}}' without a matching '{{'")
    if commas:
        bounds = [open_at, *commas, close_at]
        choices = [text[a + 1 : b] for a, b in itertools.pairwise(bounds)]
    elif _RANGE.match(body):
        choices = _integer_range(body, pattern)
    else:  # "{}" or "{x}": literal, like bash
        return [f"{head}{{{body}}}{end}" for end in _expand(tail, pattern)]
    tails = _expand(tail, pattern)
    return [
        head + mid + end for choice in choices for mid in _expand(choice, pattern) for end in tails
    ]


def _integer_range(body: str, pattern: str) -> list[str]:
    match = _RANGE.match(body)
    assert match is not None
    first, last = match.group(1), match.group(2)
    a, b = int(first), int(last)
    if abs(b - a) >= MAX_EXPANSION:
        raise UsageError(
            f"pattern {pattern!r}: range {{{body}}} has more than {MAX_EXPANSION} values"
        )
    padded = any(len(end.lstrip("-")) > 1 and end.lstrip("-")[0] == "0" for end in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if b >= a else -1
    return [f"{value:0{width}d}" for value in range(a, b + step, step)]


# -- which input, which part -----------------------------------------------------------------------
def resolve_inputs(
    inputs: Iterable[str],
    kind: str = "auto",
    *,
    image_column: str | None = None,
    key_column: str = "key",
) -> InputSpec:
    """The command line's inputs as one spec: one folder, or .tar files, or .parquet files."""
    inputs = list(inputs)
    if kind not in ("auto", *INPUT_KINDS):
        raise UsageError(f"--input-format={kind!r} must be one of auto, {', '.join(INPUT_KINDS)}")
    if not inputs:
        raise UsageError("no input given: name a folder, .tar shards or .parquet files")
    paths = [path for pattern in inputs for path in expand_braces(pattern)]
    if kind == "auto":
        kind = _guess_kind(paths)
    if kind == "folder" and len(paths) != 1:
        raise UsageError(f"a folder input is one directory, got {len(paths)} paths: {paths[:3]}")
    if kind != "folder":
        suffix = ".tar" if kind == "webdataset" else ".parquet"
        folders = [p for p in paths if Path(p).is_dir()]
        if folders:  # a folder of shards: every file of that kind inside it, sorted
            paths = [p for p in paths if p not in folders]
            paths += [str(f) for d in folders for f in sorted(Path(d).rglob(f"*{suffix}"))]
        if not paths:
            raise UsageError(f"no {suffix} files in {inputs}")
    return InputSpec(kind, tuple(paths), image_column, key_column)  # type: ignore[arg-type]


def _guess_kind(paths: list[str]) -> InputKind:
    kinds = {".tar": "webdataset", ".parquet": "parquet"}
    if len(paths) == 1 and (Path(paths[0]).is_dir() or Path(paths[0]).suffix not in kinds):
        return "folder"  # a missing folder is reported by the listing
    found = {kinds.get(Path(p).suffix.lower()) for p in paths}
    if len(found) == 1 and None not in found:
        return found.pop()  # type: ignore[return-value]
    odd = [p for p in paths if Path(p).suffix.lower() not in kinds][:3]
    raise UsageError(
        "inputs must be one folder, or .tar files, or .parquet files (not mixed); got "
        f"{odd or paths[:3]}: name the kind with --input-format"
    )


def part_of(unit: str, num_shards: int) -> int:
    """The part (0..num_shards-1) a unit belongs to: the first 8 bytes of sha256(name) mod N."""
    digest = hashlib.sha256(unit.encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def list_part(spec: InputSpec, num_shards: int = 1, shard_index: int = 0) -> Listing:
    """The items of part ``shard_index`` of ``num_shards``, in reading order."""
    listers = {"folder": _list_folder, "webdataset": _list_tars, "parquet": _list_parquet}
    return listers[spec.kind](spec, lambda unit: part_of(unit, num_shards) == shard_index)


# -- folder ----------------------------------------------------------------------------------------
def _list_folder(spec: InputSpec, mine: Any) -> Listing:
    root = Path(spec.paths[0])
    if not root.is_dir():
        raise TokenizeError(f"IMAGE_DIR {root} is not a directory")
    names = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    items = [Item(name, str(root / name)) for name in names if mine(name)]
    return Listing("folder", items, [], len(names), len(items))


# -- WebDataset ------------------------------------------------------------------------------------
def webdataset_key(member: str) -> tuple[str, str]:
    """(key, extension) as WebDataset splits a member path: at the first dot of the file name."""
    folder, _, name = member.rpartition("/")
    stem, dot, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def _list_tars(spec: InputSpec, mine: Any) -> Listing:
    items: list[Item] = []
    unreadable: list[tuple[str, str]] = []
    owned = sorted(path for path in spec.paths if mine(Path(path).name))
    for path in owned:
        if not Path(path).is_file():
            raise TokenizeError(f"input {path} does not exist (or is not a file)")
        found, problems = _tar_images(path)
        items += found
        unreadable += problems
    return Listing("webdataset", items, unreadable, len(spec.paths), len(owned))


def _tar_images(path: str) -> tuple[list[Item], list[tuple[str, str]]]:
    """The image members of one tar, in archive order; a damaged archive keeps what it listed."""
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    name = Path(path).name
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                key, extension = webdataset_key(member.name)
                if not member.isfile() or f".{extension}" not in IMAGE_SUFFIXES:
                    continue
                if key in seen:
                    why = f"sample {key!r} already has an image ({seen[key]}); one per sample"
                    problems.append((f"{name}:{member.name}", why))
                    continue
                seen[key] = member.name
                items.append(Item(key, path, member.offset_data, member.size))
            end = archive.offset
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append((name, f"tar unreadable after {len(items)} image members: {err}"))
        return items, problems
    # tarfile ends silently at a damaged header: anything but zeros after the end is lost data
    lost = _nonzero_after(path, end)
    if lost is not None:
        problems.append((name, f"damaged tar header at byte {lost}: members after it are lost"))
    return items, problems


def _nonzero_after(path: str, offset: int) -> int | None:
    with open(path, "rb") as file:
        file.seek(offset)
        while chunk := file.read(1 << 16):
            stripped = chunk.lstrip(b"\0")
            if stripped:
                return offset + len(chunk) - len(stripped)
            offset += len(chunk)
    return None


# -- Parquet ---------------------------------------------------------------------------------------
def _list_parquet(spec: InputSpec, mine: Any) -> Listing:
    import pyarrow.parquet as pq

    items: list[Item] = []
    unreadable: list[tuple[str, str]] = []
    units = owned = 0
    for path in sorted(spec.paths):
        name = Path(path).name
        if not Path(path).is_file():
            raise TokenizeError(f"input {path} does not exist (or is not a file)")
        try:
            file = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError... for a damaged footer
            units += 1
            if mine(name):
                owned += 1
                unreadable.append((name, f"not a readable Parquet file: {err}"))
            continue
        image_column(spec, file.schema_arrow.names, path)  # the flag is checked on every file
        first_row = 0
        for group in range(file.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            units += 1
            if mine(f"{name}#{group}"):
                owned += 1
                keys, problem = _row_group_keys(file, spec.key_column, name, group, first_row)
                items += [Item(key, path, group, row) for row, key in enumerate(keys)]
                if problem:
                    unreadable.append(problem)
            first_row += rows
    return Listing("parquet", items, unreadable, units, owned)


def image_column(spec: InputSpec, columns: list[str], path: str) -> str:
    """The image column of a Parquet file: --image-column, else "image", else "jpg"."""
    if spec.image_column is not None:
        if spec.image_column not in columns:
            raise UsageError(
                f"--image-column={spec.image_column!r} is not a column of {path} "
                f"(columns: {columns})"
            )
        return spec.image_column
    for name in IMAGE_COLUMN_DEFAULTS:
        if name in columns:
            return name
    raise UsageError(
        f"{path} has neither an 'image' nor a 'jpg' column (columns: {columns}): "
        "name it with --image-column"
    )


def _row_group_keys(
    file: Any, key_column: str, name: str, group: int, first_row: int
) -> tuple[list[str], tuple[str, str] | None]:
    rows = file.metadata.row_group(group).num_rows
    fallback = [f"{name}/{first_row + row}" for row in range(rows)]
    if key_column not in file.schema_arrow.names:
        return fallback, None
    try:
        values = file.read_row_group(group, columns=[key_column]).column(0).to_pylist()
    except Exception as err:  # a damaged column chunk: this row group only
        return [], (f"{name}#{group}", f"row group {group} is not readable: {err}")
    return [fallback[row] if v is None else str(v) for row, v in enumerate(values)], None


# -- reading ---------------------------------------------------------------------------------------
class UnreadableItem(Exception):
    """This item's bytes cannot be read; the message says why."""


class ImageReader:
    """Bytes of items read in order; keeps the current tar file or Parquet row group open, so a
    run of items from one unit reads it once."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self._tar: tuple[str, Any] | None = None
        self._group: tuple[str, int, list[Any] | Exception] | None = None

    def read(self, item: Item) -> bytes:
        if self.spec.kind == "folder":
            try:
                return Path(item.source).read_bytes()
            except OSError as err:
                raise UnreadableItem(f"{type(err).__name__}: {err}") from err
        if self.spec.kind == "webdataset":
            return self._read_member(item)
        return self._read_row(item)

    def _read_member(self, item: Item) -> bytes:
        if self._tar is None or self._tar[0] != item.source:
            self.close()
            try:
                self._tar = (item.source, open(item.source, "rb"))  # noqa: SIM115 (kept open)
            except OSError as err:
                raise UnreadableItem(f"{type(err).__name__}: {err}") from err
        file = self._tar[1]
        file.seek(item.start)
        data = file.read(item.length)
        if len(data) != item.length:
            name = Path(item.source).name
            raise UnreadableItem(f"{name}: tar member cut short: {len(data)} of {item.length} B")
        return data

    def _read_row(self, item: Item) -> bytes:
        if self._group is None or self._group[:2] != (item.source, item.start):
            self._group = (item.source, item.start, self._load_group(item))
        values = self._group[2]
        if isinstance(values, Exception):
            raise UnreadableItem(str(values))
        return _image_bytes(values[item.length])

    def _load_group(self, item: Item) -> list[Any] | Exception:
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(item.source)
            column = image_column(self.spec, file.schema_arrow.names, item.source)
            table = file.read_row_group(item.start, columns=[column])
            return table.column(0).to_pylist()
        except UsageError:
            raise
        except Exception as err:  # damaged pages: every row of the group is unreadable
            name = Path(item.source).name
            return UnreadableItem(f"row group {item.start} of {name} is not readable: {err}")

    def close(self) -> None:
        if self._tar is not None:
            self._tar[1].close()
            self._tar = None

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self._group = None


def _image_bytes(value: Any) -> bytes:
    # a binary column, or the struct {bytes, path} HuggingFace datasets write for Image features
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            raise UnreadableItem(f"the row holds no image bytes (path={value.get('path')!r})")
        return bytes(data)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if value is None:
        raise UnreadableItem("the row's image is null")
    raise UnreadableItem(f"the image column holds {type(value).__name__}, not bytes")


def read_items(spec: InputSpec, items: Iterable[Item]) -> Iterator[tuple[Item, bytes | str]]:
    """(item, its bytes) or (item, why it could not be read), in the order given."""
    with ImageReader(spec) as reader:
        for item in items:
            try:
                yield item, reader.read(item)
            except UnreadableItem as err:
                yield item, str(err)
