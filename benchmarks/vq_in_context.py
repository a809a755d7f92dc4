"""The quantizer inside a real model: one training step of a small MNIST-sized autoencoder with
our VectorQuantizer vs the VQTorch-style reference layer (benchmarks/vq_layer.py), in one process.

    .venv/bin/python -m benchmarks.vq_in_context              # 30 rounds per option set
    .venv/bin/python -m benchmarks.vq_in_context --quick      # smoke test

The model (written here, shaped like VQTorch's examples/autoencoder.py): 1x28x28 -> conv 16 ->
pool -> conv 32 -> pool -> 32x7x7 codes (256 codes of 32 dims) -> upsample/conv back to 1x28x28;
batch 256, AdamW, loss mse + vq loss; random inputs (the step's cost does not depend on them).
A step is forward + backward + optimizer step. The same comparison runs inside the project's own
VQ-VAE (the default recipe's widths, a batch of 16 crops of 64x64): ``--models vqvae``.
Implementations alternate step by step (A B C A B C) after a warm-up, median and min per option
set; target (issue 14): ours <= 0.8x the reference. The third, ``floor``, is the same model
with no quantizer at all (z passes through, channels last, zero vq loss): ``floor / reference``
is the smallest ratio any quantizer could reach in that model.
Output: a markdown table, then exactly one final line of JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.vq_layer import ReferenceVQ
from training.config import load_config
from vqmodel import VQVAE, VectorQuantizer

DEFAULT_RECIPE = "training/configs/default.yaml"

CODES, DIM, BETA = 256, 32, 0.95
OPTION_SETS = {
    "plain": {"affine_lr": 0.0, "sync_nu": 0.0, "replace_freq": 0},
    "sync + affine": {"affine_lr": 1.0, "sync_nu": 0.2, "replace_freq": 0},
}


class AutoEncoder(nn.Module):
    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, DIM, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(DIM, 16, 3, padding=1), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(16, 1, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, info = self.quantizer(self.encoder(x))
        return self.decoder(z_q), info["loss"]


class VQVAEWith(nn.Module):
    """The project's VQ-VAE of the default recipe (training/configs/default.yaml: f = 8, widths
    32-64-128, channel norm, code dim 16) with the given quantizer between encoder and decoder."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.net = VQVAE(load_config(DEFAULT_RECIPE).model)
        self.net.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, info = self.net.quantizer(self.net.encode_features(x))
        return self.net.decode_features(z_q), info["loss"]


# model -> (module, codes, dim, one input batch): MNIST-sized autoencoder, the project's VQ-VAE
MODELS = {
    "autoencoder": (AutoEncoder, CODES, DIM, (256, 1, 28, 28)),
    "vqvae": (VQVAEWith, 1024, 16, (16, 3, 64, 64)),  # the default recipe's batch of crops
}


class NoQuantizer(nn.Module):
    """The floor: z passed through (one copy into the channels-last layout both quantizers return,
    in which the decoder's convs are fastest on CPU) and a zero vq loss."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return z.contiguous(memory_format=torch.channels_last), {"loss": z.new_zeros(())}


IMPLEMENTATIONS = ("ours", "reference", "floor")


def build(name: str, options: dict, model: str = "autoencoder") -> nn.Module:
    wrap, codes, dim, _ = MODELS[model]
    if name == "floor":
        layer: nn.Module = NoQuantizer()
    elif name == "reference":
        layer = ReferenceVQ(codes, dim, BETA, **options)
    elif options["affine_lr"] > 0:
        layer = VectorQuantizer(num_codes=codes, dim=dim, beta=BETA, affine="learned", **options)
    else:
        layer = VectorQuantizer(num_codes=codes, dim=dim, beta=BETA)
    return wrap(layer)


def step_fn(model: nn.Module) -> Callable[[torch.Tensor], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor) -> None:
        x_hat, vq_loss = model(x)
        loss = F.mse_loss(x_hat, x) + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_set(
    options: dict, rounds: int, warmup: int, model: str = "autoencoder"
) -> dict[str, list[float]]:
    torch.manual_seed(0)
    x = torch.rand(*MODELS[model][3])
    steps = {name: step_fn(build(name, options, model)) for name in IMPLEMENTATIONS}
    for step in steps.values():
        for _ in range(warmup):
            step(x)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="autoencoder,vqvae", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up step")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    rows = {}
    print(
        "| model | option set | ours median (min) ms | reference median (min) ms "
        "| floor (no quantizer) median (min) ms | ours / reference | floor / reference |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for model, name in itertools.product(args.models.split(","), OPTION_SETS):
        options = OPTION_SETS[name]
        times = time_set(options, args.rounds, args.warmup, model)
        row = {}
        for k in IMPLEMENTATIONS:
            row[f"{k}_ms"] = 1000 * statistics.median(times[k])
            row[f"{k}_min_ms"] = 1000 * min(times[k])
        row["ratio"] = row["ours_ms"] / row["reference_ms"]
        row["floor_ratio"] = row["floor_ms"] / row["reference_ms"]
        rows[f"{model}: {name}"] = row
        cells = [f"{row[f'{k}_ms']:.1f} ({row[f'{k}_min_ms']:.1f})" for k in IMPLEMENTATIONS]
        print(
            f"| {model} | {name} | {' | '.join(cells)} "
            f"| {row['ratio']:.2f} | {row['floor_ratio']:.2f} |"
        )
    result = {"benchmark": "vq_in_context", "threads": args.threads, "rounds": args.rounds}
    print(json.dumps(result | {"rows": rows, "target": 0.8}))


if __name__ == "__main__":
    main()
