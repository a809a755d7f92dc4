"""The paper's ablation on our data: same model, data, steps and seed; one quantizer technique
switched on per row; every trained model evaluated at native size with :func:`evaluate`.

    vqtok-ablation --config training/configs/ablation.yaml [--steps N] [--out DIR] [--rows a,b]
                   [--seeds 0,1,2] [--set model.code_dim=64 ...]

The config file holds ``base`` (a full TrainConfig mapping: the baseline row), ``rows`` (row id ->
``label`` and dotted-key ``overrides`` applied to ``base``, as on the vqtok-train command line),
and ``eval`` (``data`` spec and optional ``limit``). Row ``r`` trains in ``<out>/<r>/``.

Outputs in ``--out``: ``results.json`` (per-row config, metrics and timing) and ``table.md``.
Resumable: a row whose resolved config is already in results.json is skipped; an interrupted row
continues from its last checkpoint (same config) or restarts (config changed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
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

from training.config import ConfigError, TrainConfig, apply_override, validate_config
from training.evaluate import evaluate, load_eval_set
from training.loop import train
from training.plots import read_metrics_log
from vqmodel import load_model

DEFAULT_CONFIG = "training/configs/ablation.yaml"
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
# [method, reference]: the method must beat the reference on MSE and usage (the targets)
DEFAULT_PAIRS = (("full", "strong"),)


# -- the config file -------------------------------------------------------------------------------
def load_ablation(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the ablation file's shape (the TrainConfigs are validated per row)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read ablation config {path}: {err.strerror}") from err
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
    results = json.loads(path.read_text())
    results.setdefault("rows", {})
    return results


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temp, path)  # a killed run never leaves a half-written results file


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
    all_rows = list(spec["rows"])
    selected = list(rows) if rows else all_rows
    unknown = [r for r in selected if r not in spec["rows"]]
    if unknown:
        raise ConfigError(f"--rows: unknown row(s) {unknown}; the config has {all_rows}")
    eval_spec = {"data": "pip-photos", "limit": None, **(spec.get("eval") or {})}
    # validate every row before training any: a typo in the last row fails now, not in an hour
    runs: dict[str, tuple[str, TrainConfig]] = {}
    for row_id in selected:
        for seed in seeds or [None]:
            config = row_config(spec, row_id, out, steps, seed)
            runs[Path(config.out_dir).name] = (row_id, config)

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    results = _read_results(results_path)
    results.update(
        {
            "config_file": str(config_path),
            "command": command,
            "hardware": hardware(),
            "eval": eval_spec,
            "order": all_rows,
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
            eval_images = load_eval_set(eval_spec["data"], eval_spec["limit"])
        print(f"[{run_id}] training {config.steps} steps in {config.out_dir}", flush=True)
        row = run_row(config, eval_images, progress=progress)
        row.update(
            {
                "row": row_id,
                "seed": config.seed,
                "label": spec["rows"][row_id].get("label") or row_id,
                "overrides": spec["rows"][row_id].get("overrides") or {},
                "fingerprint": key,
                "config": config.model_dump(mode="json"),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        results["rows"][run_id] = row
        _write_json(results_path, results)
        (out / TABLE_FILE).write_text(results_table(results))
        print(
            f"[{run_id}] MSE {row['mse']:.3e}  PSNR {row['psnr']:.2f}  usage {row['usage']:.1%}  "
            f"perplexity {row['perplexity']:.1f}  {row['sec_per_step']:.3f} s/step",
            flush=True,
        )
    _write_json(results_path, results)
    (out / TABLE_FILE).write_text(results_table(results))
    return results


# -- the table -------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def target_checks(
    metrics: dict[str, dict[str, Any]], pairs: Sequence[Sequence[str]] = DEFAULT_PAIRS
) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue's targets, where the rows they need exist, given each
    row's metrics (``mse``, ``usage``, ``perplexity``): full vs baseline, then each [method,
    reference] pair."""
    checks = []
    base, full = metrics.get("baseline"), metrics.get("full")
    if base and full:
        ppl = _ratio(full["perplexity"], base["perplexity"])
        mse = _ratio(full["mse"], base["mse"])
        if ppl is not None:
            checks.append(("full / baseline perplexity ≥ 20×", f"{ppl:.1f}×", ppl >= 20))
        if mse is not None:
            checks.append(("full / baseline MSE ≤ 0.6×", f"{mse:.2f}×", mse <= 0.6))
    for method, reference in pairs:
        a, b = metrics.get(method), metrics.get(reference)
        if not (a and b):
            continue
        mse = _ratio(a["mse"], b["mse"])
        if mse is not None:
            checks.append((f"{method} MSE < {reference} MSE", f"{mse:.3f}×", mse < 1))
        if a["usage"] is not None and b["usage"] is not None:
            checks.append(
                (
                    f"{method} usage > {reference} usage",
                    f"{a['usage']:.1%} vs {b['usage']:.1%}",
                    a["usage"] > b["usage"],
                )
            )
        if a["perplexity"] is not None and b["perplexity"] is not None:
            checks.append(
                (
                    f"{method} perplexity > {reference} perplexity",
                    f"{a['perplexity']:.1f} vs {b['perplexity']:.1f}",
                    a["perplexity"] > b["perplexity"],
                )
            )
    return checks


def _metrics(row: dict[str, Any], window: bool) -> dict[str, Any]:
    if not window:
        return row
    last = row.get("final_train_metrics") or {}
    return {
        "mse": last.get("recon"),
        "psnr": last.get("psnr"),
        "usage": last.get("usage"),
        "perplexity": last.get("perplexity"),
        "dead_codes": last.get("dead_codes"),
    }


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def row_of(run_id: str, run: dict[str, Any]) -> str:
    return run.get("row", run_id)  # results written before --seeds: the key is the row id


def seed_label(run: dict[str, Any]) -> str:
    """The run's seeds as shown and paired: "N" when model and data seed are both N, else "N/M"."""
    config = run.get("config") or {}
    seed, data_seed = config.get("seed", 0), (config.get("data") or {}).get("seed", 0)
    return str(seed) if seed == data_seed else f"{seed}/{data_seed}"


def seed_order(label: str) -> list[int]:
    """Sort key of :func:`seed_label`'s labels: numerically, model seed first."""
    return [int(n) for n in label.split("/")]


def _ordered(results: dict[str, Any], ids: Sequence[str]) -> list[str]:
    order = results.get("order", [])
    return [r for r in order if r in ids] + [r for r in ids if r not in order]


def results_table(results: dict[str, Any]) -> str:
    """Markdown: the native-size evaluation and the last training window, one line per finished
    row (config order, the row's own seed) with ratios to the baseline, then the targets on each;
    where a row ran with several seeds, the same over the seeds' means and the paired wins."""
    runs = results["rows"]
    rows = {k: run for k, run in runs.items() if row_of(k, run) == k}
    order = _ordered(results, list(rows))
    out: list[str] = []
    for window in (False, True):
        metrics = {r: _metrics(rows[r], window) for r in order}
        base = metrics.get("baseline")
        if window:
            out += [
                "",
                "Last training log window (batches of patches from the training source, "
                "first epoch: not seen before; usage over the whole window):",
                "",
                "| row | recon MSE | PSNR (dB) | usage | perplexity | dead codes "
                "| MSE / baseline | perplexity / baseline |",
                "|---|---|---|---|---|---|---|---|",
            ]
        else:
            out += [
                f"Native-size evaluation on `{results.get('eval', {}).get('data', '?')}`:",
                "",
                "| row | MSE | PSNR (dB) | SSIM | usage | perplexity | dead codes | s/step "
                "| MSE / baseline | perplexity / baseline |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        for row_id in order:
            r, m = rows[row_id], metrics[row_id]
            mse_ratio = _ratio(m["mse"], base["mse"]) if base else None
            ppl_ratio = _ratio(m["perplexity"], base["perplexity"]) if base else None
            cells = [r["label"], _num(m["mse"], ".3e"), _num(m["psnr"], ".2f")]
            if not window:
                cells.append(_num(m["ssim"], ".4f"))
            cells += [
                _num(m["usage"], ".1%"),
                _num(m["perplexity"], ".1f"),
                _num(m["dead_codes"], "d"),
            ]
            if not window:
                cells.append(_num(r["sec_per_step"], ".3f"))
            cells += [_num(mse_ratio, ".2f") + "×", _num(ppl_ratio, ".1f") + "×"]
            out.append("| " + " | ".join(c.replace("–×", "–") for c in cells) + " |")
        checks = target_checks(metrics, results.get("pairs", DEFAULT_PAIRS))
        if checks:
            where = "training window" if window else "native-size evaluation"
            out += ["", f"| target ({where}) | measured | met |", "|---|---|---|"]
            out += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in checks]
    out += _seeds_section(results)
    return "\n".join(out) + "\n"


def _mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None


def _seeds_section(results: dict[str, Any]) -> list[str]:
    """Rows with runs of several seeds: mean ± sample sd per metric, the targets on the means,
    and each [method, reference] pair seed by seed (same seed = same data and initial weights)."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for run_id, run in results["rows"].items():
        groups.setdefault(row_of(run_id, run), {})[seed_label(run)] = run
    if all(len(g) < 2 for g in groups.values()):
        return []
    order = _ordered(results, list(groups))
    pairs = results.get("pairs", DEFAULT_PAIRS)
    means: dict[bool, dict[str, dict[str, Any]]] = {False: {}, True: {}}
    out = [
        "",
        "Across seeds (seed N sets the model and data seeds: other initial weights, patch bank "
        "and batch order); mean ± sample standard deviation:",
        "",
        "| row | seeds | MSE | PSNR (dB) | usage | perplexity | window MSE | window usage "
        "| window perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row_id in order:
        seeds = sorted(groups[row_id], key=seed_order)
        runs = [groups[row_id][s] for s in seeds]
        cells = [runs[0]["label"], ",".join(seeds)]
        for window in (False, True):
            stats = {
                k: _mean_sd([_metrics(run, window)[k] for run in runs])
                for k in ("mse", "psnr", "usage", "perplexity")
            }
            means[window][row_id] = {k: mean for k, (mean, _) in stats.items()}
            shown = (
                ("mse", "psnr", "usage", "perplexity")
                if not window
                else ("mse", "usage", "perplexity")
            )
            spec = {"mse": ".3e", "psnr": ".2f", "usage": ".1%", "perplexity": ".1f"}
            for k in shown:
                mean, sd = stats[k]
                cells.append(_num(mean, spec[k]) + ("" if sd is None else f" ± {sd:{spec[k]}}"))
        out.append("| " + " | ".join(cells) + " |")
    for window in (False, True):
        checks = [(f"{t} (means)", m, ok) for t, m, ok in target_checks(means[window], pairs)]
        for method, reference in pairs:
            a, b = groups.get(method, {}), groups.get(reference, {})
            paired = set(a) & set(b)
            for key, better, name in (
                ("mse", lambda x, y: x < y, "MSE lower"),
                ("usage", lambda x, y: x > y, "usage higher"),
            ):
                values = [
                    (_metrics(a[s], window)[key], _metrics(b[s], window)[key]) for s in paired
                ]
                values = [(x, y) for x, y in values if x is not None and y is not None]
                if values:
                    wins = sum(better(x, y) for x, y in values)
                    checks.append(
                        (
                            f"{method} {name} than {reference}, same seed",
                            f"{wins} of {len(values)} seeds",
                            wins == len(values),
                        )
                    )
        if checks:
            where = "training window" if window else "native-size evaluation"
            out += ["", f"| target across seeds ({where}) | measured | met |", "|---|---|---|"]
            out += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in checks]
    return out


# -- CLI -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    seeds = None
    if args.seeds:
        try:
            seeds = list(dict.fromkeys(int(v) for v in args.seeds.split(",") if v.strip()))
        except ValueError:
            raise SystemExit(
                f"--seeds must be comma-separated integers, got {args.seeds!r}"
            ) from None
        if not seeds or min(seeds) < 0:
            raise SystemExit(f"--seeds must be comma-separated integers >= 0, got {args.seeds!r}")
    command = shlex.join(["vqtok-ablation", *(sys.argv[1:] if argv is None else argv)])
    try:
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
        raise SystemExit(str(err)) from None
    except RowInterrupted as err:
        print(err, file=sys.stderr)
        return 128 + err.signum if err.signum else 1
    print(results_table(results))
    print(f"results: {Path(args.out) / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
