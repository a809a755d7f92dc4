"""`vqtok-serve`: run the tokenizer service under uvicorn, one process per container.

    vqtok-serve --host 127.0.0.1 --port 8000 --model-dir models/default

Every flag has a `VQTOK_*` environment twin (see service/settings.py); a flag wins over the
environment. The model is loaded before the port opens, so a bad model directory is a clear
message and exit status 2, not a half-started server. To scale, run more replicas of this one
process (each verifies its model and drains on its own), not more processes inside it.

SIGTERM (or Ctrl+C) drains without dropping requests: /health/ready answers 503 at once and every
response closes its connection, while the port stays open for --pre-stop-delay-s so a load
balancer sees the 503 and stops sending; then the port closes, accepted requests finish (up to
--drain-timeout-s) and the process exits 0. A second signal skips the rest of the delay; a third
stops waiting for accepted requests and exits by the signal (143 / 130).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from service.app import create_app, load_engine
from service.cli_parser import CliParser
from service.drain import DrainingServer, ReadBeforeClose
from service.engine import EngineError
from service.settings import Settings

log = logging.getLogger("vqtok.service")

# flag name → Settings field; None means "not given" so the environment (or default) applies.
FLAGS: dict[str, tuple[type, str]] = {
    "model_dir": (str, "exported model directory (model.json, encoder.onnx, decoder.onnx)"),
    "providers": (str, "auto | cpu | cuda | tensorrt"),
    "intra_op_threads": (int, "onnxruntime intra-op threads (0 = onnxruntime's choice)"),
    "inter_op_threads": (int, "onnxruntime inter-op threads"),
    "image_threads": (int, "threads decoding uploads and encoding PNGs (default: cores)"),
    "max_batch": (int, "most images per engine call"),
    "max_wait_ms": (float, "longest an image waits for a batch to fill"),
    "max_queue": (int, "most queued images before 503"),
    "max_body_bytes": (int, "request body limit"),
    "max_pixels": (int, "pixels per uploaded image"),
    "max_images": (int, "images per request"),
    "max_token_grid": (int, "h*w tokens per grid"),
    "pre_stop_delay_s": (
        float,
        "on SIGTERM, answer /health/ready 503 and keep serving this long before the port closes "
        "(longer than your load balancer needs to notice)",
    ),
    "drain_timeout_s": (float, "then wait at most this long for accepted requests"),
    "log_level": (str, "critical | error | warning | info | debug"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CliParser(
        prog="vqtok-serve",
        description="Serve a vqtok model over HTTP (API: README 'HTTP API', /docs when running). "
        "One process: to scale, run more replicas behind a load balancer.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    for name, (kind, help_text) in FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up batch")
    return parser.parse_args(argv)


def flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags (they win over VQTOK_* environment variables)."""
    overrides = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    if args.no_warmup:
        overrides["warmup"] = False
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = flag_overrides(args)
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        print(f"vqtok-serve: invalid settings:\n{error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not (settings.model_dir / "model.json").is_file():
        print(
            f"vqtok-serve: {settings.model_dir} is not a model directory (no model.json); "
            "export one with `vqtok-export` or pass --model-dir / VQTOK_MODEL_DIR",
            file=sys.stderr,
        )
        return 2
    try:
        engine = load_engine(settings)
    except EngineError as error:  # missing/corrupt files, provider unavailable
        print(f"vqtok-serve: cannot load {settings.model_dir}: {error}", file=sys.stderr)
        return 2
    log.info(
        "model %s loaded from %s; onnxruntime providers: %s",
        engine.info.id,
        settings.model_dir,
        ", ".join(engine.active_providers),
    )
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http=ReadBeforeClose,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
        access_log=settings.log_level == "debug",
    )
    server = DrainingServer(config, app.state.service.begin_drain, settings.pre_stop_delay_s)
    try:
        server.run()
    except KeyboardInterrupt:  # a third Ctrl+C: uvicorn re-raised it after a cut-short drain
        return 130
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
