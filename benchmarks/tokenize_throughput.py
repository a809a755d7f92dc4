"""`vqtok-tokenize` throughput: one process vs `--distributor ray` on this machine.

    .venv/bin/python -m benchmarks.tokenize_throughput                 # 192 photos, 3 rounds
    .venv/bin/python -m benchmarks.tokenize_throughput --images 480 --rounds 5
    .venv/bin/python -m benchmarks.tokenize_throughput --quick         # smoke test

Workload: ``--images`` JPEG crops (quality 90, sides 320-640 px) of the pip-bundled photos in one
folder, tokenized with ``--resize fit`` (native 256 x 256 for models/default) into ``.npz``
shards of 64, the way a data set is prepared for a generative model. Both sides run the CLI's
own code (``service.tokenize.main``) in this process on the same folder, into a fresh ``--out``
each time, alternating single, ray, single, ray ... so drift on a shared machine hits both
alike. The single process uses all cores for onnxruntime (``--threads 0``); Ray is started
once (``ray.init(num_cpus=cpu_quota())``, its start-up timed separately) and each ray run
starts its own actor pool (``--actors`` / ``--threads`` left at their defaults unless given).
A run's time is the whole command: listing, decoding, encoding, writing shards + manifest.

Output: a markdown table (images/s from the median and from the best run of each side) and
exactly one final line of JSON. The token files of both sides are compared: they must be equal.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.cpu import cpu_quota
from service.tokenize import main as tokenize_main

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "default"
SIDES = (320, 640)


def write_photos(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEG crops of the pip photos (scikit-image's bundled ones), sides in SIDES."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera()]
    photos = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=2) for p in photos]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = photos[index % len(photos)]
        scale = 1.25 * SIDES[1] / min(photo.shape[:2])  # every crop fits, none is the whole
        size = (round(photo.shape[1] * scale), round(photo.shape[0] * scale))
        image = Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC)
        height, width = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, size=2))
        top = int(rng.integers(0, image.height - height + 1))
        left = int(rng.integers(0, image.width - width + 1))
        buffer = io.BytesIO()
        image.crop((left, top, left + width, top + height)).save(buffer, "JPEG", quality=90)
        (folder / f"{index:06d}.jpg").write_bytes(buffer.getvalue())


def one_run(argv: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the table and the JSON line only
        code = tokenize_main([*argv, "--out", str(out), "--quiet"])
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"vqtok-tokenize {' '.join(argv)} exited with {code}")
    return seconds


def token_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.npz"))}


def markdown(rows: dict[str, list[float]], images: int) -> str:
    lines = [
        "| distributor | runs | median s | images/s (median) | images/s (best) |",
        "|---|---|---|---|---|",
    ]
    for name, times in rows.items():
        median, best = statistics.median(times), min(times)
        rates = f"{images / median:.1f} | {images / best:.1f}"
        lines.append(f"| {name} | {len(times)} | {median:.2f} | {rates} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL))
    parser.add_argument("--actors", type=int, default=0, help="ray: --actors (0: default)")
    parser.add_argument("--threads", type=int, default=0, help="ray: --threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="6 images, 1 round (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 6, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    cpus = cpu_quota()
    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="warning")
    ray_start_s = time.perf_counter() - started
    sides = {
        "single": ["--distributor", "single"],
        "ray": [
            "--distributor",
            "ray",
            "--actors",
            str(args.actors),
            "--threads",
            str(args.threads),
        ],
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    try:
        with tempfile.TemporaryDirectory(prefix="vqtok-tokenize-bench-") as scratch:
            folder = Path(scratch) / "photos"
            write_photos(folder, args.images)
            common = [str(folder), "--model-dir", args.model_dir, "--shard-size", "64"]
            for round_index in range(args.rounds):
                for name, flags in sides.items():
                    seconds = one_run([*common, *flags], Path(scratch) / name)
                    times[name].append(seconds)
                    print(f"round {round_index}: {name} {seconds:.2f} s", file=sys.stderr)
            equal = token_files(Path(scratch) / "single") == token_files(Path(scratch) / "ray")
    finally:
        ray.shutdown()
    print(markdown(times, args.images))
    print(
        f"\nRay start-up (once, not in the runs): {ray_start_s:.1f} s; token files equal: {equal}"
    )
    record: dict[str, Any] = {
        "benchmark": "tokenize_throughput",
        "images": args.images,
        "rounds": args.rounds,
        "cpus": cpus,
        "model_dir": args.model_dir,
        "ray_start_s": round(ray_start_s, 2),
        "tokens_equal": equal,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    for name, values in times.items():
        record[name] = {
            "seconds": [round(v, 3) for v in values],
            "images_per_s_median": round(args.images / statistics.median(values), 2),
            "images_per_s_best": round(args.images / min(values), 2),
        }
    record["ray_over_single_median"] = round(
        record["ray"]["images_per_s_median"] / record["single"]["images_per_s_median"], 3
    )
    print(json.dumps(record))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
