"""The ablation's report: table.md from results.json (what :func:`training.ablation.run_ablation`
writes), one markdown table per measurement, then the targets checked on it.

    (out / "table.md").write_text(results_table(json.loads((out / "results.json").read_text())))

What the tables compare comes from the ablation config, nothing is named here:
- the **baseline** is the config's first row (``results["order"][0]``): the ratio columns and
  the headline targets are relative to it;
- each configured ``pairs`` entry [method, reference] is checked on MSE, usage and perplexity
  (per run, on the means over seeds, and seed by seed), and each pair's method row must reach
  the headline targets against the baseline: perplexity >= 20x, MSE <= 0.6x.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

# [method, reference] when the config names no pairs (and in results.json files written before
# pairs were configurable)
DEFAULT_PAIRS = (("full", "strong"),)
PERPLEXITY_TARGET = 20.0  # method / baseline perplexity at least this
MSE_TARGET = 0.6  # method / baseline MSE at most this
SPECS = {"mse": ".3e", "psnr": ".2f", "usage": ".1%", "perplexity": ".1f"}


def results_table(results: dict[str, Any]) -> str:
    """Markdown: the native-size evaluation and the last training window, one line per finished
    row (config order, the row's own seed) with ratios to the baseline, then the targets on each;
    where a row ran with several seeds, the same over the seeds' means and the paired wins."""
    runs = results["rows"]
    rows = {k: run for k, run in runs.items() if row_of(k, run) == k}
    order = _ordered(results, list(rows))
    baseline, pairs = baseline_row(results), results.get("pairs", DEFAULT_PAIRS)
    out: list[str] = []
    for window in (False, True):
        metrics = {r: _metrics(rows[r], window) for r in order}
        out += _table_head(results, window)
        out += [_table_line(rows[r], metrics[r], metrics.get(baseline), window) for r in order]
        checks = target_checks(metrics, pairs, baseline)
        out += _targets(checks, f"target ({_measurement(window)})")
    out += _seeds_section(results)
    return "\n".join(out) + "\n"


def baseline_row(results: dict[str, Any]) -> str | None:
    """The row the ratios and headline targets refer to: the config's first row."""
    order = results.get("order") or []
    return order[0] if order else None


def target_checks(
    metrics: dict[str, dict[str, Any]],
    pairs: Sequence[Sequence[str]] = DEFAULT_PAIRS,
    baseline: str | None = None,
) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target whose rows have ``metrics`` (``mse``, ``usage``,
    ``perplexity``): each pair's method against the baseline (perplexity and MSE ratios), then
    each [method, reference] pair."""
    checks = []
    base = metrics.get(baseline) if baseline is not None else None
    for method in dict.fromkeys(method for method, _ in pairs):
        row = metrics.get(method)
        if base and row and method != baseline:
            checks += _headline_checks(method, baseline, row, base)
    for method, reference in pairs:
        a, b = metrics.get(method), metrics.get(reference)
        if a and b:
            checks += _pair_checks(method, reference, a, b)
    return checks


def _headline_checks(
    method: str, baseline: str, row: dict[str, Any], base: dict[str, Any]
) -> list[tuple[str, str, bool]]:
    checks = []
    ppl, mse = _ratio(row["perplexity"], base["perplexity"]), _ratio(row["mse"], base["mse"])
    if ppl is not None:
        target = f"{method} / {baseline} perplexity ≥ {PERPLEXITY_TARGET:g}×"
        checks.append((target, f"{ppl:.1f}×", ppl >= PERPLEXITY_TARGET))
    if mse is not None:
        target = f"{method} / {baseline} MSE ≤ {MSE_TARGET:g}×"
        checks.append((target, f"{mse:.2f}×", mse <= MSE_TARGET))
    return checks


def _pair_checks(
    method: str, reference: str, a: dict[str, Any], b: dict[str, Any]
) -> list[tuple[str, str, bool]]:
    checks = []
    mse = _ratio(a["mse"], b["mse"])
    if mse is not None:
        checks.append((f"{method} MSE < {reference} MSE", f"{mse:.3f}×", mse < 1))
    for key in ("usage", "perplexity"):
        if a[key] is not None and b[key] is not None:
            measured = f"{a[key]:{SPECS[key]}} vs {b[key]:{SPECS[key]}}"
            checks.append((f"{method} {key} > {reference} {key}", measured, a[key] > b[key]))
    return checks


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _measurement(window: bool) -> str:
    return "training window" if window else "native-size evaluation"


def _table_head(results: dict[str, Any], window: bool) -> list[str]:
    if window:
        return [
            "",
            "Last training log window (batches of patches from the training source, "
            "first epoch: not seen before; usage over the whole window):",
            "",
            "| row | recon MSE | PSNR (dB) | usage | perplexity | dead codes "
            "| MSE / baseline | perplexity / baseline |",
            "|---|---|---|---|---|---|---|---|",
        ]
    return [
        f"Native-size evaluation on `{results.get('eval', {}).get('data', '?')}`:",
        "",
        "| row | MSE | PSNR (dB) | SSIM | usage | perplexity | dead codes | s/step "
        "| MSE / baseline | perplexity / baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]


def _table_line(
    run: dict[str, Any], m: dict[str, Any], base: dict[str, Any] | None, window: bool
) -> str:
    mse_ratio = _ratio(m["mse"], base["mse"]) if base else None
    ppl_ratio = _ratio(m["perplexity"], base["perplexity"]) if base else None
    cells = [run["label"], _num(m["mse"], ".3e"), _num(m["psnr"], ".2f")]
    if not window:
        cells.append(_num(m["ssim"], ".4f"))
    cells += [_num(m["usage"], ".1%"), _num(m["perplexity"], ".1f"), _num(m["dead_codes"], "d")]
    if not window:
        cells.append(_num(run["sec_per_step"], ".3f"))
    cells += [_num(mse_ratio, ".2f") + "×", _num(ppl_ratio, ".1f") + "×"]
    return "| " + " | ".join(c.replace("–×", "–") for c in cells) + " |"


def _targets(checks: list[tuple[str, str, bool]], title: str) -> list[str]:
    if not checks:
        return []
    lines = ["", f"| {title} | measured | met |", "|---|---|---|"]
    return lines + [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in checks]


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


def _ordered(results: dict[str, Any], ids: Sequence[str]) -> list[str]:
    order = results.get("order", [])
    return [r for r in order if r in ids] + [r for r in ids if r not in order]


# -- runs and seeds --------------------------------------------------------------------------------
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


def _seeds_section(results: dict[str, Any]) -> list[str]:
    """Rows with runs of several seeds: mean ± sample sd per metric, the targets on the means,
    and each [method, reference] pair seed by seed (same seed = same data and initial weights)."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for run_id, run in results["rows"].items():
        groups.setdefault(row_of(run_id, run), {})[seed_label(run)] = run
    if all(len(g) < 2 for g in groups.values()):
        return []
    baseline, pairs = baseline_row(results), results.get("pairs", DEFAULT_PAIRS)
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
    for row_id in _ordered(results, list(groups)):
        seeds = sorted(groups[row_id], key=seed_order)
        runs = [groups[row_id][s] for s in seeds]
        cells = [runs[0]["label"], ",".join(seeds)]
        for window in (False, True):
            stats = {k: _mean_sd([_metrics(run, window)[k] for run in runs]) for k in SPECS}
            means[window][row_id] = {k: mean for k, (mean, _) in stats.items()}
            for k in ("mse", "usage", "perplexity") if window else SPECS:
                mean, sd = stats[k]
                cells.append(_num(mean, SPECS[k]) + ("" if sd is None else f" ± {sd:{SPECS[k]}}"))
        out.append("| " + " | ".join(cells) + " |")
    for window in (False, True):
        checks = target_checks(means[window], pairs, baseline)
        checks = [(f"{t} (means)", m, ok) for t, m, ok in checks]
        checks += _paired_wins(groups, pairs, window)
        out += _targets(checks, f"target across seeds ({_measurement(window)})")
    return out


def _mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None


WINS: tuple[tuple[str, Callable[[float, float], bool], str], ...] = (
    ("mse", lambda x, y: x < y, "MSE lower"),
    ("usage", lambda x, y: x > y, "usage higher"),
)


def _paired_wins(
    groups: dict[str, dict[str, dict[str, Any]]], pairs: Sequence[Sequence[str]], window: bool
) -> list[tuple[str, str, bool]]:
    """Each pair seed by seed: in how many shared seeds the method beats the reference."""
    checks = []
    for method, reference in pairs:
        a, b = groups.get(method, {}), groups.get(reference, {})
        paired = set(a) & set(b)
        for key, better, name in WINS:
            values = [(_metrics(a[s], window)[key], _metrics(b[s], window)[key]) for s in paired]
            values = [(x, y) for x, y in values if x is not None and y is not None]
            if values:
                wins = sum(better(x, y) for x, y in values)
                target = f"{method} {name} than {reference}, same seed"
                checks.append((target, f"{wins} of {len(values)} seeds", wins == len(values)))
    return checks
