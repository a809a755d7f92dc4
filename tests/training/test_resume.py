"""--resume continues exactly; SIGKILL loses at most one checkpoint interval; SIGINT/SIGTERM save a
checkpoint and exit with 128 + signal number, and the run resumes from it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from training.config import load_config
from training.loop import train
from vqmodel import load_model
from vqmodel.checkpoint import load_metadata

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def bank_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "patch-bank-cache"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- exactness (in process) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "workers", "log_every"),
    [("alternating", 0, 1), ("inplace", 0, 1), ("standard", 1, 2)],
)
def test_resumed_run_matches_uninterrupted_run(
    mode: str, workers: int, log_every: int, tmp_path: Path, bank_cache: Path
) -> None:
    # 6 batches per epoch (an epoch boundary after the checkpoint), k-means still collecting at
    # the checkpoint (it needs 1400 vectors: 6 steps of 256), dead codes replaced every 2 steps,
    # learned affine and sync gradient on (tiny.yaml)
    straight = tmp_path / "straight"
    overrides = [
        f"mode={mode}", f"data.workers={workers}", f"log_every={log_every}", "steps=10",
        "ckpt_every=5", "keep_last=5", "data.bank_size=96", f"data.cache_dir={bank_cache}",
        "model.quantizer.kmeans_samples=1400", "model.quantizer.replace_freq=2", "image_every=0",
    ]  # fmt: skip
    train(load_config(TINY, [*overrides, f"out_dir={straight}"]), progress=False)

    # the same run, stopped after its step-5 checkpoint, then resumed
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, symlinks=True)
    shutil.rmtree(resumed / "checkpoints" / "step_0000010")
    os.unlink(resumed / "checkpoints" / "latest")
    summary = train(load_config(TINY, [*overrides, f"out_dir={resumed}"]), resume=True)
    assert summary["step"] == 10

    expected, got = read_metrics(straight), read_metrics(resumed)
    assert [line["step"] for line in got] == [line["step"] for line in expected]
    for a, b in zip(expected, got):
        for key in ("loss", "recon", "vq", "psnr", "usage", "perplexity", "dead_codes", "lr"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)

    # the record lists every invocation: where each started, so a resume's changes stay visible
    for run, starts in ((straight, [0]), (resumed, [0, 5])):
        invocations = load_metadata(run / "checkpoints" / "step_0000010")["invocations"]
        assert [entry["from_step"] for entry in invocations] == starts
        assert all(entry["command"] and entry["started_at"] for entry in invocations)

    weights = [
        load_model(run / "checkpoints" / "step_0000010")[0].state_dict()
        for run in (straight, resumed)
    ]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=1e-6, msg=name)


# -- real processes --------------------------------------------------------------------------------
def start_training(out_dir: Path, cache: Path, *overrides: str) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "training.cli", "--config", str(TINY), "--no-progress",
        f"out_dir={out_dir}", f"data.cache_dir={cache}", "data.bank_size=256", "log_every=1",
        "ckpt_every=5", "image_every=0", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(process: subprocess.Popen[str], run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()}")
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within 120 s")


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


def resume_to(run_dir: Path, cache: Path, steps: int) -> int:
    """Resume with a new total; return the step it resumed from (asserting a clean finish)."""
    code, out, err = finish(start_training(run_dir, cache, f"steps={steps}", "--resume"))
    assert code == 0, err
    found = re.search(r"resumed .* at step (\d+)", out)
    assert found, out
    assert json.loads(out.strip().splitlines()[-1])["step"] == steps
    steps_logged = [line["step"] for line in read_metrics(run_dir)]
    assert steps_logged == list(range(1, steps + 1))  # one history, nothing twice, no gap
    return int(found.group(1))


def test_sigkill_loses_at_most_one_checkpoint_interval(tmp_path: Path, bank_cache: Path) -> None:
    run = tmp_path / "run"
    process = start_training(run, bank_cache, "steps=100000")
    try:
        wait_for_step(process, run, 13)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    last_logged = read_metrics(run)[-1]["step"]
    resumed_from = resume_to(run, bank_cache, last_logged + 2)
    assert last_logged - 5 <= resumed_from <= last_logged
    assert resumed_from % 5 == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(
    sig: signal.Signals, tmp_path: Path, bank_cache: Path
) -> None:
    run = tmp_path / "run"
    process = start_training(run, bank_cache, "steps=100000")
    wait_for_step(process, run, 3)
    process.send_signal(sig)
    code, out, err = finish(process)
    assert code == 128 + sig, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "signal" and summary["signal"] == sig
    # the checkpoint is the step it stopped at: nothing is lost
    stopped_at = summary["step"]
    assert summary["last_checkpoint"].endswith(f"step_{stopped_at:07d}")
    assert os.readlink(run / "checkpoints" / "latest") == f"step_{stopped_at:07d}"
    assert read_metrics(run)[-1]["step"] == stopped_at
    if sig == signal.SIGTERM:  # (the resume path is the same for both; run it once)
        assert resume_to(run, bank_cache, stopped_at + 2) == stopped_at
