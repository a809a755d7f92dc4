"""SIGTERM under keep-alive load: does a draining vqtok-serve answer every request it was sent?

    .venv/bin/python -m benchmarks.drain --clients 16 64
    .venv/bin/python -m benchmarks.drain --quick            # 16 clients, shorter phases

What runs: one `vqtok-serve` process (models/default, VQTOK_PRE_STOP_DELAY_S=--pre-stop-delay-s,
one onnxruntime thread) and, in this process, `--clients` threads, each a closed loop on its own
keep-alive connection (http.client, no think time) alternating GET /v1/model and POST
/v1/encode of one 64×64 PNG (resize=none). After `--load-s` of load the script sends SIGTERM and
the clients keep going (reconnecting when an answer says `Connection: close`, retrying a refused
connect every 20 ms) until the process has exited. A separate poller asks /health/ready every
10 ms on a fresh connection, as a load balancer would.

Each request attempt lands in exactly one column:
  complete   the whole response came back (any status; `non-200` counts the ones that were not 200)
  lost       the connection was established and the request bytes went out (or were going out),
             then a reset, EOF or timeout instead of a complete response: the drain dropped it
  refused    connect() failed (refused, or timed out): nothing was sent; the client may retry
             elsewhere
Target: lost = 0. The poller's view, in ms after SIGTERM: `503 after` (first 503), `port closed`
(start of the first refused connect); `ready 503` is first to last 503: the window a load balancer
has to take the instance out of rotation. `exit s`: SIGTERM to process exit. `exit` is the
shell-style status (0 is a clean drain; 143 is "killed by SIGTERM"). The service's log is kept
(path in the JSON) when a run lost requests or exited non-zero.

Output: a markdown table, then exactly one final line of JSON with every number.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import REPO, ServiceProcess, png_bytes

TIMEOUT_S = 30.0


def encode_request() -> tuple[bytes, dict[str, str]]:
    """One multipart body with a 64×64 noise PNG, built once."""
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    request = httpx.Request(
        "POST", "http://x/v1/encode",
        files=[("images", ("x.png", png_bytes(rgb), "image/png"))], data={"resize": "none"},
    )  # fmt: skip
    return request.read(), {"content-type": request.headers["content-type"]}


@dataclass
class Tally:
    """One client's counts (summed over clients at the end: no shared counters, no locks)."""

    sent: int = 0
    complete: int = 0
    non_200: int = 0
    lost_sending: int = 0
    lost_waiting: int = 0
    refused: int = 0
    connections: int = 0
    lost_errors: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        for name in ("sent", "complete", "non_200", "lost_sending", "lost_waiting", "refused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.connections += other.connections
        self.lost_errors += other.lost_errors


def client_loop(port: int, stop: threading.Event, tally: Tally) -> None:
    """A closed-loop keep-alive client; every attempt is counted in exactly one column."""
    body, headers = encode_request()
    calls = [("GET", "/v1/model", None, {}), ("POST", "/v1/encode", body, headers)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    turn = 0
    while not stop.is_set():
        method, path, payload, extra = calls[turn % 2]
        if conn.sock is None:  # a fresh connection: the only place a refusal can happen
            try:
                conn.connect()
            except OSError:  # refused (or a connect timeout): no request bytes went out
                tally.refused += 1
                time.sleep(0.02)
                continue
            tally.connections += 1
        turn += 1
        tally.sent += 1
        try:
            conn.request(method, path, body=payload, headers=extra)
        except OSError as error:  # reset or broken pipe while the bytes went out
            tally.lost_sending += 1
            tally.lost_errors.append(f"send {path}: {error!r}")
            conn.close()
            continue
        try:
            response = conn.getresponse()
            response.read()  # raises IncompleteRead on a short body
        except (OSError, http.client.HTTPException) as error:
            tally.lost_waiting += 1
            tally.lost_errors.append(f"wait {path}: {error!r}")
            conn.close()
            continue
        tally.complete += 1
        tally.non_200 += response.status != 200
        # http.client already dropped the socket if the answer said `Connection: close`


def ready_poller(port: int, stop: threading.Event, seen: list[tuple[float, str]]) -> None:
    """GET /health/ready every 10 ms on a fresh connection: (when the attempt started,
    "200" | "503" | "refused" | "error"). The start, not the end: once the port stops taking new
    connections a connect waits for its SYN retry (~1 s) before it is refused."""
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        started = time.monotonic()
        try:
            conn.request("GET", "/health/ready", headers={"connection": "close"})
            response = conn.getresponse()
            response.read()
            seen.append((started, str(response.status)))
        except ConnectionRefusedError:
            seen.append((started, "refused"))
        except (OSError, http.client.HTTPException):
            seen.append((started, "error"))
        finally:
            conn.close()
        time.sleep(0.01)


def start_service(args: argparse.Namespace, log: Path) -> ServiceProcess:
    env = {
        "VQTOK_INTRA_OP_THREADS": "1",
        # env, not a flag: the same script measures a vqtok-serve from before the flag existed
        "VQTOK_PRE_STOP_DELAY_S": str(args.pre_stop_delay_s),
    }
    flags = ["--model-dir", str(args.model_dir)]
    return ServiceProcess(flags, env, log_level="info", log=log).start()


def ready_window(seen: list[tuple[float, str]], sigterm_at: float) -> dict[str, float | None]:
    """Milliseconds after SIGTERM of the first 503 and the first refusal, and the 503 window."""
    first_503 = next((t for t, what in seen if what == "503" and t >= sigterm_at), None)
    last_503 = max((t for t, what in seen if what == "503"), default=None)
    closed = next((t for t, what in seen if what == "refused" and t >= sigterm_at), None)

    def ms(t: float | None) -> float | None:
        return None if t is None else round(1000 * (t - sigterm_at), 1)

    window = None if first_503 is None else round(1000 * (last_503 - first_503), 1)
    return {"first_503_ms": ms(first_503), "port_closed_ms": ms(closed), "ready_503_ms": window}


def run_case(args: argparse.Namespace, clients: int) -> dict[str, object]:
    log = Path(tempfile.mkstemp(prefix="vqtok-drain-", suffix=".log")[1])
    server = start_service(args, log)
    port, process = server.port, server.process
    assert process is not None
    stop_clients, stop_poller = threading.Event(), threading.Event()
    tallies = [Tally() for _ in range(clients)]
    seen: list[tuple[float, str]] = []
    threads = [
        threading.Thread(target=client_loop, args=(port, stop_clients, t)) for t in tallies
    ] + [threading.Thread(target=ready_poller, args=(port, stop_poller, seen))]
    for thread in threads:
        thread.start()
    time.sleep(args.load_s)
    sigterm_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=args.pre_stop_delay_s + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    exited_s = time.monotonic() - sigterm_at
    time.sleep(0.1)  # let the last refusals land on the closed port
    stop_clients.set()
    stop_poller.set()
    for thread in threads:
        thread.join()
    total = Tally()
    for tally in tallies:
        total.add(tally)
    result = {"clients": clients, **asdict(total), "lost": total.lost_sending + total.lost_waiting}
    result["lost_errors"] = total.lost_errors[:5]
    result |= ready_window(seen, sigterm_at)
    result["exit_s"] = round(exited_s, 2)
    result["exit_code"] = code if code >= 0 else 128 - code  # shell style: 143 = SIGTERM
    if result["lost"] or result["exit_code"]:
        result["service_log"] = str(log)
    else:
        log.unlink()
    return result


def print_table(rows: list[dict[str, object]]) -> None:
    columns = [
        ("clients", "clients"), ("sent", "sent"), ("complete", "complete"),
        ("non_200", "non-200"), ("lost", "lost"), ("refused", "refused"),
        ("first_503_ms", "503 after ms"), ("ready_503_ms", "ready 503 ms"),
        ("port_closed_ms", "port closed ms"), ("exit_s", "exit s"), ("exit_code", "exit"),
    ]  # fmt: skip
    print("| " + " | ".join(title for _, title in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key, _ in columns) + " |")
    for row in rows:
        for error in row["lost_errors"]:
            print(f"lost ({row['clients']} clients): {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--load-s", type=float, default=3.0, help="load before SIGTERM")
    parser.add_argument("--pre-stop-delay-s", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per client count")
    parser.add_argument("--quick", action="store_true", help="16 clients, 1 s load, 1 s delay")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.load_s, args.pre_stop_delay_s = [16], 1.0, 1.0
    rows = [run_case(args, n) for n in args.clients for _ in range(args.repeat)]
    print_table(rows)
    settings = {k: v for k, v in vars(args).items() if k != "model_dir"}
    print(json.dumps({"benchmark": "drain", "settings": settings, "runs": rows}))


if __name__ == "__main__":
    main()
