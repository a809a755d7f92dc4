"""What hostile-but-legal uploads cost a real vqtok-serve: peak memory and status codes.

    .venv/bin/python -m benchmarks.abuse memory            # 16 x 4000² PNGs per request
    .venv/bin/python -m benchmarks.abuse memory --quick    # 4 x 2000², 2 at once
    .venv/bin/python -m benchmarks.abuse engine-memory     # onnxruntime bytes per model pixel

memory: starts vqtok-serve on models/default (--pre-stop-delay-s 0) and, for every resize policy,
sends requests of `--images` solid-colour `--side`² PNGs (small on the wire, huge decoded), first
one request, then `--parallel` at once. Peak RSS is the service process's VmHWM (reset before each
cell), reported above the idle service's RSS. Target (issue 12): ≤ 300 MiB above idle, and only
200/4xx answers.
engine-memory: peak RSS growth of one onnxruntime encode and decode at several sides, divided by
the pixels (the figure service/admission.py budgets with).

Output: a markdown table, then exactly one final line of JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import REPO, ServiceProcess, png_bytes, reset_peak_rss, rss_mib

POLICIES = ("fit", "pad", "none")


def solid_pngs(count: int, side: int) -> list[bytes]:
    colours = np.random.default_rng(0).integers(0, 256, (count, 3), dtype=np.uint8)
    return [png_bytes(np.broadcast_to(colour, (side, side, 3)).copy()) for colour in colours]


def send(url: str, uploads: list[bytes], policy: str) -> int:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(uploads)]
    try:
        return httpx.post(
            url + "/v1/encode", files=files, data={"resize": policy}, timeout=300
        ).status_code
    except httpx.TransportError:
        return 0  # no answer at all


def memory(args: argparse.Namespace) -> dict:
    uploads = solid_pngs(args.images, args.side)
    wire_kib = sum(len(data) for data in uploads) / 1024
    rows = []
    flags = ["--model-dir", str(args.model_dir), "--pre-stop-delay-s", "0"]
    with ServiceProcess(flags) as server:
        idle = rss_mib(server.pid)
        for policy in POLICIES:
            for parallel in (1, args.parallel):
                reset_peak_rss(server.pid)
                with ThreadPoolExecutor(parallel) as pool:
                    jobs = [pool.submit(send, server.url, uploads, policy) for _ in range(parallel)]
                    statuses = [job.result() for job in jobs]
                peak = rss_mib(server.pid, "VmHWM")
                rows.append(
                    {"policy": policy, "parallel": parallel, "statuses": statuses,
                     "peak_above_idle_mib": round(peak - idle, 1),
                     "rss_after_mib": round(rss_mib(server.pid) - idle, 1)}
                )  # fmt: skip
                print(f"  {policy} x{parallel}: {statuses} peak +{peak - idle:.0f} MiB", flush=True)
    print(f"\n{args.images} x {args.side}² solid PNGs per request ({wire_kib:.0f} KiB on the wire)")
    print(f"idle service RSS {idle:.0f} MiB\n")
    print("| resize | requests at once | statuses | peak RSS above idle | RSS after, above idle |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['policy']} | {row['parallel']} | {row['statuses']} | "
              f"{row['peak_above_idle_mib']} MiB | {row['rss_after_mib']} MiB |")  # fmt: skip
    worst = max(row["peak_above_idle_mib"] for row in rows)
    bad = [s for row in rows for s in row["statuses"] if not (s == 200 or 400 <= s < 500)]
    return {
        "benchmark": "abuse-memory", "images": args.images, "side": args.side,
        "idle_rss_mib": round(idle, 1), "rows": rows, "worst_peak_above_idle_mib": worst,
        "non_200_4xx": len(bad), "target_mib": 300, "met": worst <= 300 and not bad,
    }  # fmt: skip


ENGINE_PROBE = """
import json, sys, numpy as np
from benchmarks.common import rss_mib
from service.engine import Engine
engine = Engine(sys.argv[1], providers="cpu", warmup=False)
side, op = int(sys.argv[2]), sys.argv[3]
base = rss_mib(0 or __import__("os").getpid(), "VmHWM")
if op == "encode":
    engine.encode(np.random.default_rng(0).random((1, 3, side, side), np.float32))
else:
    f = engine.info.downsample
    engine.decode(np.zeros((1, side // f, side // f), np.int64))
grown = rss_mib(__import__("os").getpid(), "VmHWM") - base
print(json.dumps({"side": side, "op": op, "bytes_per_pixel": grown * 2**20 / side**2}))
"""


def engine_memory(args: argparse.Namespace) -> dict:
    rows = []
    for side in args.sides:
        for op in ("encode", "decode"):
            # a fresh process per cell: onnxruntime's arena keeps what an earlier call grew
            out = subprocess.run(
                [sys.executable, "-c", ENGINE_PROBE, str(args.model_dir), str(side), op],
                cwd=REPO, check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| side | op | bytes per model pixel |\n|---|---|---|")
    for row in rows:
        print(f"| {row['side']} | {row['op']} | {row['bytes_per_pixel']:.0f} |")
    return {"benchmark": "engine-memory", "model_dir": str(args.model_dir), "rows": rows,
            "max_bytes_per_pixel": max(row["bytes_per_pixel"] for row in rows)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("memory", "engine-memory"))
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--side", type=int, default=4000)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks it still runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.side, args.parallel, args.sides = 4, 2000, 2, [128]
    result = memory(args) if args.what == "memory" else engine_memory(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
