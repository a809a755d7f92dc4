"""``vqtok-train --config training/configs/NAME.yaml [key=value ...] [--resume]``.

Exit status: 0 when the run finished or stopped at ``time_limit_s`` (a checkpoint was saved:
run again with --resume); 128 + signal number (130 SIGINT, 143 SIGTERM) when a signal stopped it
after saving a checkpoint; 2 for a bad config or command line, or a data source that is not
installed, before any training (one line on stderr); 1 when the loss or gradients became NaN/inf
(one line: lower optim.lr, then --resume from the last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys

from service.cli_parser import CliParser
from training.cli_errors import user_error
from training.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="vqtok-train",
        description="Train a vqtok VQ-VAE tokenizer.",
        epilog="Overrides use dotted keys, values parsed as YAML: "
        "model.quantizer.num_codes=512 optim.lr=3e-4 mode=alternating. "
        "SIGINT/SIGTERM save a checkpoint and exit with 128+signal; --resume continues exactly.",
    )
    parser.add_argument("--config", required=True, help="YAML file (training/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from out_dir's newest checkpoint (starts fresh when there is none)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        return user_error("vqtok-train", err)

    from training.loop import train  # torch and the data stack load only for a valid config

    try:
        summary = train(config, resume=args.resume, progress=not args.no_progress)
    except ConfigError as err:
        return user_error("vqtok-train", err)
    except FloatingPointError as err:
        print(f"vqtok-train: {err}", file=sys.stderr)
        return 1
    if summary["rank"] == 0:
        print(json.dumps(summary), flush=True)
    if summary["stopped"] == "signal":
        return 128 + int(summary["signal"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
