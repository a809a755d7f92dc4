"""Pieces every service benchmark needs: a real `vqtok-serve` process, free ports, RSS readings.

with ServiceProcess(["--model-dir", "models/default"]) as server:
    httpx.get(server.url + "/health/ready")
    peak = rss_mib(server.pid, "VmHWM")  # its high-water mark, MiB
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_bytes(pid: int | str = "self", key: str = "VmRSS") -> int:
    """A process's resident memory (VmRSS) or its high-water mark (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def rss_mib(pid: int | str = "self", key: str = "VmRSS") -> float:
    """:func:`rss_bytes` in MiB."""
    return rss_bytes(pid, key) / 2**20


def reset_peak_rss(pid: int | str = "self") -> None:
    """Start a new VmHWM window (Linux: writing 5 to clear_refs resets the high-water mark)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class ServiceProcess:
    """`python -m service.cli` on a free loopback port; ready on enter, stopped on exit."""

    def __init__(
        self,
        flags: list[str],
        env: dict[str, str] | None = None,
        *,
        log_level: str = "warning",
        log: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", log_level, *flags,
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.log = log  # the service's stdout + stderr go there when given (else inherited)
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def start(self) -> ServiceProcess:
        """Start the service and wait until /health/ready answers 200 (120 s at most)."""
        if self.log is None:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env)
        else:
            with self.log.open("wb") as out:
                self.process = subprocess.Popen(
                    self.command, cwd=REPO, env=self.env, stdout=out, stderr=out
                )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                shown = f":\n{self.log.read_text()}" if self.log is not None else ""
                raise SystemExit(f"vqtok-serve exited with {self.process.returncode}{shown}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit("vqtok-serve did not become ready in 120 s")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
