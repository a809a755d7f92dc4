"""The training loop: one function, read top to bottom.

    summary = train(load_config("training/configs/tiny.yaml"), resume=True)

Modes (``TrainConfig.mode``):
  standard     one AdamW over encoder, decoder and codebook; loss = recon + alpha * L_vq
  alternating  the paper's two-pass coordinate descent: codebook step, re-assignment, model step
  inplace      the quantizer's in-place codebook step runs inside its forward (own optimizer)

Runs on 1 process or N under torchrun with the same code (training/ddp.py); only rank 0 writes
the run directory (training/run_dir.py) and the logs (training/train_log.py); the batches come
from training/data/stream.py. SIGINT/SIGTERM and ``time_limit_s`` end the run after the current
step with a checkpoint; ``resume=True`` continues exactly from the newest checkpoint.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from service.images import psnr_from_mse
from training import ddp
from training.config import ConfigError, OptimConfig, TrainConfig
from training.data.stream import PatchStream, patch_stream
from training.records import command_line, git_state, hardware, utc_now
from training.run_dir import RunDir
from training.train_log import TrainLog, Window
from vqmodel import capture_rng_state, load_model, restore_rng_state
from vqmodel.vqvae import VQVAE


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` and return a summary: step, final metrics, run dir, last and best
    checkpoint paths, mean seconds per step, and why it stopped (completed | signal | time_limit).
    """
    cfg, started = config, time.monotonic()
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # on a shared CPU fewer threads can be much faster
    runtime = ddp.setup(cfg.device)
    device, is_main = runtime.device, runtime.is_main
    run, stop, log = RunDir(cfg.out_dir), StopRequest(), None
    try:
        run.check(cfg, resume)  # on every rank, so a refusal stops them all
        ddp.barrier()
        if is_main:
            run.write_config(cfg)
        parts = build_parts(cfg, device)
        batches = patch_stream(cfg.data, runtime, progress)
        state = RunState(window=Window(cfg.model.quantizer.num_codes))
        if resume:
            resume_from_checkpoint(run, state, parts, batches, cfg, is_main)
        state.invocations.append(invocation(state.step))
        if is_main:
            run.truncate_metrics_after(state.step)  # drop what the interrupted run logged after it
        log = TrainLog(run, cfg.steps, state.step, writes=is_main, progress=progress)
        stop.install()

        while state.step < cfg.steps:
            t0 = time.perf_counter()
            x = next(batches).to(device, non_blocking=True, memory_format=parts.memory_format)
            out = train_step(parts, x, cfg, state.step + 1)
            state.step = step = state.step + 1
            psnr = batch_psnr(out.x_hat, x)
            seconds = time.perf_counter() - t0
            state.seconds_total += seconds
            state.steps_run += 1
            state.window.add(out.loss, out.recon, out.vq, out.info["indices"], psnr, seconds)
            log.step(out.loss, psnr, out.info["usage"])

            # -- log, images, checkpoints (every rank joins the all-reduces; rank 0 writes) -------
            if step % cfg.log_every == 0 or step == cfg.steps:
                end_log_window(state, out, parts, run, log, device)
            if cfg.image_every and step % cfg.image_every == 0:
                log.image(x, out.x_hat, step)
            stop_now = ddp.any_rank(stop.requested or stop.time_up(started, cfg), device)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now:
                save_step_checkpoint(state, parts, batches, run, cfg, runtime, started)
            if stop_now:
                state.stopped = "signal" if stop.requested else "time_limit"
                break
        return run_summary(state, run, stop, runtime, started)
    finally:
        torch.set_num_threads(threads_before)
        stop.restore()
        if log is not None:
            log.close()
        ddp.teardown()


# -- the step --------------------------------------------------------------------------------------
@dataclass
class TrainParts:
    """The model and everything that updates it."""

    model: VQVAE
    optimizer: torch.optim.Optimizer  # encoder + decoder (+ codebook unless alternating)
    codebook_optimizer: torch.optim.Optimizer | None  # alternating mode's step (1)
    schedulers: list[LambdaLR]
    encode: Callable[[Tensor], Tensor]  # torch.compile'd with cfg.compile
    decode: Callable[[Tensor], Tensor]
    autocast: Callable[[], AbstractContextManager[Any]]
    memory_format: torch.memory_format  # the batches' layout (channels-last with the model's)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.optimizer, self.codebook_optimizer) if o is not None]

    @property
    def model_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass
class StepResult:
    loss: Tensor
    recon: Tensor
    vq: Tensor
    x_hat: Tensor  # detached, float32
    info: dict[str, Any]  # the quantizer's (indices, usage, ...)
    grad_norm: Tensor | None
    lr: float  # the rate this step used


# One step, z = E(x) computed once; q = the nearest code of z in the effective codebook A(C):
#   alternating  (1) C, A <- AdamW step on  beta * mean||sg(z) - A(C)_q||^2
#                (2) re-assign q with the UPDATED A(C), then E, D <- AdamW step on
#                    recon(D(q), x) + alpha * (1 - beta) * mean||z - sg(q)||^2
#                (the codebook term is (1)'s alone; the sync term's nu x task gradient lands on C
#                and is applied with the next (1))
#   standard     E, D, C, A <- one AdamW step on  recon(D(q), x) + alpha * L_vq
#   inplace      C's step runs inside the quantizer's forward; E, D <- recon + alpha * L_vq
# Nothing is stepped on a NaN/inf: z is checked before any codebook update (step (1), k-means,
# dead-code replacement all write z into C), the loss and gradients before the model step.
def train_step(parts: TrainParts, x: Tensor, cfg: TrainConfig, step: int) -> StepResult:
    quantizer, beta = parts.model.quantizer, cfg.model.quantizer.beta
    with parts.autocast():
        z = parts.encode(x)
        check_finite("the encoder output", z, step)
        if cfg.mode == "alternating":
            quantizer.codebook_step(z, parts.codebook_optimizer)  # (1)
        z_q, info = quantizer(z)  # (2); in inplace mode the codebook step happens in here
        x_hat = parts.decode(z_q)
    recon = reconstruction_loss(x_hat.float(), x, cfg.loss)
    vq = (1 - beta) * info["loss_commitment"] if cfg.mode == "alternating" else info["loss"]
    loss = recon + cfg.alpha * vq.float()

    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ddp.all_reduce_gradients_(parts.model_params)
    check_finite("loss", loss, step)
    grad_norm = None
    if cfg.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parts.model_params, cfg.optim.grad_clip)
        check_finite("the gradient norm", grad_norm, step)  # equal on every rank
    parts.optimizer.step()
    lr = parts.schedulers[0].get_last_lr()[0]
    for scheduler in parts.schedulers:
        scheduler.step()
    return StepResult(loss, recon, vq, x_hat.detach().float(), info, grad_norm, lr)


def check_finite(what: str, value: Tensor, step: int) -> None:
    """Raise FloatingPointError if ``value`` holds a NaN or an infinity (before any update)."""
    if bool(torch.isfinite(value).all()):
        return
    shown = value.item() if value.numel() == 1 else "not finite"
    raise FloatingPointError(
        f"{what} is {shown} at step {step}; lower optim.lr or raise optim.warmup_steps, "
        "then --resume from the last checkpoint"
    )


# -- model, optimisers and schedule ----------------------------------------------------------------
def build_parts(cfg: TrainConfig, device: torch.device) -> TrainParts:
    """The model (seeded, the same on every rank), its optimisers and their schedules."""
    torch.manual_seed(cfg.seed)
    model = VQVAE(cfg.model).to(device).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp.broadcast_module_(model)
    optimizer, codebook_optimizer = build_optimizers(model, cfg)
    lr_lambda = partial(lr_factor, optim=cfg.optim, total_steps=cfg.steps)
    schedulers = [LambdaLR(o, lr_lambda) for o in (optimizer, codebook_optimizer) if o is not None]
    # dead-code replacement and k-means init reset the per-code state of whoever owns C
    model.quantizer.attach_optimizer(codebook_optimizer or optimizer)
    encode, decode = model.encode_features, model.decode_features
    if cfg.compile:
        encode, decode = torch.compile(encode), torch.compile(decode)
    bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else nullcontext
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return TrainParts(
        model, optimizer, codebook_optimizer, schedulers, encode, decode, autocast, layout
    )


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
    """Mean over images of each image's PSNR (``service.images.psnr_from_mse``); an exact image
    counts as 100 dB (MSE floored at 1e-10) so one cannot make the window's mean infinite."""
    mse = (x_hat.clamp(0, 1) - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return statistics.fmean(psnr_from_mse(value) for value in mse.tolist())


# -- the run's progress, checkpoints and summary ---------------------------------------------------
@dataclass
class RunState:
    """Where the run is: what the loop carries from step to step (besides the model)."""

    window: Window
    step: int = 0
    best_recon: float = math.inf
    wall_before: float = 0.0  # wall time of the earlier invocations of a resumed run
    cpu_before: float = 0.0  # CPU seconds (all threads) of the earlier invocations
    started_at: str = field(default_factory=utc_now)  # the first invocation's start (UTC)
    cpu_started: float = field(default_factory=time.process_time)  # this invocation's start
    git: dict[str, Any] = field(default_factory=git_state)  # the tree this invocation started on
    # every invocation of the run so far (a resumed run's earlier ones from its checkpoint): the
    # command line, when it started and at which step, so a record shows each resume's changes
    invocations: list[dict[str, Any]] = field(default_factory=list)
    seconds_total: float = 0.0  # in the steps of this invocation
    steps_run: int = 0
    record: dict[str, Any] | None = None  # the last metrics.jsonl line
    last_ckpt: Path | None = None
    best_ckpt: Path | None = None
    stopped: str = "completed"  # | "signal" | "time_limit"


def end_log_window(
    state: RunState, out: StepResult, parts: TrainParts, run: RunDir, log: TrainLog, device: Any
) -> None:
    """The window's metrics line (all ranks reduce it; rank 0 writes it and, when its recon loss
    is the lowest so far, the best checkpoint)."""
    record = state.window.summary(state.step, device)
    record["lr"] = out.lr
    state.window.reset()
    state.record = record
    if not log.writes:
        return
    log.window(record, parts.model, out.grad_norm, parts.codebook_optimizer)
    if record["recon"] < state.best_recon:
        state.best_recon = record["recon"]
        metadata = {"step": state.step, "train_recon": state.best_recon}
        state.best_ckpt = run.save_best(parts.model, metadata)


def save_step_checkpoint(
    state: RunState,
    parts: TrainParts,
    batches: PatchStream,
    run: RunDir,
    cfg: TrainConfig,
    runtime: ddp.Runtime,
    started: float,
) -> None:
    """``checkpoints/step_N`` with everything a resume needs (every rank compares weights)."""
    wall_s = state.wall_before + time.monotonic() - started
    cpu_s = state.cpu_before + time.process_time() - state.cpu_started
    training = training_state(state, parts, batches)
    training.update(
        wall_s=wall_s, cpu_s=cpu_s, started_at=state.started_at, invocations=state.invocations
    )
    digests = ddp.digests_by_rank(parts.model, runtime.device)
    if len(set(digests)) > 1:
        warnings.warn(f"ranks hold different weights: {digests}", stacklevel=2)
    if not runtime.is_main:
        return
    meta = {
        "step": state.step,
        "mode": cfg.mode,
        "wall_s": round(wall_s, 1),
        "cpu_s": round(cpu_s, 1),  # this process's CPU time over all threads (rank 0)
        "started_at": state.started_at,
        "ended_at": utc_now(),
        "device": device_name(runtime.device),
        "world_size": runtime.world_size,
        "hardware": hardware(),
        "torch": torch.__version__,
        "command": command_line(),
        "invocations": state.invocations,
        **state.git,
        "data": batches.source,
        "rank_digests": digests,
    }
    state.last_ckpt = run.save_step(state.step, parts.model, training, meta, cfg.keep_last)


def run_summary(
    state: RunState, run: RunDir, stop: StopRequest, runtime: ddp.Runtime, started: float
) -> dict[str, Any]:
    best = state.best_ckpt or (run.best if run.best.exists() else None)
    last = state.last_ckpt or (run.latest.resolve() if run.latest.exists() else None)
    return {
        "step": state.step,
        "metrics": state.record,
        "run_dir": str(run.root),
        "last_checkpoint": str(last) if last else None,
        "best_checkpoint": str(best) if best else None,
        "sec_per_step": state.seconds_total / state.steps_run if state.steps_run else None,
        "wall_s": state.wall_before + time.monotonic() - started,
        "stopped": state.stopped,
        "signal": stop.signum,
        "rank": runtime.rank,
        "world_size": runtime.world_size,
    }


# -- checkpoint state ------------------------------------------------------------------------------
def invocation(step: int) -> dict[str, Any]:
    """This process's entry in the run's invocation history."""
    return {"from_step": step, "started_at": utc_now(), "command": command_line()}


def training_state(state: RunState, parts: TrainParts, batches: PatchStream) -> dict[str, Any]:
    """Everything besides the weights (and buffers) that a run needs to continue exactly."""
    model = parts.model
    return {
        "step": state.step,
        "best_recon": state.best_recon,
        "optimizers": [o.state_dict() for o in parts.optimizers],
        "schedulers": [s.state_dict() for s in parts.schedulers],
        # the in-place mode's per-codebook optimizers, and k-means samples still being collected
        "inner_optimizers": [b.inner_optimizer.state_dict() if b.inner_optimizer else {}
                             for b in model.quantizer.codebooks],
        "kmeans_samples": kmeans_samples(model),
        # alternating mode: the sync gradient waiting on the codebook for the next step (1)
        "codebook_grads": [p.grad for p in model.quantizer.codebook_parameters()],
        "data": batches.state_dict(),
        "window": state.window.state_dict(),
        "rng": capture_rng_state(),
    }  # fmt: skip


def resume_from_checkpoint(
    run: RunDir,
    state: RunState,
    parts: TrainParts,
    batches: PatchStream,
    cfg: TrainConfig,
    is_main: bool,
) -> None:
    """Load the newest verified checkpoint's weights and training state (nothing if none)."""
    found = run.resumable_checkpoint()
    if found is None:
        return
    path, saved = found
    device = next(parts.model.parameters()).device
    loaded, _ = load_model(path, map_location=device)
    parts.model.load_state_dict(loaded.state_dict())
    if len(saved["optimizers"]) != len(parts.optimizers):
        raise ConfigError(
            f"mode: the checkpoint holds {len(saved['optimizers'])} optimizer(s), this mode uses "
            f"{len(parts.optimizers)}; resume with the mode the run was started with"
        )
    for optimizer, value in zip(parts.optimizers, saved["optimizers"]):
        optimizer.load_state_dict(value)
    for scheduler, value in zip(parts.schedulers, saved["schedulers"]):
        scheduler.load_state_dict(value)
    books = parts.model.quantizer.codebooks
    for book, inner in zip(books, saved["inner_optimizers"]):
        if book.inner_optimizer is not None and inner:
            book.inner_optimizer.load_state_dict(inner)
    set_kmeans_samples(parts.model, saved["kmeans_samples"])
    for param, grad in zip(parts.model.quantizer.codebook_parameters(), saved["codebook_grads"]):
        param.grad = None if grad is None else grad.to(device)
    batches.load_state_dict(saved["data"])
    state.window.load_state_dict(saved["window"])
    restore_rng_state(saved["rng"])
    state.step, state.best_recon = int(saved["step"]), float(saved["best_recon"])
    state.wall_before = float(saved.get("wall_s", 0.0))  # older checkpoints have none
    state.cpu_before = float(saved.get("cpu_s", 0.0))
    state.started_at = saved.get("started_at", state.started_at)
    state.invocations = list(saved.get("invocations", []))  # older checkpoints have none
    if is_main:
        print(f"resumed {cfg.out_dir} at step {state.step} from {path}", flush=True)


def kmeans_samples(model: VQVAE) -> list[list[Tensor]]:
    """The k-means samples each codebook is still collecting (CPU copies, for the checkpoint)."""
    return [book.kmeans_state() for book in model.quantizer.codebooks]


def set_kmeans_samples(model: VQVAE, samples: list[list[Tensor]]) -> None:
    for book, saved in zip(model.quantizer.codebooks, samples):
        book.load_kmeans_state(saved)  # moves them to the codebook's device


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
