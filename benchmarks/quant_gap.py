"""The encoder-codebook gap of trained ablation rows: how far the encoder's features are from the
codes they are assigned, relative to the features' own spread.

    .venv/bin/python -m benchmarks.quant_gap runs/ablation-3000/results.json [--rows full,strong]
    .venv/bin/python -m benchmarks.quant_gap --checkpoint models/default [--checkpoint ...]
    .venv/bin/python -m benchmarks.quant_gap --checkpoint models/default --quick   # 2 images

For every finished run in the ablation's results.json (every seed), on the ablation's own eval set
at native size (padded to a multiple of f, as the evaluation does): the quantizer's rows z (its
input norm applied) and their nearest effective codes q (affine applied), then

    relative gap = sum ||z - q||^2 / sum ||z - mean(z)||^2

over all rows of all images: 0 = every feature sits on a code, 1 = no better than the mean
feature. This is the quantity the paper's affine re-parameterisation, synchronised commitment and
alternating optimisation aim to shrink; set next to each run's reconstruction MSE it shows
whether a smaller gap turned into better reconstructions; the MSE of the decoder fed the
unquantized features (no codebook at all, a model it was not trained for) is a rough floor of
what a better quantizer alone could reach. Prints a markdown table (mean over
seeds per row, and per run), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from training.ablation_report import row_of, seed_label, seed_order
from training.evaluate import load_eval_set, pad_to_multiple, same_shape_batches
from vqmodel import load_model
from vqmodel.search import nearest_codes


@torch.no_grad()
def relative_gap(checkpoint: str, images: list[Any]) -> tuple[float, float, float]:
    """(relative gap, mean per-image MSE of the decoder fed the unquantized features z, mean
    per-image MSE of the model's own reconstruction through its tokens)."""
    model, _ = load_model(checkpoint)
    model.eval()
    quantizer = model.quantizer
    codebook = quantizer.codebooks[0].effective()
    gap, rows_all, mse_z, mse_q = 0.0, [], [], []
    for _, batch in same_shape_batches(images, [str(i) for i in range(len(images))], 1):
        h, w = batch.shape[-2:]
        padded = pad_to_multiple(batch, model.config.downsample)
        z = model.encode_features(padded)
        unquantized = model.decode_features(z)[..., :h, :w]
        mse_z.append(float(((unquantized - batch) ** 2).mean()))
        reconstruction = model.decode(model.encode(padded))[..., :h, :w]
        mse_q.append(float(((reconstruction - batch) ** 2).mean()))
        rows, _ = quantizer._to_rows(z)
        rows = rows.reshape(-1, rows.shape[-1])
        _, distances = nearest_codes(rows, codebook, quantizer.config.chunk_size)
        gap += float(distances.double().sum())
        rows_all.append(rows.double())
    stacked = torch.cat(rows_all)
    spread = float(((stacked - stacked.mean(0)) ** 2).sum())
    return gap / spread, statistics.fmean(mse_z), statistics.fmean(mse_q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="?", help="an ablation's results.json")
    parser.add_argument("--rows", help="comma-separated row ids (default: all)")
    parser.add_argument(
        "--checkpoint", action="append", help="measure this checkpoint or model folder instead "
        "of an ablation's rows (repeatable; evaluated on the pip photos)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the first 2 evaluation images only")
    args = parser.parse_args(argv)
    results = _results(parser, args)
    wanted = set(args.rows.split(",")) if args.rows else None
    spec = results.get("eval") or {"data": "pip-photos", "limit": None}
    _, images = load_eval_set(spec["data"], 2 if args.quick else spec.get("limit"))
    per_run: dict[str, dict[str, Any]] = {}
    for run_id, run in results["rows"].items():
        row = row_of(run_id, run)
        if wanted is not None and row not in wanted:
            continue
        gap, mse_z, mse_q = relative_gap(run["checkpoint"], images)
        per_run[run_id] = {
            "row": row,
            "seed": seed_label(run),
            "gap": gap,
            # the ablation's own figure for its rows (its eval settings); measured here otherwise
            "mse": mse_q if run.get("mse") is None else run["mse"],
            "mse_unquantized": mse_z,
        }
        shown = per_run[run_id]["mse"]
        print(f"{run_id}: relative gap {gap:.4f}, MSE {shown:.3e}", file=sys.stderr)
    print(
        "| row | seeds | relative gap (mean) | per seed | MSE (mean) "
        "| MSE decoding z unquantized (mean) |"
    )
    print("|---|---|---|---|---|---|")
    order = list(dict.fromkeys(r["row"] for r in per_run.values()))
    for row in order:
        runs = sorted(
            (r for r in per_run.values() if r["row"] == row), key=lambda r: seed_order(r["seed"])
        )
        gaps = ", ".join(f"{r['gap']:.4f}" for r in runs)
        print(
            f"| {row} | {','.join(r['seed'] for r in runs)} "
            f"| {statistics.fmean(r['gap'] for r in runs):.4f} | {gaps} "
            f"| {statistics.fmean(r['mse'] for r in runs):.3e} "
            f"| {statistics.fmean(r['mse_unquantized'] for r in runs):.3e} |"
        )
    source = str(args.results) if args.results else args.checkpoint
    print(json.dumps({"benchmark": "quant_gap", "results": source, "runs": per_run}))
    return 0


def _results(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The ablation's results.json, or a results-shaped record of the --checkpoint paths."""
    if args.checkpoint:
        if args.results is not None:
            parser.error("give an ablation's results.json or --checkpoint, not both")
        return {"rows": {path: {"checkpoint": path, "mse": None} for path in args.checkpoint}}
    if args.results is None:
        parser.error("name an ablation's results.json or one or more --checkpoint paths")
    if not args.results.is_file():
        raise SystemExit(f"{args.results}: no such file (expected an ablation's results.json)")
    return json.loads(args.results.read_text())


if __name__ == "__main__":
    sys.exit(main())
