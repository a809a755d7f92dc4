"""The paper's ablation on our data: same model, data, steps and seed; one quantizer technique
switched on per row; every trained model evaluated at native size with :func:`evaluate`.

    vqtok-ablation --config training/configs/ablation.yaml [--steps N] [--out DIR] [--rows a,b]
                   [--seeds 0,1,2] [--set model.code_dim=64 ...]

The config file holds ``base`` (a full TrainConfig mapping: the baseline row), ``rows`` (row id ->
``label`` and dotted-key ``overrides`` applied to ``base``, as on the vqtok-train command line;
the first row is the baseline the report's ratios refer to), ``eval`` (``data`` spec and optional
``limit``) and ``pairs`` ([method row, reference row] comparisons). Row ``r`` trains in
``<out>/<r>/``.

Outputs in ``--out``: ``results.json`` (per-row config, metrics and timing) and ``table.md``
(written by training/ablation_report.py).
Resumable: a row whose resolved config is already in results.json is skipped; an interrupted row
continues from its last checkpoint (same config) or restarts (config changed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from service.cli_parser import CliParser
from service.files import write_bytes_atomic
from training.ablation_report import DEFAULT_PAIRS, results_table
from training.cli_errors import user_error
from training.config import ConfigError, TrainConfig, apply_override, validate_config
from training.evaluate import evaluate, load_eval_set
from training.loop import train
from training.plots import read_metrics_log
from vqmodel import load_model

DEFAULT_CONFIG = "training/configs/ablation.yaml"
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"


# -- the config file -------------------------------------------------------------------------------
def load_ablation(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the ablation file's shape (the TrainConfigs are validated per row)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read ablation config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with base, rows, eval")
    unknown = sorted(set(spec) - {"base", "rows", "eval", "pairs"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s) {unknown}; allowed: base, rows, eval, pairs"
        )
    if not isinstance(spec.get("base"), dict):
        raise ConfigError(f"{path}: base must be a TrainConfig mapping")
    rows = spec.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise ConfigError(f"{path}: rows must map row ids to {{label, overrides}}")
    for row_id, row in rows.items():
        if not isinstance(row, dict) or set(row) - {"label", "overrides"}:
            raise ConfigError(f"rows.{row_id}: expected keys label and overrides, got {row!r}")
        if not isinstance(row.get("overrides") or {}, dict):
            raise ConfigError(f"rows.{row_id}.overrides must map dotted keys to values")
    eval_spec = spec.get("eval") or {}
    if not isinstance(eval_spec, dict) or set(eval_spec) - {"data", "limit"}:
        raise ConfigError(f"eval: expected keys data and limit, got {eval_spec!r}")
    if spec.get("pairs") is None:
        spec["pairs"] = [list(p) for p in DEFAULT_PAIRS if all(r in rows for r in p)]
    pairs = spec["pairs"]
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(r in rows for r in p) for p in pairs
    ):
        raise ConfigError(
            f"pairs: expected a list of [method row, reference row] with ids from rows "
            f"{list(rows)}, got {pairs!r}"
        )
    return spec


def row_config(
    spec: dict[str, Any],
    row_id: str,
    out_dir: Path,
    steps: int | None = None,
    seed: int | None = None,
) -> TrainConfig:
    """``base`` + the row's overrides (+ ``steps``), validated, training in ``<out_dir>/<row>``.

    With ``seed`` both the model seed and the data seed (patch bank and batch order) are set to
    it: an independent repetition, trained in ``<out_dir>/<row>-seed<seed>``, unless those seeds
    are the row's own, in which case it is the plain row (same config, same directory).
    """
    plain = _resolve(spec, row_id, steps, {"out_dir": str(out_dir / row_id)})
    if seed is None or (plain.seed, plain.data.seed) == (seed, seed):
        return plain
    extra = {"seed": seed, "data.seed": seed, "out_dir": str(out_dir / f"{row_id}-seed{seed}")}
    return _resolve(spec, row_id, steps, extra)


def _resolve(
    spec: dict[str, Any], row_id: str, steps: int | None, extra: dict[str, Any]
) -> TrainConfig:
    data = copy.deepcopy(spec["base"])
    overrides = dict(spec["rows"][row_id].get("overrides") or {})
    if steps is not None:
        overrides["steps"] = steps
    overrides.update(extra)
    for key, value in overrides.items():
        apply_override(data, f"{key}={json.dumps(value)}")
    return validate_config(data, f"ablation row {row_id!r}")


def fingerprint(config: TrainConfig, eval_spec: dict[str, Any]) -> str:
    """Identifies a row's result: equal fingerprints mean the same training and evaluation."""
    payload = {"train": config.model_dump(mode="json"), "eval": eval_spec}
    payload["train"].pop("out_dir")
    payload["train"].pop("device")  # same numbers up to floating-point order
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# -- running ---------------------------------------------------------------------------------------
class RowInterrupted(RuntimeError):
    """A row's training stopped early (signal or time limit); its checkpoint lets a re-run go on."""

    def __init__(self, message: str, signum: int | None) -> None:
        super().__init__(message)
        self.signum = signum


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        cpu += f", GPU {torch.cuda.get_device_name(0)}"
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads"


def _median_window_seconds(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    values = [
        r["sec_per_step"]
        for r in read_metrics_log(path)
        if r.get("split", "train") == "train" and isinstance(r.get("sec_per_step"), int | float)
    ]
    return statistics.median(values) if values else None


def run_row(
    config: TrainConfig,
    eval_images: tuple[list[str], list[Any]],
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one row (an interrupted run of the same config continues); evaluate its final model."""
    run_dir = Path(config.out_dir)
    saved = run_dir / "config.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != config.model_dump(mode="json"):
        print(f"{run_dir}: config changed since the interrupted run; starting the row afresh")
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    summary = train(config, resume=True, progress=progress)
    train_seconds = time.perf_counter() - started
    if summary["stopped"] != "completed" or summary["step"] < config.steps:
        raise RowInterrupted(
            f"{run_dir}: training stopped at step {summary['step']} of {config.steps} "
            f"({summary['stopped']}); re-run the same command to continue",
            summary.get("signal"),
        )
    model, _ = load_model(summary["last_checkpoint"])
    names, images = eval_images
    result = evaluate(model, images, names=names, progress=progress)
    result.pop("code_counts")
    return {
        "mse": result["mse"],
        "psnr": result["psnr"],
        "ssim": result["ssim"],
        "usage": result["usage"],
        "perplexity": result["perplexity"],
        "dead_codes": result["dead_codes"],
        "num_codes": result["num_codes"],
        # None when the run had already finished before this call (crash during evaluation)
        "sec_per_step": summary["sec_per_step"] or _median_window_seconds(run_dir),
        "sec_per_step_median": _median_window_seconds(run_dir),
        "train_seconds": train_seconds,
        "steps": summary["step"],
        "final_train_metrics": summary["metrics"],
        "checkpoint": summary["last_checkpoint"],
        "per_image_psnr": {r["name"]: r["psnr"] for r in result["per_image"]},
    }


def _read_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"rows": {}}
    try:
        results = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(
            f"{path} is not valid JSON ({err}); move it away to run the ablation afresh"
        ) from None
    results.setdefault("rows", {})
    return results


def _save(out: Path, results: dict[str, Any]) -> None:
    """results.json, then table.md from it."""
    path = out / RESULTS_FILE
    # atomic: a killed run never leaves a half-written results file
    write_bytes_atomic(path, (json.dumps(results, indent=2) + "\n").encode())
    (out / TABLE_FILE).write_text(results_table(results))


def run_ablation(
    config_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    steps: int | None = None,
    rows: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    base_overrides: Sequence[str] = (),
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or finish) the ablation; returns the results dict also written to results.json.

    ``seeds`` repeats every selected row once per seed (see :func:`row_config`); results are
    keyed by run directory name: ``<row>`` for the row's own seed, ``<row>-seed<N>`` otherwise.
    ``base_overrides`` (``dotted.key=value``) change ``base``, i.e. every row, before its own
    overrides.
    """
    spec = load_ablation(config_path)
    for override in base_overrides:
        apply_override(spec["base"], override)
    out = Path(out_dir)
    eval_spec = {"data": "pip-photos", "limit": None, **(spec.get("eval") or {})}
    runs = plan_runs(spec, out, rows, steps, seeds)
    out.mkdir(parents=True, exist_ok=True)
    results = _read_results(out / RESULTS_FILE)
    results.update(
        {
            "config_file": str(config_path),
            "command": command,
            "hardware": hardware(),
            "eval": eval_spec,
            "order": list(spec["rows"]),
            "pairs": spec["pairs"],
        }
    )
    eval_images: tuple[list[str], list[Any]] | None = None
    for run_id, (row_id, config) in runs.items():
        key = fingerprint(config, eval_spec)
        done = results["rows"].get(run_id)
        if done is not None and done.get("fingerprint") == key:
            print(f"[{run_id}] done already (fingerprint {key}); skipping")
            continue
        if eval_images is None:
            eval_images = load_eval_set(eval_spec["data"], eval_spec["limit"], key="eval.data")
        print(f"[{run_id}] training {config.steps} steps in {config.out_dir}", flush=True)
        row = run_row(config, eval_images, progress=progress)
        row.update(_row_record(spec, row_id, config, key))
        results["rows"][run_id] = row
        _save(out, results)
        print(
            f"[{run_id}] MSE {row['mse']:.3e}  PSNR {row['psnr']:.2f}  usage {row['usage']:.1%}  "
            f"perplexity {row['perplexity']:.1f}  {row['sec_per_step']:.3f} s/step",
            flush=True,
        )
    _save(out, results)
    return results


def plan_runs(
    spec: dict[str, Any],
    out: Path,
    rows: Sequence[str] | None,
    steps: int | None,
    seeds: Sequence[int] | None,
) -> dict[str, tuple[str, TrainConfig]]:
    """{run id: (row id, config)} for the selected rows x seeds, every config validated before
    any row trains (a typo in the last row fails now, not in an hour)."""
    all_rows = list(spec["rows"])
    selected = list(rows) if rows else all_rows
    unknown = [r for r in selected if r not in spec["rows"]]
    if unknown:
        raise ConfigError(f"--rows: unknown row(s) {unknown}; the config has {all_rows}")
    runs: dict[str, tuple[str, TrainConfig]] = {}
    for row_id in selected:
        for seed in seeds or [None]:
            config = row_config(spec, row_id, out, steps, seed)
            runs[Path(config.out_dir).name] = (row_id, config)
    return runs


def _row_record(
    spec: dict[str, Any], row_id: str, config: TrainConfig, fingerprint: str
) -> dict[str, Any]:
    """What results.json keeps about a run besides its metrics."""
    row = spec["rows"][row_id]
    return {
        "row": row_id,
        "seed": config.seed,
        "label": row.get("label") or row_id,
        "overrides": row.get("overrides") or {},
        "fingerprint": fingerprint,
        "config": config.model_dump(mode="json"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- CLI -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="vqtok-ablation",
        description="Train every ablation row (same model, data, steps, seed), evaluate each at "
        "native size, write results.json and table.md. Finished rows are skipped on re-run.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    parser.add_argument("--steps", type=int, help="override base steps for every row")
    parser.add_argument("--out", default="runs/ablation", help="default runs/ablation")
    parser.add_argument("--rows", help="comma-separated row ids (default: all, in file order)")
    parser.add_argument(
        "--seeds",
        help="comma-separated seeds: every row once per seed (model and data seed), reported as "
        "mean ± sd; the row's own seed reuses its plain run",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the base config (every row) as on the vqtok-train command line, e.g. "
        "--set model.code_dim=64 (repeatable; a row's own overrides still apply on top)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0; 2 with one line on stderr for a user error (bad flag, config or data
    source); 128 + signal when a signal interrupted a row (re-run to continue); 1 when a row
    stopped early otherwise or its training diverged."""
    args = build_parser().parse_args(argv)
    command = shlex.join(["vqtok-ablation", *(sys.argv[1:] if argv is None else argv)])
    try:
        rows, seeds = _check_flags(args)
        results = run_ablation(
            args.config,
            args.out,
            steps=args.steps,
            rows=rows,
            seeds=seeds,
            base_overrides=args.overrides,
            progress=not args.no_progress,
            command=command,
        )
    except ConfigError as err:
        return user_error("vqtok-ablation", err)
    except RowInterrupted as err:
        print(err, file=sys.stderr)
        return 128 + err.signum if err.signum else 1
    except FloatingPointError as err:  # a row diverged: its message says what to change
        print(f"vqtok-ablation: {err}", file=sys.stderr)
        return 1
    print(results_table(results))
    print(f"results: {Path(args.out) / RESULTS_FILE}")
    return 0


def _check_flags(args: argparse.Namespace) -> tuple[list[str] | None, list[int] | None]:
    """(rows, seeds) from the command line (and --threads applied); ConfigError when invalid."""
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    if not args.seeds:
        return rows, None
    try:
        seeds = list(dict.fromkeys(int(v) for v in args.seeds.split(",") if v.strip()))
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds must be comma-separated integers >= 0, got {args.seeds!r}")
    return rows, seeds


if __name__ == "__main__":
    sys.exit(main())
