"""Evaluation plots (matplotlib, Agg backend: no display needed).

- ``reconstruction_grid``: one row per image, original | reconstruction | error.
- ``usage_histogram``: whole-set token counts per code, and the same counts sorted.
- ``training_curves``: the loop's ``metrics.jsonl`` (one JSON object per line with "step",
  "split" and scalar metrics), one panel per metric, one line per split.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed
import matplotlib.pyplot as plt
import numpy as np

from service.images import psnr_from_mse

# fixed so that error maps of different models compare by eye; errors above it saturate
ERROR_VMAX = 0.25
CURVE_KEYS = (
    "loss",
    "recon",
    "vq",
    "psnr",
    "usage",
    "perplexity",
    "dead_codes",
    "lr",
    "sec_per_step",
)


def reconstruction_grid(
    samples: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path
) -> Path:
    """Rows of (name, original [3,H,W], reconstruction [3,H,W]) in [0,1] -> PNG at ``path``.

    The error panel is the per-pixel mean absolute error over channels, colour scale 0–0.25.
    """
    path = Path(path)
    rows = len(samples)
    if rows == 0:
        raise ValueError("reconstruction_grid needs at least one sample")
    # row height from the images' mean aspect ratio, so panels are not lost in white space
    aspect = float(np.mean([o.shape[1] / o.shape[2] for _, o, _ in samples]))
    fig, axes = plt.subplots(
        rows, 3, figsize=(12, 4 * aspect * rows + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    for row, (name, original, reconstruction) in enumerate(samples):
        error = np.abs(original - reconstruction).mean(axis=0)
        psnr = psnr_from_mse(float(((original - reconstruction) ** 2).mean()))
        panels = (
            (
                original.transpose(1, 2, 0),
                f"{name} original {original.shape[1]}×{original.shape[2]}",
            ),
            (reconstruction.transpose(1, 2, 0), f"reconstruction, PSNR {psnr:.2f} dB"),
        )
        for col, (pixels, title) in enumerate(panels):
            axes[row, col].imshow(np.clip(pixels, 0, 1))
            axes[row, col].set_title(title, fontsize=9)
        image = axes[row, 2].imshow(error, cmap="magma", vmin=0.0, vmax=ERROR_VMAX)
        axes[row, 2].set_title("|error|, mean over RGB", fontsize=9)
        for ax in axes[row]:
            ax.axis("off")
    fig.colorbar(image, ax=axes[:, 2].tolist(), shrink=0.8, fraction=0.05)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def usage_histogram(counts: Sequence[int] | np.ndarray, path: str | Path) -> Path:
    """Whole-set token count per code index, and the counts sorted high to low (log scale)."""
    path = Path(path)
    counts = np.asarray(counts, dtype=np.int64)
    used = int((counts > 0).sum())
    fig, (by_index, ranked) = plt.subplots(1, 2, figsize=(12, 3.5))
    by_index.bar(np.arange(len(counts)), counts, width=1.0, color="tab:blue")
    by_index.set_xlabel("code index")
    by_index.set_ylabel("tokens")
    by_index.set_title(f"{used}/{len(counts)} codes used ({used / len(counts):.1%})")
    order = np.sort(counts)[::-1]
    ranked.plot(np.arange(1, len(order) + 1), np.maximum(order, 0.5), drawstyle="steps-mid")
    ranked.set_yscale("log")
    ranked.set_xlabel("rank")
    ranked.set_ylabel("tokens (log; unused codes at 0.5)")
    ranked.set_title("counts sorted")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def read_metrics_log(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl; a truncated last line (run killed mid-write) is
    skipped, as is any other line that is not a JSON object."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def training_curves(metrics_log: str | Path, path: str | Path) -> Path | None:
    """One panel per metric of ``metrics_log`` against step, one line per split; None (nothing
    written) when the log has no plottable records."""
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(dict)
    for record in read_metrics_log(metrics_log):
        step = record.get("step")
        if not isinstance(step, int | float):
            continue
        split = str(record.get("split", "train"))
        for key in CURVE_KEYS:
            value = record.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                steps, values = series[key].setdefault(split, ([], []))
                steps.append(step)
                values.append(value)
    keys = [key for key in CURVE_KEYS if key in series]
    if not keys:
        return None
    cols = 3
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for split, (steps, values) in sorted(series[key].items()):
            ax.plot(steps, values, label=split, marker="." if len(steps) < 30 else None)
        if key in ("loss", "recon", "vq", "lr") and all(
            v > 0 for _, values in series[key].values() for v in values
        ):
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
