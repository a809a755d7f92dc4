"""The run directory a training run writes (rank 0 only) and ``--resume`` reads::

    <out_dir>/
      config.yaml              the resolved TrainConfig
      metrics.jsonl            one JSON object per line ({"step", "split": "train", "loss", ...})
      tb/                      TensorBoard scalars and reconstruction grids
      checkpoints/
        step_0000100/          vqmodel.save_checkpoint directories (weights, config, training
        step_0000200/          state, checkpoint.json manifest); the last ``keep_last`` are kept
        best/                  lowest train recon loss over a log window (no training state)
        latest -> step_0000200 symlink to the newest complete step checkpoint

A step checkpoint counts once its manifest (written last by save_checkpoint) verifies; ``latest``
moves only after that, so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from service.files import point_symlink_atomic, write_bytes_atomic
from training.config import ConfigError, TrainConfig, parse_yaml
from vqmodel import CheckpointError, load_training_state, save_checkpoint
from vqmodel.vqvae import VQVAE, ModelConfig

CHECKPOINT_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


class RunDir:
    """Paths and writers of one run directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.config_path = self.root / "config.yaml"
        self.metrics_path = self.root / "metrics.jsonl"
        self.tb_dir = self.root / "tb"
        self.checkpoints = self.root / "checkpoints"
        self.best = self.checkpoints / "best"
        self.latest = self.checkpoints / "latest"

    # -- start / resume ---------------------------------------------------------------------------
    def check(self, config: TrainConfig, resume: bool) -> None:
        """Refuse to mix two runs in one directory (read-only: every rank can call it)."""
        if not resume and self.step_checkpoints():
            raise ConfigError(
                f"out_dir={str(self.root)!r} already holds checkpoints of a run; pass "
                "--resume to continue it or choose another out_dir"
            )
        if resume and self.step_checkpoints() and self.config_path.exists():
            previous = parse_yaml(self.config_path.read_text()) or {}
            if ModelConfig.model_validate(previous.get("model", {})) != config.model:
                raise ConfigError(
                    f"model: differs from the run being resumed ({self.config_path}); a "
                    "resumed run keeps its architecture and quantizer options"
                )

    def write_config(self, config: TrainConfig) -> None:
        """Create the directory and write the resolved config.yaml."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.config_path, config.to_yaml().encode())

    def step_checkpoints(self) -> list[Path]:
        """Step checkpoint directories, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)]
        return sorted(p for p in found if p.is_dir() and not p.is_symlink())

    def resumable_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint whose files verify, with its training state; None if none."""
        candidates = self.step_checkpoints()[::-1]
        if self.latest.is_symlink():
            target = self.checkpoints / os.readlink(self.latest)
            candidates = [target, *(p for p in candidates if p != target)]
        for path in candidates:
            try:
                return path, load_training_state(path)
            except (CheckpointError, OSError) as err:
                warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
        return None

    def truncate_metrics_after(self, step: int) -> None:
        """Drop log lines past ``step`` (written by the run that died after its last checkpoint),
        and a half-written last line, so metrics.jsonl stays one history."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(line)
        write_bytes_atomic(self.metrics_path, "".join(f"{line}\n" for line in kept).encode())

    # -- writing ----------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def save_step(
        self,
        step: int,
        model: VQVAE,
        training_state: dict[str, Any],
        metadata: dict[str, Any],
        keep_last: int,
    ) -> Path:
        """Write ``checkpoints/step_XXXXXXX``, point ``latest`` at it, prune old ones."""
        path = save_checkpoint(
            self.checkpoints / checkpoint_name(step), model, None, training_state, metadata
        )
        self._point_latest_to(path.name)
        for old in self.step_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def save_best(self, model: VQVAE, metadata: dict[str, Any]) -> Path:
        return save_checkpoint(self.best, model, None, None, metadata)

    def _point_latest_to(self, name: str) -> None:
        point_symlink_atomic(self.latest, name)  # readers see the old or the new target
