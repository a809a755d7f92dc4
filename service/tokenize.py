"""Offline tokenizing: a folder of images -> sharded token files for training a generative model.

    vqtok-tokenize photos/ --out tokens/ --model-dir models/default [--resize fit|pad]

    tokens/
      manifest.json          model id and facts, settings, per-shard records, unreadable files
      shard-00000.npz        tokens uint16, names, original_sizes, image_sizes, token_shapes
      shard-00001.npz        ...

Files are sorted by relative path and shard ``i`` holds files ``[i*S, (i+1)*S)``. Each shard is
self-describing (model id, the file names it covers, the files it could not read) and written
atomically, so a re-run skips every shard that is complete for the same model and the same file
list, and a crash costs at most the shard in progress. Images go through the service's own
admission and image policy (``service.admission``, ``service.images``): offline tokens equal what
``POST /v1/encode`` returns, and at most ``--batch-size`` decoded images exist at a time.

Shard arrays (``np.load(shard)``):
- ``tokens``: ``fit`` -> uint16 [n, h, w]; ``pad`` (sizes differ) -> uint16 [sum h*w], row-major
  per image, image ``i`` at ``offsets[i]:offsets[i+1]`` with shape ``token_shapes[i]``.
- ``names`` (str [n]), ``original_sizes`` / ``image_sizes`` / ``token_shapes`` (int32 [n, 2],
  H x W), ``offsets`` (int64 [n+1]), ``unreadable_names`` / ``unreadable_errors`` (str),
  ``model_id`` (str scalar).

Numpy, Pillow and onnxruntime only: no torch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.admission import Limits, ModelGeometry, prepare_upload
from service.engine import Engine, EngineError
from service.files import write_bytes_atomic
from service.images import PreparedImage
from service.problems import Problem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_FILE = "manifest.json"
FORMAT = "vqtok-tokens"
FORMAT_VERSION = 1
# 128 x 128 tokens = 1024 x 1024 pixels at f = 8: ~0.6 GiB of onnxruntime working memory
MAX_TOKEN_GRID = 128 * 128


class TokenizeError(RuntimeError):
    """The run cannot start or continue (bad folder, another model's output...)."""


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``root``, sorted (the shard order)."""
    if not root.is_dir():
        raise TokenizeError(f"IMAGE_DIR {root} is not a directory")
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def _finished(path: Path, model_id: str, names: list[str]) -> dict[str, Any] | None:
    """The shard's record if ``path`` is complete for this model and exactly these files."""
    try:
        with np.load(path, allow_pickle=False) as shard:
            covered = [*shard["names"].tolist(), *shard["unreadable_names"].tolist()]
            if str(shard["model_id"]) != model_id or sorted(covered) != sorted(names):
                return None
            return _record(
                path.name,
                shard["names"].tolist(),
                shard["unreadable_names"].tolist(),
                shard["unreadable_errors"].tolist(),
            )
    except (OSError, ValueError, KeyError):  # missing, truncated, or not ours: redo it
        return None


def _record(file: str, names: list, bad_names: list, bad_errors: list) -> dict[str, Any]:
    return {
        "file": file,
        "images": len(names),
        "unreadable": [{"name": n, "error": e} for n, e in zip(bad_names, bad_errors)],
    }


def encode_shard(
    engine: Engine,
    root: Path,
    names: list[str],
    *,
    resize: str,
    batch_size: int,
    max_pixels: int,
    max_token_grid: int = MAX_TOKEN_GRID,
    progress: Any = None,
) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Decode and encode ``names``; returns (shard arrays, [(unreadable name, why)]).

    At most ``batch_size`` decoded images exist at a time, whatever the shard size or the photo
    sizes: memory is bounded by batch_size x the largest image admission lets through.
    """
    limits = Limits(
        max_body_bytes=0,
        max_pixels=max_pixels,
        max_images=batch_size,
        max_token_grid=max_token_grid,
        max_request_bytes=0,
    )
    model = ModelGeometry.from_model_info(engine.info)
    tokens: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # original, image size
    unreadable: list[tuple[str, str]] = []
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        prepared = _prepare_chunk(root, chunk, resize, model, limits, unreadable, progress)
        # one engine call per same-shape group; the pixels are dropped after the chunk
        by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name, image in prepared.items():
            by_shape[image.image_size].append(name)
            sizes[name] = (image.original_size, image.image_size)
        for group in by_shape.values():
            batch = np.stack([prepared[name].pixels for name in group])
            for name, grid in zip(group, engine.encode(batch)):
                tokens[name] = grid.astype(np.uint16)
        if progress is not None:
            progress.update(len(prepared))
        del prepared

    done = [name for name in names if name in tokens]  # file order inside the shard
    grids = [tokens[name] for name in done]
    shapes = np.array([g.shape for g in grids], np.int32).reshape(-1, 2)
    offsets = np.concatenate([[0], np.cumsum([g.size for g in grids])]).astype(np.int64)
    if resize == "fit" and grids:
        flat_or_grid = np.stack(grids)
    else:
        flat_or_grid = np.concatenate([g.ravel() for g in grids]) if grids else np.zeros(0)
    arrays = {
        "tokens": flat_or_grid.astype(np.uint16),
        "token_shapes": shapes,
        "offsets": offsets,
        "names": np.array(done, dtype=str),
        "original_sizes": np.array([sizes[n][0] for n in done], np.int32).reshape(-1, 2),
        "image_sizes": np.array([sizes[n][1] for n in done], np.int32).reshape(-1, 2),
        "unreadable_names": np.array([n for n, _ in unreadable], dtype=str),
        "unreadable_errors": np.array([e for _, e in unreadable], dtype=str),
        "model_id": np.array(engine.info.id),
    }
    return arrays, unreadable


def _prepare_chunk(
    root: Path,
    names: list[str],
    resize: str,
    model: ModelGeometry,
    limits: Limits,
    unreadable: list[tuple[str, str]],
    progress: Any,
) -> dict[str, PreparedImage]:
    """The service's admission + image policy for each file; failures go to ``unreadable``."""
    prepared: dict[str, PreparedImage] = {}
    for name in names:
        try:
            data = (root / name).read_bytes()
            prepared[name] = prepare_upload(
                data,
                policy=resize,
                model=model,
                limits=limits,
                field=name,  # type: ignore[arg-type]
            )
        except Problem as err:  # the service's policy: not an image, corrupt, over a limit
            unreadable.append((name, err.detail))
        except (OSError, ValueError) as err:  # unreadable file, or a decoder bug Pillow leaks
            unreadable.append((name, f"{type(err).__name__}: {err}"))
        else:
            continue
        if progress is not None:
            progress.update(1)
    return prepared


def _new_manifest(
    info: Any, root: Path, resize: str, shard_size: int, files: int
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {
            "id": info.id,
            "codebook_size": info.codebook_size,
            "downsample": info.downsample,
            "image_size": info.image_size,
        },
        "source": str(root.resolve()),
        "resize": resize,
        "layout": "grid [n,h,w]" if resize == "fit" else "ragged (offsets, token_shapes)",
        "token_dtype": "uint16",
        "shard_size": shard_size,
        "files": files,
        "complete": False,
        "shards": [],
    }


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
    """Tokenize every image under ``image_dir`` into shards in ``out``; returns the manifest."""
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise TokenizeError(f"--{name.replace('_', '-')}={value} must be >= 1")
    if resize not in ("fit", "pad"):
        raise TokenizeError(f"--resize={resize!r} must be 'fit' or 'pad'")
    root, out = Path(image_dir), Path(out)
    names = list_images(root)
    if not names:
        raise TokenizeError(f"no {'/'.join(IMAGE_SUFFIXES)} files under {root}")
    out.mkdir(parents=True, exist_ok=True)
    _check_previous_run(out / MANIFEST_FILE, engine.info.id, resize)

    from tqdm import tqdm

    info = engine.info
    manifest = _new_manifest(info, root, resize, shard_size, len(names))
    shards = [names[i : i + shard_size] for i in range(0, len(names), shard_size)]
    bar = tqdm(total=len(names), unit="img", disable=not show_progress, desc="tokenizing")
    skipped = 0
    try:
        for index, shard_names in enumerate(shards):
            path = out / shard_name(index)
            record = _finished(path, info.id, shard_names)
            if record is None:
                arrays, bad = encode_shard(
                    engine,
                    root,
                    shard_names,
                    resize=resize,
                    batch_size=batch_size,
                    max_pixels=max_pixels,
                    max_token_grid=max_token_grid,
                    progress=bar,
                )
                buffer = io.BytesIO()
                np.savez(buffer, **arrays)
                write_bytes_atomic(path, buffer.getvalue())
                record = _record(
                    path.name, arrays["names"].tolist(), [n for n, _ in bad], [e for _, e in bad]
                )
            else:
                skipped += 1
                bar.update(len(shard_names))
            manifest["shards"].append(record)
            _write_manifest(out, manifest)  # after every shard: progress survives a crash
    finally:
        bar.close()
    # shards of an earlier, longer file list would be stale: remove them
    for stale in out.glob("shard-*.npz"):
        if stale.name not in {s["file"] for s in manifest["shards"]}:
            stale.unlink()
    manifest["complete"] = True
    manifest["skipped_shards"] = skipped
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    records = manifest["shards"]
    manifest["images"] = sum(r["images"] for r in records)
    manifest["unreadable"] = [item for r in records for item in r["unreadable"]]
    write_bytes_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())


def _check_previous_run(path: Path, model_id: str, resize: str) -> None:
    # mixing two models' tokens (or two resize policies) in one data set would be silent poison
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        return
    before = (previous.get("model", {}).get("id"), previous.get("resize"))
    if before != (model_id, resize):
        raise TokenizeError(
            f"{path.parent} holds tokens of model {before[0]} with resize={before[1]}; this run "
            f"uses model {model_id} with resize={resize}: choose another --out"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vqtok-tokenize",
        description="Encode a folder of images into sharded uint16 token files (.npz).",
    )
    parser.add_argument("image_dir", help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--model-dir", default="models/default", help="exported model directory")
    parser.add_argument("--batch-size", type=int, default=32, help="images per engine call")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per .npz shard")
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
    parser.add_argument("--providers", default="auto", help="auto | cpu | cuda | tensorrt")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        engine = Engine(args.model_dir, providers=args.providers, intra_op_threads=args.threads)
        manifest = tokenize_folder(
            args.image_dir,
            args.out,
            engine,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            resize=args.resize,
            max_pixels=args.max_pixels,
            max_token_grid=args.max_token_grid,
            show_progress=not args.quiet,
        )
    except (EngineError, TokenizeError) as err:
        print(f"vqtok-tokenize: error: {err}", file=sys.stderr)
        return 1
    print(
        f"{manifest['images']} images -> {len(manifest['shards'])} shards in {args.out} "
        f"({manifest['skipped_shards']} already done, {len(manifest['unreadable'])} unreadable)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
