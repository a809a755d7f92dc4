"""Time per training step: the plain VQ-VAE baseline vs the paper's full pipeline (and any other
ablation row), exactly as configured in training/configs/ablation.yaml.

One step is ``training.loop.train_step`` on the loop's own ``build_parts``: encode, (alternating
mode: the codebook step (1) on sg(z)), quantize (k-means init, dead-code replacement and affine
inside), decode, reconstruction + alpha·VQ loss, backward, gradient clipping, AdamW step,
schedule. Batches are real patches (the pip-bundled photos, built in memory), cycled.

``--recipe CONFIG`` times one plain training config (e.g. the default recipe) instead of ablation
rows; ``--variants`` adds the same row with channels-last layout, torch.compile or bf16 autocast,
so a layout or compile choice is measured inside the real training step.

Timing: every row gets ``--warmup`` steps first (past k-means init), then rows are run round-robin
(A B A B ...) one step at a time in ONE process, so a shared machine's drift hits every row alike;
CPU uses ``--threads`` intra-op threads (default 1); CUDA steps are bracketed by synchronize().
Reported per row: median and min of wall time and of process CPU time (``time.process_time``: on
a machine shared with other jobs, preemption inflates wall time but not CPU time), their ratios
to the first row, then one JSON line. The target is checked on the median CPU time on CPU, the
median wall time on CUDA.

    .venv/bin/python -m benchmarks.train_step                 # baseline vs full, 40 rounds
    .venv/bin/python -m benchmarks.train_step --rows baseline,strong,full --rounds 60
    .venv/bin/python -m benchmarks.train_step --recipe training/configs/default.yaml \
        --variants plain,channels_last --threads 1               # the default recipe's layout
    .venv/bin/python -m benchmarks.train_step --quick         # smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# `python -m benchmarks.train_step` without an editable install
from training.ablation import DEFAULT_CONFIG, hardware, load_ablation, row_config
from training.config import TrainConfig, load_config
from training.data import build_patch_bank
from training.loop import build_parts, train_step

TARGET = 1.25  # issue 3: full pipeline step <= 1.25x the baseline step


def make_step(cfg: TrainConfig, device: torch.device) -> Callable[[torch.Tensor], None]:
    """One optimisation step of ``cfg`` on a batch: ``training.loop.train_step`` itself, on the
    loop's own ``build_parts`` (model, optimisers, schedules, autocast, layout)."""
    parts = build_parts(cfg, device)
    steps = itertools.count(1)
    return lambda x: train_step(parts, x.to(memory_format=parts.memory_format), cfg, next(steps))


VARIANTS = {
    "plain": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "bf16": {"amp": "bf16"},
}


def base_configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    if args.recipe:
        return {Path(args.recipe).stem: load_config(args.recipe, ["out_dir=/nonexistent"])}
    spec = load_ablation(args.config)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    return {r: row_config(spec, r, Path("/nonexistent")) for r in rows}


def with_variants(configs: dict[str, TrainConfig], variants: list[str]) -> dict[str, TrainConfig]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return {
        (row if variant == "plain" else f"{row}+{variant}"): cfg.model_copy(
            update=VARIANTS[variant]
        )
        for row, cfg in configs.items()
        for variant in variants
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--rows", default="baseline,full", help="first row is the reference")
    parser.add_argument("--rounds", type=int, default=40, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per row first")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches to cycle")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipe", help="a plain training config to time instead of --rows")
    parser.add_argument(
        "--variants",
        default="plain",
        help=f"comma list of {', '.join(VARIANTS)}: each row as configured (plain) or changed",
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, 2 warm-up steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    configs = with_variants(base_configs(args), args.variants.split(","))
    rows = list(configs)
    first = configs[rows[0]]
    patches = build_patch_bank(
        "pip-photos",
        patch_size=first.data.patch_size,
        count=args.batches * first.data.batch_size,
        seed=0,
        short_side=(first.data.patch_size * 4, first.data.patch_size * 16),
        cache_dir=None,
        progress=False,
    )
    batches = torch.from_numpy(patches.copy()).permute(0, 3, 1, 2).float().div(255)
    batches = list(batches.to(device).split(first.data.batch_size))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps = {r: make_step(cfg, device) for r, cfg in configs.items()}
    for r in rows:
        for i in range(args.warmup):
            steps[r](batches[i % len(batches)])
    wall: dict[str, list[float]] = {r: [] for r in rows}
    cpu: dict[str, list[float]] = {r: [] for r in rows}
    for i in range(args.rounds):
        x = batches[i % len(batches)]
        for r in rows:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[r](x)
            sync()
            wall[r].append(time.perf_counter() - start)
            cpu[r].append(time.process_time() - start_cpu)

    ref = rows[0]
    stats: dict[str, dict[str, float]] = {}
    for r in rows:
        stats[r] = {
            "median_ms": 1e3 * statistics.median(wall[r]),
            "min_ms": 1e3 * min(wall[r]),
            "cpu_median_ms": 1e3 * statistics.median(cpu[r]),
            "cpu_min_ms": 1e3 * min(cpu[r]),
            "images_per_s": configs[r].data.batch_size / statistics.median(wall[r]),
        }
    for r in rows:
        for key in ("median_ms", "min_ms", "cpu_median_ms", "cpu_min_ms"):
            stats[r][f"ratio_{key.removesuffix('_ms')}"] = stats[r][key] / stats[ref][key]
    c = first
    workload = (
        f"batch {c.data.batch_size}×3×{c.data.patch_size}², f={c.model.downsample}, "
        f"K={c.model.quantizer.num_codes}, D={c.model.code_dim}, widths {c.model.widths}"
    )
    print(f"train step, {workload}; {hardware()}, device {device}; {args.rounds} rounds")
    print()
    print(
        f"| row | mode | wall median ms | wall min ms | CPU median ms | CPU min ms "
        f"| wall median / {ref} | CPU median / {ref} | CPU min / {ref} | images/s (wall median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = stats[r]
        print(
            f"| {r} | {configs[r].mode} | {s['median_ms']:.1f} | {s['min_ms']:.1f} | "
            f"{s['cpu_median_ms']:.1f} | {s['cpu_min_ms']:.1f} | {s['ratio_median']:.2f}× | "
            f"{s['ratio_cpu_median']:.2f}× | {s['ratio_cpu_min']:.2f}× | {s['images_per_s']:.1f} |"
        )
    record = {
        "benchmark": "train_step",
        "workload": workload,
        "device": str(device),
        "hardware": hardware(),
        "rounds": args.rounds,
        "rows": stats,
    }
    if "full" in stats and ref == "baseline":
        key = "ratio_median" if device.type == "cuda" else "ratio_cpu_median"
        ratio = stats["full"][key]
        record.update({"full_vs_baseline": ratio, "target": TARGET, "met": ratio <= TARGET})
        what = "wall" if device.type == "cuda" else "CPU"
        print(f"\nfull / baseline ({what} time, median): {ratio:.2f}× (target ≤ {TARGET}×)")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
