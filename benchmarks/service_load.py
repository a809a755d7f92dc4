"""HTTP load on a real vqtok-serve: throughput and latency vs concurrency, against the engine's
own batched throughput measured in the same run.

    .venv/bin/python -m benchmarks.service_load --model-dir models/default
    .venv/bin/python -m benchmarks.service_load --model-dir DIR --seconds 3   # quicker

What runs where: the service is a separate `vqtok-serve` process (its own onnxruntime threads,
micro-batcher and event loop); the load comes from separate generator processes (asyncio +
httpx, at most 16 closed-loop clients each, one connection per client, no think time, request
bodies built once). Everything shares the machine's cores, as a sidecar load generator would.

Workloads: encode = one 256×256 PNG photo crop per request (resize=none, so the engine sees
exactly 256×256, like the raw measurement); decode = its 32×32 token grid (f=8) as base64 uint16,
answered with a 256×256 PNG. Each (operation, concurrency) cell is one uninterrupted closed loop:
a warm-up that fills the queue, then a `--seconds` window; throughput is the requests that
complete inside the window per second, latency (p50/p95/p99) is theirs.
Mean batch size per cell comes from the service's own /metrics (batch-size histogram deltas).
CPU per request: the service process's user+system CPU over the window (/proc/PID/stat, its
onnxruntime threads included) and the generator processes' own CPU (time.process_time) over the
timed window, each divided by the completed requests: where the cores went.

Raw engine: the same Engine class the service uses, loaded in this process with the same thread
settings, timed at batch 1 and at `--max-batch` (median of >= 5 calls, images/s) right before and
right after each operation's sweep while the service is idle; the reference is the better batch
size, averaged over before/after (the before/after spread shows how noisy the machine was).
Target: HTTP encode throughput at concurrency 16 ≥ 0.8 × raw encode throughput.

Output: a markdown table, then exactly one final line of JSON with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import ServiceProcess, png_bytes
from service.engine import Engine
from service.images import unit_pixels

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 16, 64)


def photo_crop(size: int = 256) -> np.ndarray:
    """A size×size crop of scikit-image's astronaut (pip wheel file), else seeded noise."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"
        if path.is_file():
            rgb = np.asarray(Image.open(path).convert("RGB"))
            return np.ascontiguousarray(rgb[100 : 100 + size, 120 : 120 + size])
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def service_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--model-dir", str(args.model_dir), "--max-batch", str(args.max_batch),
        "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "1024",
        "--intra-op-threads", str(args.intra_op_threads), "--pre-stop-delay-s", "0",
    ]  # fmt: skip


class RawEngine:
    """The service's Engine in this process, timed on full batches (images/s)."""

    def __init__(self, args: argparse.Namespace, image: np.ndarray) -> None:
        self.engine = Engine(args.model_dir, intra_op_threads=args.intra_op_threads)
        pixels = unit_pixels(image)[None]
        self.inputs = {"encode": np.repeat(pixels, args.max_batch, 0)}
        self.inputs["decode"] = self.engine.encode(self.inputs["encode"])
        self.batch = args.max_batch

    def rate(self, operation: str, rounds: int = 5) -> dict[str, float]:
        """images/s at batch 1 and at max_batch (median of `rounds` calls each); `best` is the
        larger of the two, the reference the HTTP numbers are compared with."""
        fn = getattr(self.engine, operation)
        rates = {}
        for batch in (1, self.batch):
            data = self.inputs[operation][:batch]
            fn(data)
            times = []
            cpu = time.process_time()
            for _ in range(max(rounds, 16 // batch)):
                started = time.perf_counter()
                fn(data)
                times.append(time.perf_counter() - started)
            cpu = time.process_time() - cpu
            rates[f"batch{batch}"] = batch / statistics.median(times)
            rates[f"cpu_ms_per_image_batch{batch}"] = 1000 * cpu / (batch * len(times))
        rates["best"] = max(rates[f"batch{batch}"] for batch in (1, self.batch))
        return rates


def batch_stats(text: str, operation: str) -> tuple[float, float]:
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in values:
            if line.startswith(f'vqtok_batch_size_{key}{{operation="{operation}"}}'):
                values[key] = float(line.split()[-1])
    return values["sum"], values["count"]


CLIENTS_PER_PROCESS = (
    16  # one httpx client pool beyond ~16 connections eats more CPU than the server
)


def request_for(operation: str, payload: Any) -> tuple[str, bytes, dict[str, str]]:
    """The request body built once: the load generator should not spend CPU re-encoding it."""
    if operation == "encode":
        request = httpx.Request(
            "POST", "http://x/v1/encode",
            files=[("images", ("x.png", payload, "image/png"))],
            data={"resize": "none", "format": "base64"},
        )  # fmt: skip
    else:
        request = httpx.Request("POST", "http://x/v1/decode", json=payload)
    return request.url.path, request.read(), {"content-type": request.headers["content-type"]}


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_process(
    base_url: str, request: tuple[str, bytes, dict[str, str]], clients: int,
    start_at: float, seconds: float,
) -> tuple[list[tuple[float, float, bool]], float]:  # fmt: skip
    """One load-generator process: `clients` closed-loop clients that never pause from start-up
    to the end of the window. Returns (completion time, latency, ok) of every request and this
    process's CPU seconds over the window [start_at, start_at + seconds]."""
    path, body, headers = request

    async def run() -> tuple[list[tuple[float, float, bool]], float]:
        done: list[tuple[float, float, bool]] = []
        cpu = [0.0, 0.0]
        stop_at = start_at + seconds
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

            async def client_loop() -> None:
                while time.time() < stop_at:
                    started = time.perf_counter()
                    response = await client.post(path, content=body, headers=headers)
                    ok = response.status_code == 200
                    done.append((time.time(), time.perf_counter() - started, ok))

            async def cpu_clock() -> None:
                await asyncio.sleep(max(0.0, start_at - time.time()))
                cpu[0] = time.process_time()
                await asyncio.sleep(max(0.0, stop_at - time.time()))
                cpu[1] = time.process_time()

            await asyncio.gather(cpu_clock(), *(client_loop() for _ in range(clients)))
        return done, cpu[1] - cpu[0]

    return asyncio.run(run())


def load(
    pool: ProcessPoolExecutor, base_url: str, operation: str, concurrency: int, seconds: float,
    payload: Any, service_pid: int,
) -> dict[str, Any]:  # fmt: skip
    """One (operation, concurrency) cell. Throughput counts the requests that COMPLETE inside the
    timed window, divided by its length, and the service's CPU is read at the window's edges:
    at high concurrency the queue is still full of warm-up requests when the window opens and of
    window requests when it closes (a request-start count over "window + drain" understated
    throughput at concurrency 64 by ~2x)."""
    request = request_for(operation, payload)
    processes = -(-concurrency // CLIENTS_PER_PROCESS)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    # process start-up, then a warm-up long enough to fill the queue to its steady state
    start_at = time.time() + 2.5 + 0.2 * concurrency / 4
    futures = [pool.submit(client_process, base_url, request, n, start_at, seconds) for n in shares]
    time.sleep(max(0.0, start_at - time.time()))
    before = httpx.get(base_url + "/metrics").text
    service_cpu = process_cpu_seconds(service_pid)
    time.sleep(max(0.0, start_at + seconds - time.time()))
    service_cpu = process_cpu_seconds(service_pid) - service_cpu
    after = httpx.get(base_url + "/metrics").text
    results = [future.result() for future in futures]
    window = [
        (latency, ok)
        for done, _ in results
        for end, latency, ok in done
        if start_at <= end < start_at + seconds
    ]
    latencies = [latency for latency, ok in window if ok]
    (s0, c0), (s1, c1) = batch_stats(before, operation), batch_stats(after, operation)
    q = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [float("nan")] * 3
    return {
        "requests": len(latencies),
        "errors": sum(not ok for _, ok in window),
        "rps": len(latencies) / seconds,
        "p50_ms": float(q[0]),
        "p95_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "mean_batch": (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan"),
        "client_processes": processes,
        "service_cpu_ms_per_request": 1000 * service_cpu / max(len(latencies), 1),
        "generator_cpu_ms_per_request": 1000
        * sum(cpu for _, cpu in results)
        / max(len(latencies), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per cell")
    parser.add_argument("--max-batch", type=int, default=4, help="the service's default")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--quick", action="store_true", help="1 s cells at concurrency 4")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.concurrency = 1.0, [4]
    if not (args.model_dir / "model.json").is_file():
        raise SystemExit(f"{args.model_dir} has no model.json; pass --model-dir")

    image = photo_crop()
    engine = RawEngine(args, image)
    service = ServiceProcess(service_flags(args)).start()
    base_url = service.url
    try:
        model = httpx.get(base_url + "/v1/model").json()
        encoded = httpx.post(
            base_url + "/v1/encode",
            files=[("images", ("x.png", png_bytes(image), "image/png"))],
            data={"resize": "none", "format": "base64"},
            timeout=60,
        ).json()["items"][0]
        payloads = {
            "encode": png_bytes(image),
            "decode": {"tokens_b64": encoded["tokens"], "shape": encoded["shape"]},
        }
        pool = ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(time.sleep, [0.5] * 4))  # generator processes started before any cell
        cells: dict[str, dict[int, dict[str, Any]]] = {"encode": {}, "decode": {}}
        raw_runs: dict[str, list[dict[str, float]]] = {"encode": [], "decode": []}
        for operation in ("encode", "decode"):
            # Raw engine right before and after each sweep (service idle then): on a shared
            # machine the drift between the two says how far the ratios can be trusted.
            raw_runs[operation].append(engine.rate(operation))
            for concurrency in args.concurrency:
                cells[operation][concurrency] = load(
                    pool, base_url, operation, concurrency, args.seconds, payloads[operation],
                    service.pid,
                )  # fmt: skip
            raw_runs[operation].append(engine.rate(operation))
        pool.shutdown()
    finally:
        service.stop()

    print(f"model {model.get('id')} from {args.model_dir}; {os.cpu_count()} CPUs; "
          f"{args.seconds:g} s per cell; max_batch {args.max_batch}, "
          f"max_wait_ms {args.max_wait_ms:g}")  # fmt: skip
    raw = {op: statistics.mean(run["best"] for run in runs) for op, runs in raw_runs.items()}
    for op, runs in raw_runs.items():
        before, after = runs
        print(f"raw engine {op} 256×256: {raw[op]:.1f} img/s = mean of before/after sweep of the "
              f"better batch size (before: batch 1 {before['batch1']:.1f}, batch {args.max_batch} "
              f"{before[f'batch{args.max_batch}']:.1f}; after: {after['batch1']:.1f}, "
              f"{after[f'batch{args.max_batch}']:.1f}); CPU ms/img batch 1 "
              f"{before['cpu_ms_per_image_batch1']:.0f}, batch {args.max_batch} "
              f"{before[f'cpu_ms_per_image_batch{args.max_batch}']:.0f}")  # fmt: skip
    print()
    print(
        "| op | concurrency | req/s | × raw engine | p50 ms | p95 ms | p99 ms | mean batch "
        "| service CPU ms/req | generator CPU ms/req | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for operation, by_concurrency in cells.items():
        for concurrency, cell in by_concurrency.items():
            ratio = cell["rps"] / raw[operation]
            print(
                f"| {operation} | {concurrency} | {cell['rps']:.1f} | {ratio:.2f} | "
                f"{cell['p50_ms']:.1f} | {cell['p95_ms']:.1f} | {cell['p99_ms']:.1f} | "
                f"{cell['mean_batch']:.1f} | {cell['service_cpu_ms_per_request']:.0f} | "
                f"{cell['generator_cpu_ms_per_request']:.1f} | {cell['errors']} |"
            )
    c16 = cells["encode"].get(16)
    ratio16 = c16["rps"] / raw["encode"] if c16 else None
    if ratio16 is not None:
        verdict = "meets" if ratio16 >= 0.8 else "misses"
        print(
            f"\nHTTP encode at concurrency 16 = {ratio16:.2f} × raw engine "
            f"({verdict} the 0.8 target)"
        )
    print(
        json.dumps(
            {
                "benchmark": "service_load",
                "model_id": model.get("id"),
                "model_dir": str(args.model_dir),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "seconds_per_cell": args.seconds,
                "max_batch": args.max_batch,
                "max_wait_ms": args.max_wait_ms,
                "raw_engine_ips": raw,
                "raw_engine_runs": raw_runs,
                "http": {op: {str(c): v for c, v in d.items()} for op, d in cells.items()},
                "encode_c16_over_raw": ratio16,
            }
        )
    )


if __name__ == "__main__":
    main()
