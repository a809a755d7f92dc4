"""The evaluation report: report.json, report.md and the plots for an :func:`evaluate` result.

    result = evaluate(model, images, keep_samples=4)          # training/evaluate.py: the numbers
    written = write_report(result, "runs/default/eval")        # {"json": ..., "markdown": ...}

The numbers and their conventions are training/evaluate.py's; this module only presents them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with inf/nan floats as None: JSON has neither (an exact image's PSNR is inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def format_metric(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; "–" for a missing value, "inf" for an infinite one."""
    if value is None:
        return "–"
    return "inf" if isinstance(value, float) and math.isinf(value) else format(value, spec)


def report_markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    """The human-readable report.md for ``report`` (the dict written to report.json)."""
    r, fmt = report, format_metric
    lines = [
        f"# Evaluation of {r.get('model', {}).get('path', 'model')}",
        "",
        f"Data: `{r.get('data', '?')}`, {r['images']} images at native size "
        f"({r['pixels']:,} pixels, {r['tokens']:,} tokens), {r['seconds']:.1f} s "
        f"on {r.get('device', '?')}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| PSNR (dB, mean of per-image) | {fmt(r['psnr'], '.2f')} |",
        f"| SSIM (mean) | {fmt(r['ssim'], '.4f')} |",
        f"| MSE (mean of per-image) | {fmt(r['mse'], '.3e')} |",
        f"| codebook usage (whole set) | {r['usage']:.1%} of {r['num_codes']} |",
        f"| perplexity (whole set) | {r['perplexity']:.1f} |",
        f"| dead codes (whole set) | {r['dead_codes']} |",
        f"| bits/pixel, fixed-length log2(K)/f² | {r['bpp_fixed']:.4f} |",
        f"| bits/pixel, empirical entropy H/f² | {r['bpp_entropy']:.4f} |",
        "",
        "Conventions: " + "; ".join(f"{k}: {v}" for k, v in r["conventions"].items()) + ".",
        "",
        "| image | size (H×W) | PSNR | SSIM | codes used |",
        "|---|---|---|---|---|",
    ]
    for row in r["per_image"]:
        lines.append(
            f"| {row['name']} | {row['height']}×{row['width']} | {fmt(row['psnr'], '.2f')} | "
            f"{fmt(row['ssim'], '.4f')} | {row['codes_used']} |"
        )
    lines += _rate_distortion(r)
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({file})" for title, file in plots.items()]
    return "\n".join(lines) + "\n"


def _rate_distortion(report: dict[str, Any]) -> list[str]:
    rows = report.get("rate_distortion")
    if not rows:
        return []
    lines = [
        "",
        "## What the tokens cost",
        "",
        f"The tokens: {format_metric(report['psnr'], '.2f')} dB at "
        f"{report['bpp_fixed']:.4f} bpp (fixed-length) / {report['bpp_entropy']:.4f} bpp "
        "(entropy). Image codecs on the same images at the same rate (each image at the "
        "highest quality that fits; `reached: no` = even the lowest quality is larger):",
        "",
        "| rate | codec | bpp spent | PSNR (dB) | reached |",
        "|---|---|---:|---:|---|",
    ]
    lines += [
        f"| {row['target']} ({row['target_bpp']:.4f}) | {row['codec']} | {row['bpp']:.4f} | "
        f"{format_metric(row['psnr'], '.2f')} | {'yes' if row['reached'] else 'no'} |"
        for row in rows
    ]
    return lines


def write_report(
    result: dict[str, Any],
    out_dir: str | Path,
    *,
    metrics_log: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and the plots for an :func:`evaluate` result into ``out_dir``.

    Returns the written paths by kind. Training curves are drawn only when ``metrics_log`` exists.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, plot_files = write_plots(result, out, metrics_log)
    report = {k: v for k, v in result.items() if k != "samples"}
    report.update(extra or {})
    if metrics_log is not None:
        report["metrics_log"] = str(metrics_log)
    written["json"] = out / "report.json"
    written["json"].write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    written["markdown"] = out / "report.md"
    written["markdown"].write_text(report_markdown(report, plot_files))
    return written


def write_plots(
    result: dict[str, Any], out: Path, metrics_log: Path | None
) -> tuple[dict[str, Path], dict[str, str]]:
    """(written paths by kind, {title: file name} for report.md)."""
    from training import plots as plotting  # matplotlib: only when a report is written

    written: dict[str, Path] = {}
    plot_files: dict[str, str] = {}
    samples = result.get("samples") or []
    if samples:
        written["grid"] = plotting.reconstruction_grid(samples, out / "reconstructions.png")
        plot_files["original | reconstruction | error"] = "reconstructions.png"
    written["usage"] = plotting.usage_histogram(result["code_counts"], out / "code_usage.png")
    plot_files["code usage"] = "code_usage.png"
    if metrics_log is not None and metrics_log.is_file():
        curves = plotting.training_curves(metrics_log, out / "training_curves.png")
        if curves is not None:
            written["curves"] = curves
            plot_files["training curves"] = "training_curves.png"
    return written, plot_files
