"""The training loop: one function, read top to bottom.

    summary = train(load_config("training/configs/tiny.yaml"), resume=True)

Modes (``TrainConfig.mode``):
  standard     one AdamW over encoder, decoder and codebook; loss = recon + alpha * L_vq
  alternating  the paper's two-pass coordinate descent: codebook step, re-assignment, model step
  inplace      the quantizer's in-place codebook step runs inside its forward (own optimizer)

Runs on 1 process or N under torchrun with the same code (training/ddp.py); only rank 0 writes
the run directory (training/run_dir.py). SIGINT/SIGTERM and ``time_limit_s`` end the run after the
current step with a checkpoint; ``resume=True`` continues exactly from the newest checkpoint.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from training import ddp
from training.config import ConfigError, OptimConfig, TrainConfig
from training.data import build_patch_bank, make_patch_loader
from training.run_dir import RunDir
from vqmodel import UsageAccumulator, capture_rng_state, load_model, restore_rng_state
from vqmodel.vqvae import VQVAE


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` and return a summary: step, final metrics, run dir, last and best
    checkpoint paths, mean seconds per step, and why it stopped (completed | signal | time_limit).
    """
    cfg = config
    started = time.monotonic()
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # on a shared CPU fewer threads can be much faster
    runtime = ddp.setup(cfg.device)
    device, is_main = runtime.device, runtime.is_main
    run = RunDir(cfg.out_dir)
    stop = StopRequest()
    writer = bar = None
    try:
        run.check(cfg, resume)  # on every rank, so a refusal stops them all
        ddp.barrier()
        if is_main:
            run.write_config(cfg)

        # -- model and optimisers ---------------------------------------------------------------
        torch.manual_seed(cfg.seed)
        model = VQVAE(cfg.model).to(device).train()
        ddp.broadcast_module_(model)
        quantizer, beta = model.quantizer, cfg.model.quantizer.beta
        optimizer, codebook_optimizer = build_optimizers(model, cfg)
        optimizers = [o for o in (optimizer, codebook_optimizer) if o is not None]
        lr_lambda = partial(lr_factor, optim=cfg.optim, total_steps=cfg.steps)
        schedulers = [LambdaLR(o, lr_lambda) for o in optimizers]
        # dead-code replacement and k-means init reset the per-code state of whoever owns C
        quantizer.attach_optimizer(codebook_optimizer or optimizer)
        model_params = [p for group in optimizer.param_groups for p in group["params"]]
        encode, decode = model.encode_features, model.decode_features
        if cfg.compile:
            encode, decode = torch.compile(encode), torch.compile(decode)
        autocast = (
            partial(torch.autocast, "cuda", dtype=torch.bfloat16)
            if cfg.amp and device.type == "cuda"
            else nullcontext
        )

        # -- data: rank 0 builds the cached patch bank, the others then map the same file --------
        bank = None
        for builder in (True, False):
            if is_main == builder:
                bank = build_patch_bank(
                    cfg.data.source,
                    patch_size=cfg.data.patch_size,
                    count=cfg.data.bank_size,
                    seed=cfg.data.seed,
                    short_side=cfg.data.short_side,
                    cache_dir=cfg.data.cache_dir,
                    progress=progress and is_main,
                )
            ddp.barrier()
        batches = PatchStream(bank, cfg, runtime.world_size)

        # -- resume -----------------------------------------------------------------------------
        step, best_recon, window = 0, math.inf, Window(cfg.model.quantizer.num_codes)
        wall_before = 0.0  # wall time of the earlier invocations of a resumed run
        found = run.resumable_checkpoint() if resume else None
        if found is not None:
            path, state = found
            loaded, _ = load_model(path, map_location=device)
            model.load_state_dict(loaded.state_dict())
            restore_training_state(state, model, optimizers, schedulers, batches, window, device)
            step, best_recon = int(state["step"]), float(state["best_recon"])
            wall_before = float(state.get("wall_s", 0.0))  # absent before 2026-11-27 03:40
        if is_main:
            run.truncate_metrics_after(step)  # drop what the interrupted run logged after it
        if is_main and step:
            print(f"resumed {cfg.out_dir} at step {step} from {found[0]}", flush=True)

        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events an interrupted run wrote after its last checkpoint
            writer = SummaryWriter(str(run.tb_dir), purge_step=step + 1)
        bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and is_main), unit="step")
        stop.install()
        last_ckpt, best_ckpt, record = None, None, None
        stopped, seconds_total, steps_run = "completed", 0.0, 0

        # -- the loop ---------------------------------------------------------------------------
        while step < cfg.steps:
            t0 = time.perf_counter()
            x = next(batches).to(device, non_blocking=True)

            with autocast():
                z = encode(x)
                if cfg.mode == "alternating":
                    # Two-pass alternating optimisation, z = E(x) computed once:
                    # (1) C, A <- AdamW step on  beta * mean||sg(z) - A(C)_q||^2
                    # (2) re-assign q with the UPDATED A(C), then E, D <- AdamW step on
                    #     recon(D(q), x) + alpha * (1 - beta) * mean||z - sg(q)||^2
                    # (the codebook term is (1)'s alone; the sync term's nu x task gradient
                    # lands on C and is applied with the next (1))
                    quantizer.codebook_step(z, codebook_optimizer)
                z_q, info = quantizer(z)  # inplace mode: the codebook step happens in here
                x_hat = decode(z_q)
            recon = reconstruction_loss(x_hat.float(), x, cfg.loss)
            vq = info["loss"] if cfg.mode != "alternating" else (1 - beta) * info["loss_commitment"]
            loss = recon + cfg.alpha * vq.float()

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ddp.all_reduce_gradients_(model_params)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model_params, cfg.optim.grad_clip)
                if cfg.optim.grad_clip > 0
                else None
            )
            optimizer.step()
            lr = schedulers[0].get_last_lr()[0]  # the rate this step used
            for scheduler in schedulers:
                scheduler.step()
            step += 1

            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step}; lower optim.lr or raise "
                    f"optim.warmup_steps, then --resume from the last checkpoint"
                )
            psnr = batch_psnr(x_hat.detach().float(), x)
            seconds = time.perf_counter() - t0
            seconds_total, steps_run = seconds_total + seconds, steps_run + 1
            window.add(loss, recon, vq, info["indices"], psnr, seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.2f}", usage=info["usage"])

            # -- log, images, checkpoints (every rank joins the all-reduces; rank 0 writes) -------
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = window.summary(step, device)
                record["lr"] = lr
                window.reset()
                if is_main:
                    run.append_metrics(record)
                    log_scalars(writer, record, model, grad_norm, codebook_optimizer)
                    if record["recon"] < best_recon:
                        best_recon = record["recon"]
                        best_ckpt = run.save_best(model, {"step": step, "train_recon": best_recon})
            if is_main and cfg.image_every and step % cfg.image_every == 0:
                writer.add_image("reconstruction", image_grid(x, x_hat), step)

            stop_now = ddp.any_rank(stop.requested or stop.time_up(started, cfg), device)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now:
                wall_s = wall_before + time.monotonic() - started
                state = training_state(
                    step, best_recon, model, optimizers, schedulers, batches, window
                )
                state["wall_s"] = wall_s
                digests = ddp.digests_by_rank(model, device)
                if len(set(digests)) > 1:
                    warnings.warn(f"ranks hold different weights: {digests}", stacklevel=1)
                if is_main:
                    meta = {
                        "step": step,
                        "mode": cfg.mode,
                        "wall_s": round(wall_s, 1),
                        "device": device_name(device),
                        "world_size": runtime.world_size,
                        "torch": torch.__version__,
                        "command": " ".join(sys.argv),
                        "rank_digests": digests,
                    }
                    last_ckpt = run.save_step(step, model, state, meta, cfg.keep_last)
            if stop_now:
                stopped = "signal" if stop.requested else "time_limit"
                break

        if best_ckpt is None and run.best.exists():
            best_ckpt = run.best
        if last_ckpt is None and run.latest.exists():
            last_ckpt = run.latest.resolve()
        return {
            "step": step,
            "metrics": record,
            "run_dir": str(run.root),
            "last_checkpoint": str(last_ckpt) if last_ckpt else None,
            "best_checkpoint": str(best_ckpt) if best_ckpt else None,
            "sec_per_step": seconds_total / steps_run if steps_run else None,
            "wall_s": wall_before + time.monotonic() - started,
            "stopped": stopped,
            "signal": stop.signum,
            "rank": runtime.rank,
            "world_size": runtime.world_size,
        }
    finally:
        torch.set_num_threads(threads_before)
        stop.restore()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ddp.teardown()


# -- optimisers and schedule -----------------------------------------------------------------------
def build_optimizers(
    model: VQVAE, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """(model optimizer, codebook optimizer or None).

    Conv weights decay; biases, norms and the codebook (+ affine) never do. In alternating mode
    the codebook has its own AdamW (``optim.codebook_lr``) and the model optimizer holds encoder
    and decoder only; otherwise one AdamW holds everything (in inplace mode it applies the sync
    gradient nu x task gradient to the codes; the codebook term is the quantizer's inner step).
    """
    o = cfg.optim
    networks = [model.encoder, model.decoder]
    decay = [p for m in networks for p in m.parameters() if p.dim() > 1]
    no_decay = [p for m in networks for p in m.parameters() if p.dim() <= 1]
    codebook = model.quantizer.codebook_parameters()
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.mode == "alternating":
        codebook_optimizer = torch.optim.AdamW(
            codebook, lr=o.codebook_lr, betas=o.betas, weight_decay=0.0
        )
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas), codebook_optimizer
    groups.append({"params": codebook, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas), None


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 down to ``min_lr_ratio``."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (
        1.0 + math.cos(math.pi * progress)
    )


# -- losses and metrics ----------------------------------------------------------------------------
def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.mse_loss(x_hat, x) if kind == "mse" else F.l1_loss(x_hat, x)


def batch_psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE) (data range 1)."""
    mse = (x_hat.clamp(0, 1) - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((-10.0 * torch.log10(mse)).mean())


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


# -- data ------------------------------------------------------------------------------------------
class PatchStream:
    """Endless batches of the patch bank. Epoch e reads a fresh loader seeded by (data.seed, e),
    so the position (epoch, batches read) is all a resumed run needs to continue exactly."""

    def __init__(self, bank: np.ndarray, cfg: TrainConfig, world_size: int) -> None:
        per_rank = len(bank) // world_size
        if per_rank < cfg.data.batch_size:
            raise ConfigError(
                f"data.bank_size={len(bank)} gives {per_rank} patches per process, fewer than "
                f"data.batch_size={cfg.data.batch_size}: no full batch per epoch"
            )
        self.bank, self.data = bank, cfg.data
        self.epoch, self.batch = 0, 0
        self._batches = None

    def __next__(self) -> torch.Tensor:
        if self._batches is None:
            seed = int(np.random.SeedSequence([self.data.seed, self.epoch]).generate_state(1)[0])
            loader = make_patch_loader(
                self.bank, batch_size=self.data.batch_size, seed=seed, num_workers=self.data.workers
            )
            self._batches = iter(loader)
            for _ in range(self.batch):  # resuming mid-epoch: skip what was already trained on
                next(self._batches)
        try:
            x = next(self._batches)
        except StopIteration:
            self.epoch, self.batch, self._batches = self.epoch + 1, 0, None
            return next(self)
        self.batch += 1
        return x

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._batches = int(state["epoch"]), int(state["batch"]), None


# -- checkpoint state ------------------------------------------------------------------------------
def training_state(
    step: int,
    best_recon: float,
    model: VQVAE,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[LambdaLR],
    batches: PatchStream,
    window: Window,
) -> dict[str, Any]:
    """Everything besides the weights (and buffers) that a run needs to continue exactly."""
    books = list(model.quantizer.codebooks)
    return {
        "step": step,
        "best_recon": best_recon,
        "optimizers": [o.state_dict() for o in optimizers],
        "schedulers": [s.state_dict() for s in schedulers],
        # the in-place mode's per-codebook optimizers, and k-means samples still being collected
        "inner_optimizers": [b.inner_optimizer.state_dict() if b.inner_optimizer else {}
                             for b in books],
        "kmeans_samples": [[s.cpu() for s in b._kmeans_samples] for b in books],
        # alternating mode: the sync gradient waiting on the codebook for the next step (1)
        "codebook_grads": [p.grad for p in model.quantizer.codebook_parameters()],
        "data": batches.state_dict(),
        "window": window.state_dict(),
        "rng": capture_rng_state(),
    }  # fmt: skip


def restore_training_state(
    state: dict[str, Any],
    model: VQVAE,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[LambdaLR],
    batches: PatchStream,
    window: Window,
    device: torch.device,
) -> None:
    if len(state["optimizers"]) != len(optimizers):
        raise ConfigError(
            f"mode: the checkpoint holds {len(state['optimizers'])} optimizer(s), this mode uses "
            f"{len(optimizers)}; resume with the mode the run was started with"
        )
    for obj, saved in zip(optimizers, state["optimizers"]):
        obj.load_state_dict(saved)
    for obj, saved in zip(schedulers, state["schedulers"]):
        obj.load_state_dict(saved)
    for book, inner, samples in zip(
        model.quantizer.codebooks, state["inner_optimizers"], state["kmeans_samples"]
    ):
        if book.inner_optimizer is not None and inner:
            book.inner_optimizer.load_state_dict(inner)
        book._kmeans_samples = [s.to(device) for s in samples]
    for param, grad in zip(model.quantizer.codebook_parameters(), state["codebook_grads"]):
        param.grad = None if grad is None else grad.to(device)
    batches.load_state_dict(state["data"])
    window.load_state_dict(state["window"])
    restore_rng_state(state["rng"])


# -- stopping --------------------------------------------------------------------------------------
class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step (checkpoint, then exit); a
    second signal gets the default behaviour (immediate interrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling, nothing to restore
            self._previous.clear()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.restore()

    @staticmethod
    def time_up(started: float, cfg: TrainConfig) -> bool:
        return cfg.time_limit_s is not None and time.monotonic() - started >= cfg.time_limit_s


def device_name(device: torch.device) -> str:
    """ "cpu (N threads)" or the CUDA device's product name, for checkpoint metadata."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# -- TensorBoard -----------------------------------------------------------------------------------
def log_scalars(
    writer: Any,
    record: dict[str, Any],
    model: VQVAE,
    grad_norm: torch.Tensor | None,
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


def image_grid(x: torch.Tensor, x_hat: torch.Tensor, count: int = 8) -> torch.Tensor:
    """[3, 2H, n*W]: n originals on top, their reconstructions below."""
    top = torch.cat(list(x[:count].detach().float().cpu()), dim=2)
    bottom = torch.cat(list(x_hat[:count].detach().float().clamp(0, 1).cpu()), dim=2)
    return torch.cat([top, bottom], dim=1)
