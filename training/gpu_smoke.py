"""The GPU smoke run behind training/gpu_smoke.sh (see there); ``python -m training.gpu_smoke OUT``.

Stages, each timed and logged as one JSON line in OUT/smoke.jsonl: environment (device, torch,
bf16 support); a first training invocation of the GPU recipe with a time limit; a resumed one;
vqtok-select on held-out synthetic images; and, when SMOKE_EXPORT=1, an ONNX export.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RECIPE = Path(__file__).resolve().parent / "configs" / "default-gpu.yaml"


def synthetic_photos(folder: Path, count: int, seed: int, size: tuple[int, int]) -> None:
    """Smooth colour fields with edges and noise: photo-like statistics, no download needed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    for index in range(count):
        coarse = rng.random((height // 32 + 2, width // 32 + 2, 3)) * 255
        image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image).astype(np.float32)
        pixels[: height // 2, rng.integers(width) :] *= 0.6  # a hard edge
        pixels += rng.normal(0, 6, pixels.shape)
        out = np.clip(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(out).save(folder / f"synthetic_{seed}_{index:03d}.png")


class Log:
    def __init__(self, path: Path) -> None:
        self.path, self.ok = path, True

    def stage(self, name: str, started: float, **fields: Any) -> None:
        record = {"stage": name, "seconds": round(time.monotonic() - started, 1), **fields}
        self.ok &= bool(record.get("ok", True))
        print(json.dumps(record), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def main(out: str) -> int:
    import torch

    root = Path(out).resolve()
    log, started = Log(root / "smoke.jsonl"), time.monotonic()
    cuda = torch.cuda.is_available()
    log.stage("environment", started, ok=cuda, torch=torch.__version__,
              device=torch.cuda.get_device_name(0) if cuda else "no CUDA device",
              bf16=cuda and torch.cuda.is_bf16_supported())  # fmt: skip
    if not cuda:
        return 1
    return run_stages(root, log, steps=400, limits=(120, 90))


def run_stages(
    root: Path, log: Log, steps: int, limits: tuple[float, float], extra: tuple[str, ...] = ()
) -> int:
    """Train (time-limited), resume, select, [export]; ``extra`` config overrides (the CPU test
    shrinks the model with them)."""
    import torch

    from training.config import load_config
    from training.loop import train
    from training.select import select_checkpoint

    synthetic_photos(root / "photos", 24, seed=0, size=(512, 768))
    synthetic_photos(root / "val", 4, seed=1, size=(256, 384))
    overrides = [f"out_dir={root / 'run'}", f"data.source=folder:{root / 'photos'}",
                 f"data.cache_dir={root / 'cache'}", "data.bank_size=4096", "data.workers=2",
                 f"steps={steps}", f"ckpt_every={max(1, steps // 4)}", "log_every=2",
                 "image_every=0", "optim.warmup_steps=2", *extra]  # fmt: skip
    cuda = torch.cuda.is_available()
    for name, limit in zip(("train", "resume"), limits):
        started = time.monotonic()
        config = load_config(RECIPE, [*overrides, f"time_limit_s={limit}"])
        summary = train(config, resume=name == "resume", progress=False)
        metrics = summary["metrics"] or {}
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        log.stage(name, started, ok=summary["step"] > 0, step=summary["step"],
                  stopped=summary["stopped"], sec_per_step=summary["sec_per_step"],
                  psnr=metrics.get("psnr"), usage=metrics.get("usage"),
                  peak_gb=peak and round(peak, 2))  # fmt: skip
    started = time.monotonic()
    record = select_checkpoint(root / "run", f"folder:{root / 'val'}", progress=False)
    log.stage("select", started, chosen=record["chosen"]["checkpoint"],
              psnr=record["chosen"]["psnr"])  # fmt: skip
    if os.environ.get("SMOKE_EXPORT") == "1":
        from training.export import main as export_main

        started = time.monotonic()
        selected = root / "run" / "checkpoints" / "selected"
        code = export_main([str(selected), "--out", str(root / "model")])
        log.stage("export", started, ok=code == 0, exit_code=code)
    return 0 if log.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu-smoke"))
