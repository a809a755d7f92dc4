"""Evaluate a tokenizer at native image size: PSNR, SSIM, whole-set codebook usage, bits per pixel.

    vqtok-eval runs/default --data pip-photos --out runs/default/eval

Conventions (also written into every report):

- Each image is evaluated at its NATIVE size under the service's ``resize=pad`` policy
  (``service.images.pad_to_multiple``: edge-padded on the bottom/right to a multiple of the
  downsampling factor f), encoded, decoded, and cropped back. Metrics only ever see the original
  pixels.
- PSNR per image = ``service.images.psnr_from_mse`` (10·log10(1 / MSE), data range 1, images in
  [0,1]), then averaged over images (not the PSNR of the pooled MSE). An exact reconstruction has
  PSNR = inf.
- SSIM = ``skimage.metrics.structural_similarity(x, y, data_range=1, channel_axis=-1)`` on the
  H×W×3 images: 7×7 uniform window, the defaults K1=0.01, K2=0.03, mean over channels; the
  window shrinks to the largest odd size that fits an image smaller than 7 pixels.
- Codebook usage, perplexity and dead codes are over the WHOLE set (one
  :class:`vqmodel.UsageAccumulator` for all tokens of all images), not averaged per image.
- Bits per pixel: ``bpp_fixed`` = log2(K)/f² is what a fixed-length code (every token
  ⌈log2 K⌉ bits, K a power of two) costs; ``bpp_entropy`` = H/f² with H the empirical entropy (bits)
  of the whole-set token distribution — what an ideal order-0 entropy coder would need, a lower
  bound for it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from skimage.metrics import structural_similarity
from tqdm import tqdm

from service.cli_parser import CliParser
from service.images import pad_to_multiple as pad_array
from service.images import psnr_from_mse, unit_pixels
from training.cli_errors import user_error
from training.config import ConfigError
from training.data import open_source
from training.eval_report import format_metric, write_report
from training.rate_distortion import codec_table
from vqmodel import CheckpointError, UsageAccumulator, load_metadata, load_model
from vqmodel.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from vqmodel.vqvae import ModelConfig

SSIM_WINDOW = 7
DEFAULT_DATA = "pip-photos"
METRICS_LOG = "metrics.jsonl"
CONVENTIONS = {
    "padding": "edge (bottom/right) to a multiple of f, cropped back: the service's resize=pad",
    "psnr": "per image, data_range 1, then mean over images",
    "ssim": "skimage structural_similarity, data_range=1, channel_axis=-1, 7x7 uniform",
    "usage": "fraction of codes used at least once over the whole set",
    "bpp_fixed": "log2(K)/f^2: fixed-length tokens",
    "bpp_entropy": "H/f^2, H the empirical whole-set token entropy in bits",
}


class Tokenizer(Protocol):
    """What :func:`evaluate` needs: a config with f and K, and the encode/decode pair."""

    config: ModelConfig

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...


# -- metrics ---------------------------------------------------------------------------------------
def ssim(original: np.ndarray, reconstruction: np.ndarray) -> float | None:
    """SSIM of two float [3,H,W] images in [0,1] (see the module docstring); None below 3×3."""
    x = np.ascontiguousarray(original.transpose(1, 2, 0), dtype=np.float64)
    y = np.ascontiguousarray(reconstruction.transpose(1, 2, 0), dtype=np.float64)
    side = min(x.shape[0], x.shape[1])
    window = min(SSIM_WINDOW, side if side % 2 else side - 1)
    if window < 3:
        return None
    return float(structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=window))


def pad_to_multiple(images: torch.Tensor, f: int) -> torch.Tensor:
    """[N,C,H,W] padded on the bottom/right to multiples of ``f`` by the service's ``pad`` policy
    (``service.images.pad_to_multiple``), so evaluation encodes what the service would."""
    n, c, h, w = images.shape
    hwc = images.detach().cpu().permute(2, 3, 0, 1).reshape(h, w, n * c).numpy()
    padded = pad_array(hwc, f)
    if padded is hwc:  # already a multiple of f
        return images
    nchw = torch.from_numpy(padded).reshape(*padded.shape[:2], n, c).permute(2, 3, 0, 1)
    return nchw.contiguous().to(images.device)


def _as_chw_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(
            f"expected an image float [3,H,W] in [0,1], got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    return tensor.float()


def same_shape_batches(
    images: Iterable[np.ndarray | torch.Tensor], names: Iterable[str], batch_size: int
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Group consecutive images of equal size into batches of at most ``batch_size``."""
    batch: list[torch.Tensor] = []
    batch_names: list[str] = []
    for name, image in zip(names, images):
        tensor = _as_chw_float(image)
        if batch and (tensor.shape != batch[0].shape or len(batch) == batch_size):
            yield batch_names, torch.stack(batch)
            batch, batch_names = [], []
        batch.append(tensor)
        batch_names.append(name)
    if batch:
        yield batch_names, torch.stack(batch)


@torch.no_grad()
def reconstruct(model: Tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N,3,H,W] in [0,1] at any size -> (reconstructions [N,3,H,W], tokens [N,⌈H/f⌉,⌈W/f⌉])."""
    h, w = images.shape[-2:]
    tokens = model.encode(pad_to_multiple(images, model.config.downsample))
    return model.decode(tokens)[..., :h, :w].clamp(0.0, 1.0), tokens


def evaluate(
    model: Tokenizer,
    images: Iterable[np.ndarray | torch.Tensor],
    *,
    names: Iterable[str] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    keep_samples: int = 0,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Reconstruct every image at native size and measure it (conventions: module docstring).

    Args:
        model: a :class:`vqmodel.VQVAE` (or anything with ``config``, ``encode``, ``decode``);
            put in eval mode here.
        images: float [3,H,W] in [0,1] (numpy or torch; uint8 is scaled by 1/255), any sizes.
            Consecutive images of equal size are batched together.
        names: one per image (default "0", "1", ...).
        device: where to run the model; default: where its parameters are.
        keep_samples: keep (name, original, reconstruction) float32 [3,H,W] numpy arrays of the
            first this-many images under ``"samples"`` (for plots; not JSON).
        total: number of images, for the progress bar when ``images`` has no len().

    Returns:
        A dict: ``images``, ``pixels``, ``tokens``, ``mse`` (mean of per-image MSE), ``psnr``
        (mean of per-image PSNR), ``ssim`` (mean), ``usage`` (fraction of codes used over the whole
        set), ``perplexity``, ``dead_codes``, ``num_codes``, ``downsample``, ``bpp_fixed``,
        ``bpp_entropy``, ``entropy_bits``, ``per_image`` (name, size, mse, psnr, ssim, and
        ``codes_used`` in that image alone), ``code_counts`` (K ints), ``conventions``,
        ``seconds``, and ``samples`` when asked for.
    """
    device = _place(model, device)
    if total is None and isinstance(images, Sequence):
        total = len(images)
    names_iter = names if names is not None else (str(i) for i in itertools.count())
    accumulator = UsageAccumulator(model.config.quantizer.num_codes)
    per_image: list[dict[str, Any]] = []
    samples: list[tuple[str, np.ndarray, np.ndarray]] = []
    pixels = 0
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc="evaluate", disable=not progress) as bar:
        for batch_names, batch in same_shape_batches(images, names_iter, batch_size):
            recon, tokens = reconstruct(model, batch.to(device))
            recon, tokens = recon.float().cpu(), tokens.cpu()
            accumulator.update(tokens)
            pixels += batch.shape[0] * batch.shape[-2] * batch.shape[-1]
            per_image += measure(batch_names, batch, recon, tokens)
            for i, name in enumerate(batch_names[: max(0, keep_samples - len(samples))]):
                samples.append((name, batch[i].numpy(), recon[i].numpy()))
            bar.update(len(batch_names))
            psnr = np.mean([r["psnr"] for r in per_image])
            bar.set_postfix(psnr=f"{psnr:.2f}", usage=f"{accumulator.usage:.1%}")
    if not per_image:
        raise ValueError("evaluate() got no images")
    result = summarise(per_image, accumulator, model.config, pixels, time.perf_counter() - start)
    if keep_samples:
        result["samples"] = samples
    return result


def _place(model: Tokenizer, device: str | torch.device | None) -> torch.device:
    """Eval mode, on ``device`` (default: where the model's parameters are)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
        if device is not None:
            model.to(device)
        else:
            device = next(iter(model.parameters()), torch.empty(0)).device
    return torch.device(device or "cpu")


def measure(
    names: list[str], batch: torch.Tensor, recon: torch.Tensor, tokens: torch.Tensor
) -> list[dict[str, Any]]:
    """The per-image rows of one batch (originals, reconstructions, tokens; all on the CPU)."""
    mse = ((recon.double() - batch.double()) ** 2).mean(dim=(1, 2, 3)).tolist()
    return [
        {
            "name": name,
            "height": int(batch.shape[-2]),
            "width": int(batch.shape[-1]),
            "mse": mse[i],
            "psnr": psnr_from_mse(mse[i]),
            "ssim": ssim(batch[i].numpy(), recon[i].numpy()),
            "codes_used": int(tokens[i].unique().numel()),
        }
        for i, name in enumerate(names)
    ]


def summarise(
    per_image: list[dict[str, Any]],
    accumulator: UsageAccumulator,
    config: ModelConfig,
    pixels: int,
    seconds: float,
) -> dict[str, Any]:
    """The whole set's numbers: means of the per-image rows, usage and bits from all tokens."""
    num_codes, f = config.quantizer.num_codes, config.downsample
    ssims = [r["ssim"] for r in per_image if r["ssim"] is not None]
    entropy_bits = math.log2(accumulator.perplexity) if accumulator.perplexity > 0 else 0.0
    return {
        "images": len(per_image),
        "pixels": pixels,
        "tokens": int(accumulator.counts.sum()),
        "mse": float(np.mean([r["mse"] for r in per_image])),
        "psnr": float(np.mean([r["psnr"] for r in per_image])),
        "ssim": float(np.mean(ssims)) if ssims else None,
        "usage": accumulator.usage,
        "perplexity": accumulator.perplexity,
        "dead_codes": accumulator.dead_codes,
        "num_codes": num_codes,
        "downsample": f,
        "bpp_fixed": math.log2(num_codes) / f**2,
        "bpp_entropy": entropy_bits / f**2,
        "entropy_bits": entropy_bits,
        "seconds": seconds,
        "conventions": dict(CONVENTIONS),
        "per_image": per_image,
        "code_counts": accumulator.counts.tolist(),
    }


# -- locating the model ----------------------------------------------------------------------------
def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The model directory ``path`` names: a checkpoint dir or an exported model dir (both hold
    config.json + weights.safetensors), or a run dir, whose ``checkpoints/best`` is used, else
    ``checkpoints/latest``, else the last checkpoint directory by name."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CHECKPOINT {path} does not exist")
    if _is_model_dir(path):
        return path
    checkpoints = path / "checkpoints"
    for name in ("best", "latest"):
        if _is_model_dir(checkpoints / name):
            return checkpoints / name
    if checkpoints.is_dir():
        found = sorted(p for p in checkpoints.iterdir() if _is_model_dir(p))
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"CHECKPOINT {path} is neither a model dir ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a run dir "
        "with checkpoints/best, checkpoints/latest or checkpoints/<name>/ model dirs"
    )


def find_metrics_log(model_dir: Path, given: Path) -> Path | None:
    """The training log ``metrics.jsonl`` of the run ``model_dir`` belongs to, if any."""
    for candidate in (given, model_dir, *list(model_dir.parents)[:3]):
        if (candidate / METRICS_LOG).is_file():
            return candidate / METRICS_LOG
    return None


def load_eval_set(
    spec: str, limit: int | None = None, key: str = "--data"
) -> tuple[list[str], list[np.ndarray]]:
    """Names and float32 [3,H,W] images in [0,1] at native size from a training.data source.

    A source that is unknown, not installed or empty is a :class:`ConfigError` naming ``key``.
    """
    names, images = [], []
    for name, rgb in open_source(spec, key).images():
        if limit is not None and len(images) >= limit:
            break
        names.append(name)
        images.append(unit_pixels(rgb))
    if not images:
        raise ConfigError(f"{key}={spec!r} yielded no readable images")
    return names, images


def codec_comparison(images: list[np.ndarray], result: dict[str, Any]) -> list[dict[str, Any]]:
    """JPEG/WebP/AVIF PSNR on the same images at the tokens' two bit rates."""
    rgb = [np.round(image.transpose(1, 2, 0) * 255.0).astype(np.uint8) for image in images]
    targets = {
        "tokens, fixed-length": result["bpp_fixed"],
        "tokens, entropy": result["bpp_entropy"],
    }
    return codec_table(rgb, targets)


# -- CLI -------------------------------------------------------------------------------------------
def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="vqtok-eval",
        description="Evaluate a tokenizer checkpoint at native image size and write a report.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint dir, exported model dir, or run dir (uses checkpoints/best or latest)",
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"image source (training.data spec), default {DEFAULT_DATA}",
    )
    parser.add_argument("--out", help="report directory (default: <CHECKPOINT>/eval)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=8, help="images per same-size batch")
    parser.add_argument("--grid", type=int, default=4, help="images in the reconstruction grid")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-codecs",
        action="store_true",
        help="skip the JPEG/WebP/AVIF comparison at the tokens' bits per pixel",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, or 2 with one line on stderr for a user error (a missing or unreadable
    checkpoint, a data source not installed here, a bad flag value)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, CheckpointError, OSError) as err:
        return user_error("vqtok-eval", err)


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    given = Path(args.checkpoint)
    model_dir = resolve_checkpoint(given)
    device = _pick_device(args.device)
    model, config = load_model(model_dir, map_location=device)
    names, images = load_eval_set(args.data, args.limit)
    result = evaluate(
        model,
        images,
        names=names,
        batch_size=args.batch_size,
        device=device,
        keep_samples=max(args.grid, 0),
        progress=not args.no_progress,
    )
    try:
        metadata = load_metadata(model_dir)
    except ValueError:
        metadata = {}
    extra = {
        "model": {"path": str(model_dir), "config": config.model_dump(), "metadata": metadata},
        "data": args.data,
        "device": str(device),
    }
    if not args.no_codecs:
        extra["rate_distortion"] = codec_comparison(images, result)
    out = Path(args.out) if args.out else given / "eval"
    written = write_report(result, out, metrics_log=find_metrics_log(model_dir, given), extra=extra)
    fmt = format_metric
    print(
        f"{result['images']} images: PSNR {fmt(result['psnr'], '.2f')} dB, "
        f"SSIM {fmt(result['ssim'], '.4f')}, usage {result['usage']:.1%} "
        f"({result['dead_codes']} dead), perplexity {result['perplexity']:.1f}, "
        f"bpp {result['bpp_fixed']:.4f} fixed / {result['bpp_entropy']:.4f} entropy"
    )
    print(f"report: {written['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
