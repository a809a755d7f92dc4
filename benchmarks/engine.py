"""onnxruntime (service.engine.Engine) vs torch eager (VQVAE.encode / VQVAE.decode).

Workload: 256x256 RGB images (or the model's native size with --model-dir), encode images ->
tokens and decode tokens -> images, at batch 1, 8 and 32. Both runtimes use the same number of
intra-op threads (--threads, default 2 = this machine's cores; onnxruntime with spinning off, as
the service runs it). Without --model-dir the default ModelConfig with random weights is
exported to a temporary model directory first (speed does not depend on the weight values).

Timing: every (op, batch) case runs both runtimes round-robin (ort, torch, ort, torch ...) in ONE
process after a warm-up call each, so drift on a shared machine hits both alike; medians and
minima over --rounds calls, reported as images/s. Ratio = torch median time / ort median time.

Latency: one 256x256 encode + decode at batch 1 with 2 threads through the engine (the service's
hot path), median and min over --rounds.

Peak memory: each runtime x op measured in its own fresh process (this script re-invoked with
``--peak-memory``): the process's peak RSS is reset (/proc/self/clear_refs) after a warm batch-1
call, then one batch-32 call runs; reported is peak RSS minus RSS before the call.

Output: a markdown table, then exactly one final line of JSON with every number.

    .venv/bin/python -m benchmarks.engine                     # default config, 5 rounds
    .venv/bin/python -m benchmarks.engine --model-dir models/default
    .venv/bin/python -m benchmarks.engine --quick             # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import reset_peak_rss, rss_bytes
from service.engine import Engine
from vqmodel import VQVAE, ModelConfig, load_model

REPO = Path(__file__).resolve().parents[1]
OPS = ("encode", "decode")
RUNTIMES = ("onnxruntime", "torch")


def prepare_model_dir(model_dir: str | None, scratch: Path) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    from training.export import export_model_dir, verification_photos

    torch.manual_seed(0)
    model = VQVAE(ModelConfig()).eval()
    out = scratch / "default-random"
    batches = verification_photos([(256, 256)], 1)  # parity at one size: this is a speed test
    export_model_dir(model, out, verify_batches=batches, progress=None, training={"steps": 0})
    return out


def runners(
    model_dir: Path, threads: int
) -> tuple[dict[str, dict[str, Callable[[np.ndarray], Any]]], int, int, int]:
    torch.set_num_threads(threads)
    engine = Engine(model_dir, providers="cpu", intra_op_threads=threads, inter_op_threads=1)
    model, _ = load_model(model_dir)
    model.eval()

    def torch_encode(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode(torch.from_numpy(x)).numpy()

    def torch_decode(t: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.decode(torch.from_numpy(t)).numpy()

    table = {
        "onnxruntime": {"encode": engine.encode, "decode": engine.decode},
        "torch": {"encode": torch_encode, "decode": torch_decode},
    }
    info = engine.info
    return table, info.image_size, info.downsample, info.codebook_size


def inputs(op: str, batch: int, size: int, f: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    if op == "encode":
        return rng.random((batch, 3, size, size), dtype=np.float32)
    return rng.integers(0, k, (batch, size // f, size // f), dtype=np.int64)


def time_cases(
    table: dict, size: int, f: int, k: int, batches: list[int], rounds: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for op in OPS:
        for batch in batches:
            x = inputs(op, batch, size, f, k)
            for runtime in RUNTIMES:
                table[runtime][op](x)  # warm-up
            times: dict[str, list[float]] = {r: [] for r in RUNTIMES}
            cpu: dict[str, list[float]] = {r: [] for r in RUNTIMES}
            for _ in range(rounds):
                for runtime in RUNTIMES:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    table[runtime][op](x)
                    times[runtime].append(time.perf_counter() - start)
                    cpu[runtime].append(time.process_time() - start_cpu)
            for runtime in RUNTIMES:
                median, best = statistics.median(times[runtime]), min(times[runtime])
                results[f"{op}/{batch}/{runtime}"] = {
                    "op": op,
                    "batch": batch,
                    "runtime": runtime,
                    "median_s": median,
                    "min_s": best,
                    "images_per_s_median": batch / median,
                    "images_per_s_best": batch / best,
                    # CPU seconds of all threads: less sensitive to other load than wall time
                    "cpu_s_per_image_median": statistics.median(cpu[runtime]) / batch,
                }
            print(
                f"  {op} batch {batch}: ort {results[f'{op}/{batch}/onnxruntime']['median_s']:.3f}"
                f" s, torch {results[f'{op}/{batch}/torch']['median_s']:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    return results


def latency(model_dir: Path, size: int, rounds: int) -> dict[str, float]:
    engine = Engine(model_dir, providers="cpu", intra_op_threads=2, inter_op_threads=1)
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    engine.decode(engine.encode(x))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        engine.decode(engine.encode(x))
        times.append(time.perf_counter() - start)
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times)}


# -- peak memory (fresh process per runtime x op) ----------------------------------------------
def _rss_now_and_peak() -> tuple[int, int]:
    return rss_bytes("self", "VmRSS"), rss_bytes("self", "VmHWM")


def peak_memory_child(model_dir: Path, runtime: str, op: str, threads: int, batch: int) -> None:
    import ctypes

    table, size, f, k = runners(model_dir, threads)
    run = table[runtime][op]
    run(inputs(op, 1, size, f, k))
    x = inputs(op, batch, size, f, k)
    run(x)  # allocator caches warm at this batch: the second call shows the steady state
    with contextlib.suppress(OSError):  # hand freed heap back first (glibc)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_rss()  # VmHWM back to the current RSS
    before, _ = _rss_now_and_peak()
    run(x)
    _, peak = _rss_now_and_peak()
    print(json.dumps({"peak_bytes": peak - before}))


def peak_memory(model_dir: Path, threads: int, batch: int) -> dict[str, int | None]:
    peaks: dict[str, int | None] = {}
    if not Path("/proc/self/clear_refs").exists():
        return {f"{op}/{r}": None for op in OPS for r in RUNTIMES}
    for op in OPS:
        for runtime in RUNTIMES:
            cmd = [sys.executable, "-m", "benchmarks.engine", "--model-dir", str(model_dir)]
            cmd += ["--threads", str(threads), "--peak-memory", runtime, op, str(batch)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            peaks[f"{op}/{runtime}"] = json.loads(result.stdout.strip().splitlines()[-1])[
                "peak_bytes"
            ]
    return peaks


def markdown(
    results: dict, peaks: dict, batches: list[int], peak_batch: int, lat: dict, size: int
) -> str:
    lines = [
        f"| op ({size}x{size}) | batch | onnxruntime img/s (median / best) | "
        "torch eager img/s (median / best) | ort speed-up (median) | CPU s/img ort / torch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for op in OPS:
        for b in batches:
            o, t = results[f"{op}/{b}/onnxruntime"], results[f"{op}/{b}/torch"]
            lines.append(
                f"| {op} | {b} | {o['images_per_s_median']:.1f} / {o['images_per_s_best']:.1f} | "
                f"{t['images_per_s_median']:.1f} / {t['images_per_s_best']:.1f} | "
                f"{t['median_s'] / o['median_s']:.2f}x | "
                f"{o['cpu_s_per_image_median']:.2f} / {t['cpu_s_per_image_median']:.2f} |"
            )
    lines.append("")
    lines.append(f"| peak memory, one batch-{peak_batch} call | onnxruntime | torch eager |")
    lines.append("|---|---:|---:|")
    for op in OPS:
        cells = [peaks.get(f"{op}/{r}") for r in RUNTIMES]
        shown = [f"{c / 2**20:.0f} MiB" if c is not None else "n/a" for c in cells]
        lines.append(f"| {op} | {shown[0]} | {shown[1]} |")
    lines.append("")
    lines.append(
        f"encode + decode latency, batch 1, {size}x{size}, onnxruntime 2 threads: "
        f"median {lat['median_ms']:.0f} ms, min {lat['min_ms']:.0f} ms"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="exported model dir (default: random default config)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--quick", action="store_true", help="batches 1,8 and 2 rounds")
    parser.add_argument("--peak-memory", nargs=3, metavar=("RUNTIME", "OP", "BATCH"))
    args = parser.parse_args(argv)

    if args.peak_memory:
        runtime, op, batch = args.peak_memory
        peak_memory_child(Path(args.model_dir), runtime, op, args.threads, int(batch))
        return 0

    batches = [1, 8] if args.quick else [int(b) for b in args.batches.split(",")]
    rounds = 2 if args.quick else args.rounds
    load_start = os.getloadavg()[0]  # this machine is shared: say how busy it was
    with tempfile.TemporaryDirectory() as scratch:
        print("preparing the model directory ...", file=sys.stderr, flush=True)
        model_dir = prepare_model_dir(args.model_dir, Path(scratch))
        table, size, f, k = runners(model_dir, args.threads)
        results = time_cases(table, size, f, k, batches, rounds)
        del table
        lat = latency(model_dir, size, max(rounds, 5))
        peak_batch = max(batches)
        peaks = peak_memory(model_dir, args.threads, peak_batch)
        model_id = json.loads((model_dir / "model.json").read_text())["id"]

    print(markdown(results, peaks, batches, peak_batch, lat, size))
    ratios = {
        f"{op}/{b}": results[f"{op}/{b}/torch"]["median_s"]
        / results[f"{op}/{b}/onnxruntime"]["median_s"]
        for op in OPS
        for b in batches
    }
    record = {
        "benchmark": "engine",
        "model": model_id,
        "image_size": size,
        "threads": args.threads,
        "rounds": rounds,
        "results": list(results.values()),
        "ort_speedup_median": ratios,
        "encoder_batch32_target_2x_met": ratios.get("encode/32", 0.0) >= 2.0
        if 32 in batches
        else None,
        "peak_bytes": peaks,
        "latency_b1_2threads_ms": lat,
        "loadavg_start_end": [load_start, os.getloadavg()[0]],
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
