"""Does averaging the weights of a run's last checkpoints reconstruct better than the last one?

    C=runs/default/checkpoints   # a finished run's step checkpoints, given oldest first
    python -m benchmarks.checkpoint_average $C/step_0004000 $C/step_0004500 $C/step_0005000
    python -m benchmarks.checkpoint_average CKPT CKPT --quick   # 2 images

Scores, on `--data` (default the default pipeline's validation photos) at native size, each
suffix of the given checkpoints (the last alone, the last two, ... all of them) with every floating
point tensor averaged, and once more with every tensor averaged except the quantizer's, which is
the last checkpoint's (codes replaced between checkpoints make an averaged codebook a mix of
unrelated rows). Integer and boolean buffers (step counters, flags) are the last checkpoint's.
Prints one line per candidate, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from training.evaluate import evaluate, load_eval_set
from training.select import DEFAULT_DATA
from vqmodel import CheckpointError, load_model


def averaged(
    states: list[dict[str, torch.Tensor]], keep_last_quantizer: bool
) -> dict[str, torch.Tensor]:
    """``states[-1]`` with its float tensors replaced by their mean over ``states``."""
    merged = dict(states[-1])
    for key, value in merged.items():
        if not value.is_floating_point() or (keep_last_quantizer and key.startswith("quantizer.")):
            continue
        merged[key] = torch.stack([state[key] for state in states]).mean(0)
    return merged


def _load_states(
    parser: argparse.ArgumentParser, paths: list[Path]
) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The last checkpoint's model and every checkpoint's weights, each file read once; checkpoints
    that are unreadable or of another architecture than the last are a usage error naming them."""
    states = []
    for path in paths:
        try:
            model = load_model(path, map_location="cpu")[0]
        except (CheckpointError, OSError) as err:
            parser.error(f"checkpoint {path}: {err}")
        states.append({key: value.clone() for key, value in model.state_dict().items()})
    shapes = {key: value.shape for key, value in states[-1].items()}
    for path, state in zip(paths, states, strict=True):
        if {key: value.shape for key, value in state.items()} != shapes:
            parser.error(f"checkpoint {path}: its tensors differ from those of {paths[-1]}")
    return model, states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="oldest first; the last is kept")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"images (default {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="the first 2 images only")
    args = parser.parse_args(argv)
    model, states = _load_states(parser, args.checkpoints)  # a bad checkpoint fails before I/O
    names, images = load_eval_set(args.data, 2 if args.quick else None)
    rows: list[dict[str, Any]] = []
    count = len(args.checkpoints)
    variants = [(n, False) for n in range(1, count + 1)] + ([(count, True)] if count > 1 else [])
    for n, keep_last_quantizer in variants:
        paths = args.checkpoints[count - n :]
        model.load_state_dict(averaged(states[count - n :], keep_last_quantizer))
        with torch.inference_mode():
            result = evaluate(model, images, names=names, progress=False)
        row = {
            "checkpoints": [path.name for path in paths],
            "quantizer": "last" if keep_last_quantizer else "averaged",
            "psnr": result["psnr"],
            "usage": result["usage"],
        }
        rows.append(row)
        print(
            f"{' + '.join(row['checkpoints'])} (quantizer {row['quantizer']}): "
            f"PSNR {row['psnr']:.3f} dB, usage {row['usage']:.1%}",
            flush=True,
        )
    print(json.dumps({"benchmark": "checkpoint_average", "data": args.data, "images": len(names),
                      "rows": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
