"""Choose a run's checkpoint on a validation split, never on the test photos.

    vqtok-select runs/default --data package-photos:val

Every step checkpoint of the run (``checkpoints/step_*``, see training/run_dir.py) is evaluated
with ``training.evaluate.evaluate`` on ``--data``; the one with the highest mean PSNR wins (on a
tie, the earlier step). Written, atomically, into the run directory:

    selection.json           {"data", "metric", "images", "chosen": {...}, "candidates": [...]}
    checkpoints/selected ->  the chosen step checkpoint (a symlink, like ``latest``)

`vqtok-eval` then reports the chosen checkpoint on the test photos and `vqtok-export` records
selection.json in model.json. Re-running re-evaluates every checkpoint (a few seconds each).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from service.cli_parser import CliParser
from service.files import point_symlink_atomic, write_bytes_atomic
from training.cli_errors import user_error
from training.config import ConfigError
from training.evaluate import evaluate, load_eval_set
from training.run_dir import RunDir
from vqmodel import CheckpointError, load_metadata, load_model

SELECTION_FILE = "selection.json"
SELECTED_LINK = "selected"
DEFAULT_DATA = "package-photos:val"


def select_checkpoint(
    run_dir: str | os.PathLike[str], data: str = DEFAULT_DATA, progress: bool = True
) -> dict[str, Any]:
    """Evaluate every step checkpoint of ``run_dir`` on ``data``, point ``checkpoints/selected``
    at the best (highest mean PSNR) and return the selection record (also in selection.json)."""
    run = RunDir(run_dir)
    checkpoints = run.step_checkpoints()
    if not checkpoints:
        raise ConfigError(f"RUN_DIR {run.root} holds no step checkpoints (checkpoints/step_*)")
    names, images = load_eval_set(data)
    candidates = []
    for number, path in enumerate(checkpoints, 1):
        model, _ = load_model(path, map_location="cpu")
        with torch.inference_mode():
            result = evaluate(model, images, names=names, progress=False)
        row = {
            "checkpoint": path.name,
            "step": int(load_metadata(path).get("step", 0)),
            **{key: result[key] for key in ("psnr", "ssim", "usage", "perplexity")},
            "worst": min(result["per_image"], key=lambda r: r["psnr"])["name"],
        }
        candidates.append(row)
        if progress:
            print(
                f"[{number}/{len(checkpoints)}] {path.name}: PSNR {row['psnr']:.3f} dB, "
                f"usage {row['usage']:.1%}",
                flush=True,
            )
    chosen = max(candidates, key=lambda row: (row["psnr"], -row["step"]))
    record = {"data": data, "metric": "psnr", "images": names, "chosen": chosen,
              "candidates": candidates}  # fmt: skip
    write_bytes_atomic(run.root / SELECTION_FILE, json.dumps(record, indent=2).encode())
    point_symlink_atomic(run.checkpoints / SELECTED_LINK, chosen["checkpoint"])
    return record


def read_selection(checkpoint: Path) -> dict[str, Any] | None:
    """The selection.json of the run ``checkpoint`` belongs to, when it chose this checkpoint."""
    resolved = checkpoint.resolve()
    path = resolved.parent.parent / SELECTION_FILE
    if resolved.parent.name != "checkpoints" or not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("chosen", {}).get("checkpoint") == resolved.name else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = CliParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help=f"validation source, default {DEFAULT_DATA}"
    )
    parser.add_argument("--no-progress", action="store_true", help="one line per checkpoint off")
    args = parser.parse_args(argv)
    try:
        record = select_checkpoint(args.run_dir, args.data, progress=not args.no_progress)
    except (ConfigError, CheckpointError, OSError) as err:
        return user_error("vqtok-select", err)
    chosen = record["chosen"]
    print(
        f"selected {chosen['checkpoint']} (step {chosen['step']}): PSNR {chosen['psnr']:.3f} dB "
        f"on {len(record['images'])} images of {record['data']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
