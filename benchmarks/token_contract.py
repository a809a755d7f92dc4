"""The token contract at scale: does an image's token grid depend on the batch it is encoded in?

    .venv/bin/python -m benchmarks.token_contract                      # 2,000,000 tokens
    .venv/bin/python -m benchmarks.token_contract --tokens 500000
    .venv/bin/python -m benchmarks.token_contract --quick              # ~20,000 tokens, smoke test

What runs: random crops of real photos (the pip-bundled photos, plus the Debian wallpapers of
lomiri-wallpapers-16.04, lomiri-wallpapers-20.04 and mate-backgrounds when installed, JPEG-draft
downscaled to a short side of 512-1023), sides drawn uniformly from the multiples of f in
[64, 384], in same-shape groups of 3, 8 and 16 (in turn). Every crop is encoded alone by a
1-thread `Engine` (the reference) and inside its group by a 2-thread `Engine` (models/default,
CPU; the two sides run at the same time), so one pass checks batch size, grouping and thread
count together; every token is compared.
Every --decode-every'th group is also decoded: the reference tokens alone (1 thread) and as the
group (2 threads); every image value is compared. The contract: 0 differing tokens and values.

Cost: the engine runs onnxruntime one image at a time; the cost table times that against the same
session given the whole batch at once (round-robin, 256x256, batch 8, 2 threads): wall img/s
median / best and CPU ms per image median (CPU time is less sensitive to other load).

Output: progress on stderr, a markdown table, then exactly one final line of JSON.
tests/service/test_token_contract.py runs the same comparison on 200,000 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from service.engine import ENCODER_INPUT, Engine
from service.images import unit_pixels
from training.data import MissingSourceError, debian_photos, pip_photos

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "default"
BATCH_SIZES = (3, 8, 16)
SIDES = (64, 384)  # crop sides are multiples of f in this range
DEBIAN_SHORT_SIDE = 512


# -- photos and crops ------------------------------------------------------------------------------
def contract_photos(*, debian: bool = True) -> tuple[dict[str, np.ndarray], str | None]:
    """name -> uint8 [H, W, 3]: the pip photos, plus the Debian wallpapers when installed.

    The second value says why the Debian photos are missing (None when they are in).
    """
    photos = dict(pip_photos().images())
    if not debian:
        return photos, "Debian photos not requested"
    try:
        source = debian_photos()
    except MissingSourceError as err:
        return photos, str(err)
    for item in source.items:
        photos[item.name] = _draft_rgb(Path(item.name))  # debian_photos names items by path
    return photos, None


def _draft_rgb(path: Path, short_side: int = DEBIAN_SHORT_SIDE) -> np.ndarray:
    # The wallpapers are 1-24 megapixels: JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale (3x
    # faster than a full decode) and brings their texture per pixel near the training photos'.
    with Image.open(path) as image:
        scale = short_side / min(image.size)
        if scale < 1:
            image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class Crop:
    photo: str
    top: int
    left: int
    height: int
    width: int

    def pixels(self, photos: dict[str, np.ndarray]) -> np.ndarray:
        """float32 [3, h, w] in [0, 1], as the engine takes them."""
        rows = slice(self.top, self.top + self.height)
        cols = slice(self.left, self.left + self.width)
        rgb = photos[self.photo][rows, cols]
        return unit_pixels(rgb)


def crop_groups(
    photos: dict[str, np.ndarray], f: int, min_tokens: int, seed: int = 0
) -> Iterator[list[Crop]]:
    """Same-shape groups of random crops, batch sizes `BATCH_SIZES` in turn, until the groups
    hold at least `min_tokens` tokens. Deterministic for given photos, f and seed."""
    rng = np.random.default_rng(seed)
    sides = np.arange(SIDES[0], SIDES[1] + 1, f)
    names = sorted(photos)
    tokens, turn = 0, 0
    while tokens < min_tokens:
        size = BATCH_SIZES[turn % len(BATCH_SIZES)]
        height, width = (int(side) for side in rng.choice(sides, 2))
        fits = [n for n in names if photos[n].shape[0] >= height and photos[n].shape[1] >= width]
        group = []
        for name in rng.choice(fits, size):
            rows, cols = photos[name].shape[:2]
            top, left = rng.integers(0, rows - height + 1), rng.integers(0, cols - width + 1)
            group.append(Crop(str(name), int(top), int(left), height, width))
        tokens += size * (height // f) * (width // f)
        turn += 1
        yield group


# -- the comparison --------------------------------------------------------------------------------
@dataclass
class ContractReport:
    """What one comparison saw; `by_batch` maps batch size -> [tokens, differing tokens]."""

    tokens: int = 0
    differing_tokens: int = 0
    image_values: int = 0
    differing_values: int = 0
    max_value_diff: float = 0.0
    crops: int = 0
    by_batch: dict[int, list[int]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)  # the first few, for the failure message

    def note(self, text: str) -> None:
        if len(self.mismatches) < 10:
            self.mismatches.append(text)


def compare_group(
    reference: Engine,
    batched: Engine,
    group: list[Crop],
    photos: dict[str, np.ndarray],
    report: ContractReport,
    *,
    decode: bool,
) -> None:
    """Encode each crop alone (`reference`) and the group as one batch (`batched`), compare every
    token; with `decode`, decode the reference tokens alone and as a batch, compare every value."""
    pixels = np.stack([crop.pixels(photos) for crop in group])
    alone, together = _side_by_side(
        lambda: np.concatenate([reference.encode(image[None]) for image in pixels]),
        lambda: batched.encode(pixels),
    )
    differ = alone != together
    counts = report.by_batch.setdefault(len(group), [0, 0])
    counts[0] += alone.size
    counts[1] += int(differ.sum())
    report.tokens += alone.size
    report.differing_tokens += int(differ.sum())
    report.crops += len(group)
    for index, row, col in np.argwhere(differ)[:3]:
        report.note(
            f"{group[index]} in a batch of {len(group)}: token ({row}, {col}) is "
            f"{alone[index, row, col]} alone, {together[index, row, col]} in the batch"
        )
    if decode:
        images_alone, images_together = _side_by_side(
            lambda: np.concatenate([reference.decode(tokens[None]) for tokens in alone]),
            lambda: batched.decode(alone),
        )
        gap = np.abs(images_alone - images_together)
        report.image_values += gap.size
        report.differing_values += int((gap > 0).sum())
        report.max_value_diff = max(report.max_value_diff, float(gap.max()))
        if gap.max() > 0:
            report.note(
                f"decoding a batch of {len(group)} {group[0].height}x{group[0].width} "
                f"grids: {int((gap > 0).sum())} values differ, max {gap.max():.3g}"
            )


def _side_by_side(
    first: Callable[[], np.ndarray], second: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    # The 1-thread reference alone would leave a core idle: run it in a worker thread while the
    # batched side runs here (onnxruntime releases the GIL; the two sessions share no state).
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(first)
        here = second()
        return pending.result(), here


def contract_engines(model_dir: Path) -> tuple[Engine, Engine]:
    """The reference (1 intra-op thread) and the batched side (2 threads) of the comparison."""
    reference = Engine(model_dir, providers="cpu", intra_op_threads=1, warmup=False)
    batched = Engine(model_dir, providers="cpu", intra_op_threads=2, warmup=False)
    return reference, batched


def run_contract(
    model_dir: Path,
    photos: dict[str, np.ndarray],
    min_tokens: int,
    *,
    decode_every: int,
    seed: int = 0,
    progress: Callable[[ContractReport], None] | None = None,
) -> ContractReport:
    """Compare batch 1 (1 thread) with batches of 3/8/16 (2 threads) on >= `min_tokens` tokens."""
    reference, batched = contract_engines(model_dir)
    report = ContractReport()
    groups = crop_groups(photos, reference.info.downsample, min_tokens, seed)
    for turn, group in enumerate(groups):
        decode = decode_every > 0 and turn % decode_every == 0
        compare_group(reference, batched, group, photos, report, decode=decode)
        if progress is not None:
            progress(report)
    return report


# -- the cost of one image per run -----------------------------------------------------------------
def per_image_cost(model_dir: Path, rounds: int, size: int = 256, batch: int = 8) -> dict:
    """Engine.encode (one image per onnxruntime run) against its own session given the whole
    batch, round-robin in one process: wall img/s (median, best) and CPU ms/img (median)."""
    engine = Engine(model_dir, providers="cpu", intra_op_threads=2)
    photos, _ = contract_photos(debian=False)
    name = next(n for n, rgb in sorted(photos.items()) if min(rgb.shape[:2]) >= size + 8 * batch)
    pixels = np.stack([Crop(name, 8 * i, 8 * i, size, size).pixels(photos) for i in range(batch)])
    cases = {  # the engine's own session, so both sides run the same graph and options
        "one image per run (Engine.encode)": lambda: engine.encode(pixels),
        "whole batch in one run": lambda: engine._encoder.run(None, {ENCODER_INPUT: pixels}),
    }
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for run in cases.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in cases.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "images_per_s_median": batch / statistics.median(wall[name]),
            "images_per_s_best": batch / min(wall[name]),
            "cpu_ms_per_image_median": 1000 * statistics.median(cpu[name]) / batch,
        }
        for name in cases
    } | {"size": size, "batch": batch, "rounds": rounds}


# -- script --------------------------------------------------------------------------------------
def _progress(target: int, start: float) -> Callable[[ContractReport], None]:
    def show(report: ContractReport) -> None:
        print(
            f"\r  {report.tokens:>9,} / {target:,} tokens ({100 * report.tokens / target:5.1f} %), "
            f"{report.differing_tokens} differing, {time.monotonic() - start:5.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    return show


def markdown(report: ContractReport, cost: dict) -> str:
    lines = [
        "| batch (vs alone) | tokens compared | differing tokens |",
        "|---:|---:|---:|",
    ]
    for size, (tokens, differing) in sorted(report.by_batch.items()):
        lines.append(f"| {size} | {tokens:,} | {differing} |")
    lines.append(f"| all | {report.tokens:,} | {report.differing_tokens} |")
    lines += [
        "",
        f"decoder: {report.image_values:,} image values compared, {report.differing_values} "
        f"differing (max |diff| {report.max_value_diff:.3g})",
        "",
        f"| encode {cost['size']}x{cost['size']}, batch {cost['batch']}, 2 threads | "
        "img/s median | img/s best | CPU ms/img median |",
        "|---|---:|---:|---:|",
    ]
    for name, row in cost.items():
        if isinstance(row, dict):
            lines.append(
                f"| {name} | {row['images_per_s_median']:.1f} | {row['images_per_s_best']:.1f} | "
                f"{row['cpu_ms_per_image_median']:.1f} |"
            )
    return "\n".join([*lines, *(f"mismatch: {m}" for m in report.mismatches)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens to compare")
    parser.add_argument("--decode-every", type=int, default=8, help="decode every n-th group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the cost table")
    parser.add_argument("--quick", action="store_true", help="20,000 tokens, 2 cost rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds = 20_000, 2

    load_start, start = os.getloadavg()[0], time.monotonic()
    photos, debian_note = contract_photos()
    print(f"{len(photos)} photos ({debian_note or 'pip + Debian'})", file=sys.stderr)
    report = run_contract(
        args.model_dir, photos, args.tokens, decode_every=args.decode_every, seed=args.seed,
        progress=_progress(args.tokens, start),
    )  # fmt: skip
    contract_s = time.monotonic() - start
    print(file=sys.stderr)
    cost = per_image_cost(args.model_dir, args.rounds)
    print(markdown(report, cost))
    record = {
        "benchmark": "token_contract",
        "model": json.loads((args.model_dir / "model.json").read_text())["id"],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "photos": len(photos),
        "debian_photos_missing": debian_note,
        "crops": report.crops,
        "tokens": report.tokens,
        "differing_tokens": report.differing_tokens,
        "by_batch": {str(k): v for k, v in sorted(report.by_batch.items())},
        "image_values": report.image_values,
        "differing_image_values": report.differing_values,
        "contract_s": round(contract_s, 1),
        "cost": cost,
        "loadavg_start_end": [load_start, os.getloadavg()[0]],
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    print(json.dumps(record))
    return 0 if report.differing_tokens == 0 and report.differing_values == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
