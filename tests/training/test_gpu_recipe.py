"""The GPU recipe is valid and its smoke run's stages work (on the CPU, shrunk)."""

from __future__ import annotations

import json
from pathlib import Path

from training.config import load_config
from training.gpu_smoke import RECIPE, Log, run_stages

SHRINK = ("device=cpu", "compile=false", "amp=bf16", "model.base_channels=8",
          "model.num_res_blocks=1", "model.quantizer.num_codes=64", "data.patch_size=32",
          "data.batch_size=4", "data.workers=0", "model.quantizer.kmeans_samples=256")  # fmt: skip


def test_the_gpu_recipe_is_bf16_channels_last_compiled_and_keeps_the_token_contract() -> None:
    gpu, cpu = load_config(RECIPE), load_config(RECIPE.parent / "default.yaml")
    assert (gpu.device, gpu.amp, gpu.channels_last, gpu.compile) == ("cuda", "auto", True, True)
    assert gpu.steps >= 100_000 and gpu.model.base_channels > cpu.model.base_channels
    for key in ("downsample", "image_size"):
        assert getattr(gpu.model, key) == getattr(cpu.model, key)
    assert gpu.model.quantizer.num_codes == cpu.model.quantizer.num_codes


def test_the_smoke_stages_train_resume_and_select(tmp_path: Path) -> None:
    log = Log(tmp_path / "smoke.jsonl")
    assert run_stages(tmp_path, log, steps=8, limits=(600, 600), extra=SHRINK) == 0
    stages = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["train", "resume", "select"]
    assert stages[0]["step"] == 8 and stages[1]["step"] == 8  # the resume found the finished run
    assert (tmp_path / "run" / "checkpoints" / "selected").resolve().is_dir()
