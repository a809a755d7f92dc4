"""The encoder-codebook gap of trained ablation rows: how far the encoder's features are from the
codes they are assigned, relative to the features' own spread.

    .venv/bin/python -m benchmarks.quant_gap runs/ablation-3000/results.json [--rows full,strong]

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
def relative_gap(checkpoint: str, images: list[Any]) -> tuple[float, float]:
    """(relative gap, mean per-image MSE of the decoder fed the unquantized features z)."""
    model, _ = load_model(checkpoint)
    model.eval()
    quantizer = model.quantizer
    codebook = quantizer.codebooks[0].effective()
    gap, rows_all, mse_z = 0.0, [], []
    for _, batch in same_shape_batches(images, [str(i) for i in range(len(images))], 1):
        h, w = batch.shape[-2:]
        z = model.encode_features(pad_to_multiple(batch, model.config.downsample))
        unquantized = model.decode_features(z)[..., :h, :w]
        mse_z.append(float(((unquantized - batch) ** 2).mean()))
        rows, _ = quantizer._to_rows(z)
        rows = rows.reshape(-1, rows.shape[-1])
        _, distances = nearest_codes(rows, codebook, quantizer.config.chunk_size)
        gap += float(distances.double().sum())
        rows_all.append(rows.double())
    stacked = torch.cat(rows_all)
    spread = float(((stacked - stacked.mean(0)) ** 2).sum())
    return gap / spread, statistics.fmean(mse_z)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="an ablation's results.json")
    parser.add_argument("--rows", help="comma-separated row ids (default: all)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        raise SystemExit(f"{args.results}: no such file (expected an ablation's results.json)")
    results = json.loads(args.results.read_text())
    wanted = set(args.rows.split(",")) if args.rows else None
    spec = results.get("eval") or {"data": "pip-photos", "limit": None}
    _, images = load_eval_set(spec["data"], spec.get("limit"))
    per_run: dict[str, dict[str, Any]] = {}
    for run_id, run in results["rows"].items():
        row = row_of(run_id, run)
        if wanted is not None and row not in wanted:
            continue
        gap, mse_z = relative_gap(run["checkpoint"], images)
        per_run[run_id] = {
            "row": row,
            "seed": seed_label(run),
            "gap": gap,
            "mse": run["mse"],
            "mse_unquantized": mse_z,
        }
        print(f"{run_id}: relative gap {gap:.4f}, MSE {run['mse']:.3e}", file=sys.stderr)
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
    print(json.dumps({"benchmark": "quant_gap", "results": str(args.results), "runs": per_run}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
