"""What a training run reports while it runs: the metrics window (one metrics.jsonl line per
``log_every`` steps), TensorBoard scalars and reconstruction grids, and the progress bar.

Every rank keeps a :class:`Window` (its summary all-reduces over ranks); only rank 0 writes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from training import ddp
from training.run_dir import RunDir
from vqmodel import UsageAccumulator
from vqmodel.vqvae import VQVAE


class Window:
    """Sums over the steps since the last log line; usage from a UsageAccumulator over all of them
    (whole-window numbers, not one batch's), averaged / summed over ranks when logged."""

    KEYS = ("loss", "recon", "vq", "psnr")

    def __init__(self, num_codes: int) -> None:
        self.usage = UsageAccumulator(num_codes)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64)
        self.steps, self.seconds = 0, 0.0
        self.usage.reset()

    def add(
        self, loss: Tensor, recon: Tensor, vq: Tensor, indices: Tensor, psnr: float, sec: float
    ) -> None:
        values = [loss.item(), recon.item(), vq.item(), psnr]
        self.sums += torch.tensor(values, dtype=torch.float64)
        self.steps += 1
        self.seconds += sec
        self.usage.update(indices)

    def summary(self, step: int, device: torch.device) -> dict[str, Any]:
        """The metrics.jsonl line (without lr): means over ranks and steps, pooled usage."""
        totals = torch.cat([self.sums, torch.tensor([self.steps, self.seconds])]).to(device)
        totals = ddp.all_reduce_sum_(totals).cpu()
        counts = ddp.all_reduce_sum_(self.usage.counts.to(device)).cpu()
        pooled = UsageAccumulator(self.usage.num_codes)
        pooled.counts = counts
        n = max(1.0, float(totals[-2]))
        record: dict[str, Any] = {"step": step, "split": "train"}
        record.update({k: float(totals[i]) / n for i, k in enumerate(self.KEYS)})
        record.update(pooled.summary())
        record["sec_per_step"] = float(totals[-1]) / n
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.clone(), "steps": self.steps, "seconds": self.seconds,
                "usage": self.usage.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = state["sums"].clone().double()
        self.steps, self.seconds = int(state["steps"]), float(state["seconds"])
        self.usage.load_state_dict(state["usage"])


class TrainLog:
    """The run's outputs besides checkpoints; on ranks other than 0 (``writes=False``) the calls
    do nothing."""

    def __init__(self, run: RunDir, steps: int, start: int, *, writes: bool, progress: bool):
        self.run, self.writes, self.writer = run, writes, None
        if writes:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events an interrupted run wrote after its last checkpoint
            self.writer = SummaryWriter(str(run.tb_dir), purge_step=start + 1)
        self.bar = tqdm(total=steps, initial=start, disable=not (progress and writes), unit="step")

    def step(self, loss: Tensor, psnr: float, usage: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.2f}", usage=usage)

    def window(
        self,
        record: dict[str, Any],
        model: VQVAE,
        grad_norm: Tensor | None,
        codebook_optimizer: torch.optim.Optimizer | None,
    ) -> None:
        if self.writes:
            self.run.append_metrics(record)
            log_scalars(self.writer, record, model, grad_norm, codebook_optimizer)

    def image(self, x: Tensor, x_hat: Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image("reconstruction", image_grid(x, x_hat), step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def log_scalars(
    writer: Any,
    record: dict[str, Any],
    model: VQVAE,
    grad_norm: Tensor | None,
    codebook_optimizer: torch.optim.Optimizer | None,
) -> None:
    step = record["step"]
    for key in ("loss", "recon", "vq", "psnr"):
        writer.add_scalar(f"train/{key}", record[key], step)
    for key in ("usage", "perplexity", "dead_codes"):
        writer.add_scalar(f"codebook/{key}", record[key], step)
    writer.add_scalar("optim/lr", record["lr"], step)
    writer.add_scalar("optim/sec_per_step", record["sec_per_step"], step)
    if grad_norm is not None:
        writer.add_scalar("optim/grad_norm", float(grad_norm), step)
    if codebook_optimizer is not None:
        writer.add_scalar("optim/codebook_lr", codebook_optimizer.param_groups[0]["lr"], step)
    for i, book in enumerate(model.quantizer.codebooks):
        params = book.affine.scale_and_bias()
        if params is None:
            continue
        scale, bias = (t.detach().float() for t in params)
        for name, value in (("scale", scale), ("bias", bias)):
            writer.add_scalar(f"affine/{i}/{name}_mean", float(value.mean()), step)
            writer.add_scalar(f"affine/{i}/{name}_std", float(value.std(unbiased=False)), step)


def image_grid(x: Tensor, x_hat: Tensor, count: int = 8) -> Tensor:
    """[3, 2H, n*W]: n originals on top, their reconstructions below."""
    top = torch.cat(list(x[:count].detach().float().cpu()), dim=2)
    bottom = torch.cat(list(x_hat[:count].detach().float().clamp(0, 1).cpu()), dim=2)
    return torch.cat([top, bottom], dim=1)
