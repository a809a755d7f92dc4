"""Offline tokenizing: images -> sharded token files for training a generative model.

    vqtok-tokenize photos/ --out tokens/ --model-dir models/default [--resize fit|pad]
    vqtok-tokenize 'data/{00000..00099}.tar' --out tokens/ --output-format parquet
    vqtok-tokenize train-*.parquet --out tokens/ --num-shards 8 --shard-index 3
    vqtok-tokenize photos/ --out tokens/ --distributor ray        # local Ray, or RAY_ADDRESS

    tokens/
      manifest.json          model id and facts, input, settings, part, per-shard records,
                             unreadable items and inputs, the run's report
      shard-00000.npz        (or .parquet) formats in service/tokenize_outputs.py
      shard-00001.npz        ...

Inputs (``service.tokenize_inputs``): a folder (recursive), WebDataset ``.tar`` shards (brace
patterns expanded here), or Parquet files with an image-bytes column. A part's items are cut in
reading order into shards of ``--shard-size``; each shard is self-describing and written
atomically, so a re-run skips every shard that is complete for the same model and the same keys,
and a crash costs at most the shards in progress. ``--num-shards N --shard-index I`` runs one
of N disjoint parts that together cover the input exactly once (the rule is in
``service.tokenize_inputs``). Images go through the service's own admission and image policy:
offline tokens equal what ``POST /v1/encode`` returns, and at most ``--batch-size`` decoded
images exist at a time. Unreadable files, tar members and Parquet rows are listed in the
manifest, never fatal.

Numpy, Pillow and onnxruntime only (pyarrow for Parquet, ray for ``--distributor ray``, both
imported only when used): no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.admission import ModelGeometry
from service.cli_parser import CliParser
from service.engine import PROVIDER_CHOICES, Engine, EngineError
from service.tokenize_inputs import (
    IMAGE_SUFFIXES,
    INPUT_KINDS,
    InputSpec,
    Item,
    TokenizeError,
    UsageError,
    read_items,
    resolve_inputs,
)
from service.tokenize_outputs import OUTPUT_FORMATS, EncodedShard
from service.tokenize_run import (
    MAX_TOKEN_GRID,
    ImagePreparer,
    TokenizeOptions,
    TokenizeRun,
    part_folder,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_TOKEN_GRID",
    "TokenizeError",
    "TokenizeOptions",
    "UsageError",
    "main",
    "tokenize",
    "tokenize_folder",
]
DISTRIBUTORS = ("single", "ray")


def tokenize(
    spec: InputSpec, out: str | os.PathLike[str], engine: Engine, options: TokenizeOptions
) -> dict[str, Any]:
    """Tokenize one part of ``spec`` into ``out`` in this process; returns the manifest."""
    run = TokenizeRun.start(spec, out, engine.info, options)
    from tqdm import tqdm

    total = sum(len(run.shards[i]) for i in run.todo)
    bar = tqdm(total=total, unit="img", disable=not options.show_progress, desc="tokenizing")
    preparer = ImagePreparer(ModelGeometry.from_model_info(engine.info), options)
    try:
        for index in run.todo:
            shard = encode_items(engine, spec, run.shards[index], preparer, options, bar)
            run.write_shard(index, shard)
    finally:
        bar.close()
    return run.finish()


def encode_items(
    engine: Engine,
    spec: InputSpec,
    items: list[Item],
    preparer: ImagePreparer,
    options: TokenizeOptions,
    progress: Any = None,
) -> EncodedShard:
    """Read, prepare and encode ``items`` in order; failures go to the shard's unreadable list.

    At most ``batch_size`` decoded images exist at a time, whatever the shard size or the photo
    sizes: memory is bounded by batch_size x the largest image admission lets through.
    """
    shard = EncodedShard(engine.info.id)
    results: dict[int, tuple[np.ndarray, tuple[int, int], tuple[int, int]]] = {}
    pending: list[tuple[int, Any]] = []  # (position in items, prepared image)

    def flush() -> None:
        # one engine call per same-shape group; the pixels are dropped after the batch
        by_shape: dict[tuple[int, int], list[tuple[int, Any]]] = defaultdict(list)
        for position, image in pending:
            by_shape[image.image_size].append((position, image))
        for group in by_shape.values():
            grids = engine.encode(np.stack([image.pixels for _, image in group]))
            for (position, image), grid in zip(group, grids):
                results[position] = (grid, image.original_size, image.image_size)
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    for position, (item, data) in enumerate(read_items(spec, items)):
        prepared = preparer(item.key, data)
        if isinstance(prepared, str):
            shard.unreadable.append((item.key, prepared))
            if progress is not None:
                progress.update(1)
            continue
        pending.append((position, prepared))
        if len(pending) == options.batch_size:
            flush()
    flush()
    for position in sorted(results):  # item order inside the shard
        shard.add(items[position].key, *results[position])
    return shard


def tokenize_folder(
    image_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    engine: Engine,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    resize: str = "fit",
    max_pixels: int = 4096 * 4096,
    max_token_grid: int = MAX_TOKEN_GRID,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every image under ``image_dir`` into ``.npz`` shards in ``out``."""
    options = TokenizeOptions(
        batch_size=batch_size,
        shard_size=shard_size,
        resize=resize,
        max_pixels=max_pixels,
        max_token_grid=max_token_grid,
        show_progress=show_progress,
    )
    return tokenize(InputSpec("folder", (str(image_dir),)), out, engine, options)


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="vqtok-tokenize",
        description="Encode images (a folder, WebDataset .tar shards or Parquet files) into "
        "sharded token files (.npz or Parquet) + manifest.json; re-run to resume.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="a folder, .tar files (brace patterns such as 'data/{00000..00099}.tar' are "
        "expanded) or .parquet files",
    )
    parser.add_argument("--out", required=True, help="output folder: shards + manifest.json")
    parser.add_argument("--model-dir", default="models/default", help="exported model folder")
    parser.add_argument("--input-format", choices=("auto", *INPUT_KINDS), default="auto")
    parser.add_argument("--image-column", help="Parquet image column (default: image, else jpg)")
    parser.add_argument("--key-column", default="key", help="Parquet key column (else FILE/ROW)")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="npz")
    parser.add_argument("--batch-size", type=int, default=32, help="images per engine call")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per output shard")
    parser.add_argument("--num-shards", type=int, default=1, help="split the input in N parts")
    parser.add_argument("--shard-index", type=int, default=0, help="the part to run (0-based)")
    parser.add_argument(
        "--resize",
        choices=("fit", "pad"),
        default="fit",
        help="fit: shorter side -> native size, centre crop; pad: keep size, pad to multiple of f",
    )
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="per image")
    parser.add_argument(
        "--max-token-grid",
        type=int,
        default=MAX_TOKEN_GRID,
        help="h*w tokens per image (bounds the engine's memory with --resize pad)",
    )
    parser.add_argument("--providers", choices=PROVIDER_CHOICES, default="auto")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per engine")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_ray_flags(parser)
    return parser


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributor",
        choices=DISTRIBUTORS,
        default="single",
        help="single: this process; ray: Ray Data (a local Ray, or the cluster at RAY_ADDRESS)",
    )
    parser.add_argument("--ray-cpus", type=int, default=0, help="local Ray CPUs (0: all)")
    parser.add_argument(
        "--actors", type=int, default=0, help="Ray engine actors (0: one per GPU or per 2 CPUs)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = TokenizeOptions(
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        resize=args.resize,
        max_pixels=args.max_pixels,
        max_token_grid=args.max_token_grid,
        output_format=args.output_format,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        show_progress=not args.quiet,
    )
    try:
        options.check()
        for name in ("threads", "ray_cpus", "actors"):
            if getattr(args, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
        spec = resolve_inputs(
            args.inputs, args.input_format, image_column=args.image_column,
            key_column=args.key_column,
        )  # fmt: skip
        manifest = _run(args, spec, options)
    except UsageError as err:
        print(f"vqtok-tokenize: error: {err}", file=sys.stderr)
        return 2
    except (EngineError, TokenizeError) as err:
        print(f"vqtok-tokenize: error: {err}", file=sys.stderr)
        return 1
    print(_summary(manifest, part_folder(Path(args.out), options)))
    return 0


def _run(args: argparse.Namespace, spec: InputSpec, options: TokenizeOptions) -> dict[str, Any]:
    if args.distributor == "ray":
        from service.tokenize_ray import RayOptions, tokenize_with_ray

        ray_options = RayOptions(
            model_dir=args.model_dir, providers=args.providers, threads=args.threads,
            actors=args.actors, local_cpus=args.ray_cpus,
        )  # fmt: skip
        return tokenize_with_ray(spec, args.out, options, ray_options)
    engine = Engine(args.model_dir, providers=args.providers, intra_op_threads=args.threads)
    return tokenize(spec, args.out, engine, options)


def _summary(manifest: dict[str, Any], out: Path) -> str:
    report = manifest["report"]
    return (
        f"{manifest['images']} images -> {len(manifest['shards'])} shards in {out} "
        f"({manifest['skipped_shards']} already done, {len(manifest['unreadable'])} unreadable); "
        f"{manifest['tokens']} tokens; this run: {report['encoded_this_run']} images in "
        f"{report['seconds']:.1f} s = {report['images_per_s']:.1f} images/s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
