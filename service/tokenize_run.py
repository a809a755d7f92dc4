"""One run of `vqtok-tokenize`, whatever runs the encoder: options, the part's plan, the image
preparation, the shard files and the manifest.

Both distributors (one process: ``service.tokenize``; Ray: ``service.tokenize_ray``) do the same
four steps through this module, so their outputs are the same bytes:

1. ``TokenizeRun.start``: list this part of the input (``service.tokenize_inputs``), cut its
   items into output shards of ``shard_size`` in reading order, and keep the shards already
   finished for this model and exactly these keys (a re-run after an interruption skips them);
2. every remaining item: ``ImagePreparer`` (the service's own admission and image policy, so
   offline tokens equal ``POST /v1/encode``'s), then ``Engine.encode``;
3. ``TokenizeRun.write_shard``: the shard written atomically, then the manifest (after every
   shard: progress survives a crash);
4. ``TokenizeRun.finish``: stale shards of a longer earlier listing removed, the report written.

Output folder: ``--out`` itself, or ``--out/part-IIIII-of-NNNNN`` when ``--num-shards`` > 1, so
every part can share one ``--out`` (a cluster's shared disk) without touching another's files.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.admission import Limits, ModelGeometry, prepare_upload
from service.files import write_bytes_atomic
from service.images import PreparedImage
from service.problems import Problem
from service.tokenize_inputs import (
    IMAGE_SUFFIXES,
    InputSpec,
    Item,
    Listing,
    TokenizeError,
    UsageError,
    list_part,
)
from service.tokenize_outputs import (
    INT16_CODES,
    OUTPUT_FORMATS,
    SUFFIXES,
    EncodedShard,
    finished,
    record,
    shard_bytes,
    shard_name,
)

MANIFEST_FILE = "manifest.json"
FORMAT = "vqtok-tokens"
FORMAT_VERSION = 1
# 128 x 128 tokens = 1024 x 1024 pixels at f = 8: ~0.6 GiB of onnxruntime working memory
MAX_TOKEN_GRID = 128 * 128
PART_RULE = "sha256(unit name)[:8] mod num_shards"


@dataclass(frozen=True)
class TokenizeOptions:
    """Everything a run needs besides the input, the output folder and the engine."""

    batch_size: int = 32
    shard_size: int = 1024
    resize: str = "fit"
    max_pixels: int = 4096 * 4096
    max_token_grid: int = MAX_TOKEN_GRID
    output_format: str = "npz"
    num_shards: int = 1
    shard_index: int = 0
    show_progress: bool = True

    def check(self) -> None:
        """Raise UsageError naming the flag of the first invalid value."""
        for name in ("batch_size", "shard_size", "max_pixels", "max_token_grid", "num_shards"):
            value = getattr(self, name)
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')}={value} must be >= 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise UsageError(
                f"--shard-index={self.shard_index} must be in [0, --num-shards={self.num_shards})"
            )
        if self.resize not in ("fit", "pad"):
            raise UsageError(f"--resize={self.resize!r} must be 'fit' or 'pad'")
        if self.output_format not in OUTPUT_FORMATS:
            raise UsageError(
                f"--output-format={self.output_format!r} must be one of {list(OUTPUT_FORMATS)}"
            )


class ImagePreparer:
    """Bytes -> the encoder's input under the service's admission and image policy.

    Picklable (Ray ships it to its decode tasks); at most ``batch_size`` images per engine call.
    """

    def __init__(self, model: ModelGeometry, options: TokenizeOptions) -> None:
        self.model = model
        self.resize = options.resize
        self.limits = Limits(
            max_body_bytes=0,
            max_pixels=options.max_pixels,
            max_images=options.batch_size,
            max_token_grid=options.max_token_grid,
            max_request_bytes=0,
        )

    def __call__(self, key: str, data: bytes | str) -> PreparedImage | str:
        """The prepared image, or why it cannot be (``data`` may already be a read error)."""
        if isinstance(data, str):
            return data
        try:
            return prepare_upload(
                data, policy=self.resize, model=self.model, limits=self.limits, field=key
            )  # type: ignore[arg-type]
        except Problem as err:  # the service's policy: not an image, corrupt, over a limit
            return err.detail
        except (OSError, ValueError) as err:  # a decoder bug Pillow leaks
            return f"{key}: {type(err).__name__}: {err}"


class TokenizeRun:
    """The plan and the bookkeeping of one part: which shards remain, and the manifest."""

    def __init__(self, spec: InputSpec, out: Path, info: Any, options: TokenizeOptions) -> None:
        self.spec, self.info, self.options = spec, info, options
        self.out = part_folder(out, options)
        self.listing: Listing | None = None
        self.shards: list[list[Item]] = []
        self.records: dict[int, dict[str, Any]] = {}
        self.encoded_images = 0
        self.skipped = 0
        self.started = time.monotonic()

    @classmethod
    def start(cls, spec: InputSpec, out: Any, info: Any, options: TokenizeOptions) -> TokenizeRun:
        """List the part, refuse to mix runs, find the shards already finished."""
        options.check()
        run = cls(spec, Path(out), info, options)
        run.listing = listing = list_part(spec, options.num_shards, options.shard_index)
        if not listing.items and not listing.unreadable and options.num_shards == 1:
            where = spec.paths[0] if spec.kind == "folder" else list(spec.paths[:3])
            raise TokenizeError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {where}")
        run.out.mkdir(parents=True, exist_ok=True)
        _check_previous_run(run.out / MANIFEST_FILE, info.id, options)
        size = options.shard_size
        run.shards = [listing.items[i : i + size] for i in range(0, len(listing.items), size)]
        for index, items in enumerate(run.shards):
            done = finished(run.path(index), info.id, [item.key for item in items])
            if done is not None:
                run.records[index] = done
        run.skipped = len(run.records)
        run._write_manifest(complete=False)
        return run

    def path(self, index: int) -> Path:
        return self.out / shard_name(index, self.options.output_format)  # type: ignore[arg-type]

    @property
    def todo(self) -> list[int]:
        return [index for index in range(len(self.shards)) if index not in self.records]

    def write_shard(self, index: int, shard: EncodedShard) -> None:
        """Write shard ``index`` atomically, then the manifest that lists it."""
        data = shard_bytes(
            shard,
            self.options.output_format,  # type: ignore[arg-type]
            grid_layout=self.options.resize == "fit",
            codebook_size=self.info.codebook_size,
        )
        write_bytes_atomic(self.path(index), data)
        self.records[index] = record(
            self.path(index).name, shard.keys, shard.unreadable, shard.tokens
        )
        self.encoded_images += len(shard.keys) + len(shard.unreadable)
        self._write_manifest(complete=False)

    def finish(self) -> dict[str, Any]:
        """Remove stale shards, write the complete manifest with the run's report; return it."""
        suffix = SUFFIXES[self.options.output_format]  # type: ignore[index]
        keep = {record["file"] for record in self.records.values()}
        for stale in self.out.glob(f"shard-*{suffix}"):
            if stale.name not in keep:
                stale.unlink()
        return self._write_manifest(complete=True)

    def _write_manifest(self, *, complete: bool) -> dict[str, Any]:
        manifest = self._manifest_head()
        records = [self.records[i] for i in sorted(self.records)]
        listed = self.listing.unreadable if self.listing else []
        seconds = time.monotonic() - self.started
        manifest |= {
            "complete": complete,
            "shards": records,
            "images": sum(r["images"] for r in records),
            "tokens": sum(r["tokens"] for r in records),
            "unreadable_inputs": [{"name": n, "error": e} for n, e in listed],
            "unreadable": [
                *({"name": n, "error": e} for n, e in listed),
                *(item for r in records for item in r["unreadable"]),
            ],
            "skipped_shards": self.skipped,
            "report": {
                "encoded_this_run": self.encoded_images,
                "seconds": round(seconds, 3),
                "images_per_s": round(self.encoded_images / seconds, 3) if seconds > 0 else 0.0,
            },
        }
        write_bytes_atomic(self.out / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        return manifest

    def _manifest_head(self) -> dict[str, Any]:
        info, options, listing = self.info, self.options, self.listing
        assert listing is not None
        folder = self.spec.kind == "folder"
        npz = options.output_format == "npz"
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": {
                "id": info.id,
                "codebook_size": info.codebook_size,
                "downsample": info.downsample,
                "image_size": info.image_size,
            },
            "source": str(Path(self.spec.paths[0]).resolve()) if folder else list(self.spec.paths),
            "input": self.spec.describe(),
            "resize": options.resize,
            "output_format": options.output_format,
            "layout": _layout(options),
            "token_dtype": "uint16" if npz else _parquet_dtype(info.codebook_size),
            "shard_size": options.shard_size,
            "part": {
                "shard_index": options.shard_index,
                "num_shards": options.num_shards,
                "rule": PART_RULE,
                "units": listing.units,
                "units_in_part": listing.units_in_part,
            },
            "files": len(listing.items),
            "options": {k: v for k, v in asdict(options).items() if k != "show_progress"},
        }


def _layout(options: TokenizeOptions) -> str:
    if options.output_format == "parquet":
        return "rows (key, token_shape, tokens row-major)"
    return "grid [n,h,w]" if options.resize == "fit" else "ragged (offsets, token_shapes)"


def _parquet_dtype(codebook_size: int) -> str:
    return "int16" if codebook_size <= INT16_CODES else "int32"


def part_folder(out: Path, options: TokenizeOptions) -> Path:
    """Where one part writes: ``out`` itself, or ``out/part-IIIII-of-NNNNN`` when N > 1."""
    if options.num_shards == 1:
        return out
    return out / f"part-{options.shard_index:05d}-of-{options.num_shards:05d}"


def _check_previous_run(path: Path, model_id: str, options: TokenizeOptions) -> None:
    # mixing two models' tokens (or two resize policies, two formats) in one data set would be
    # silent poison
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        return
    before = (
        previous.get("model", {}).get("id"),
        previous.get("resize"),
        previous.get("output_format", "npz"),
    )
    if before != (model_id, options.resize, options.output_format):
        raise TokenizeError(
            f"{path.parent} holds tokens of model {before[0]} with resize={before[1]} as "
            f"{before[2]}; this run uses model {model_id} with resize={options.resize} as "
            f"{options.output_format}: choose another --out"
        )
