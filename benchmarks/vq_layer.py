"""Forward+backward benchmark of one VQ layer: vqmodel vs vector-quantize-pytorch vs a VQTorch-style
reference layer.

Workload: z of shape (32, 64, 16, 16) (N, C, H, W) with requires_grad, K = 1024 codes of D = 64,
loss = z_q.square().mean() + the layer's own VQ loss, backward into z and the codebook. Two option
sets:

- ``plain``: plain straight-through estimator, beta 0.95.
- ``toolkit``: learned affine codebook (affine_lr 2.0) + synchronised update (nu 0.2) + dead-code
  replacement (codes unused for 20 steps).

Timing: all implementations of one option set are run round-robin (A B C A B C ...) in ONE process
after a warm-up, so slow drift of a shared machine hits every implementation alike. CPU runs use
torch.set_num_threads(2); on CUDA every step is bracketed by torch.cuda.synchronize().

Peak memory: each implementation is measured in its OWN fresh process (this script re-invoked with
``--peak-memory IMPL OPTIONSET``), so nothing another implementation allocated or paged in can
count. CPU (Linux): after a warm step, the peak RSS during a step minus the RSS before it, with
the kernel's peak counter reset (/proc/self/clear_refs) and freed heap handed back first
(malloc_trim); median of 5 steps per process and of ``--memory-repeats`` processes. Readings
scatter by a few MiB, so differences of that size are noise. Elsewhere: ru_maxrss of the process
minus that of a baseline process that runs the same preamble without a layer. CUDA:
torch.cuda.max_memory_allocated() over one step minus what was allocated before it.

Output: a markdown table, then exactly one final line of JSON with every number.

    .venv/bin/python -m benchmarks.vq_layer            # 30 timed rounds
    .venv/bin/python -m benchmarks.vq_layer --quick    # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the script lives in benchmarks/, the package next to it; make `python -m benchmarks.vq_layer`
# work without an editable install
from benchmarks.common import reset_peak_rss, rss_bytes
from vqmodel import VectorQuantizer

try:
    from vector_quantize_pytorch import VectorQuantize
except ImportError:  # the benchmark still compares ours with the reference layer
    VectorQuantize = None  # type: ignore[assignment,misc]

SHAPE = (32, 64, 16, 16)
NUM_CODES = 1024
DIM = 64
BETA = 0.95
CHUNK = 1024
THREADS = 2
OPTION_SETS = ("plain", "toolkit")
IMPLS = ("ours", "reference", "vqp")
TARGET_VS_REFERENCE = 0.7
TARGET_VS_VQP = 0.25

# (option set) -> the paper's toolkit options, shared by ours and the reference layer
TOOLKIT: dict[str, dict[str, float]] = {
    "plain": {"affine_lr": 0.0, "sync_nu": 0.0, "replace_freq": 0},
    "toolkit": {"affine_lr": 2.0, "sync_nu": 0.2, "replace_freq": 20},
}

StepOutput = tuple[torch.Tensor, torch.Tensor]  # (z_q, the layer's VQ loss)


# -- the reference layer -------------------------------------------------------------------------
class ReferenceVQ(nn.Module):
    """What VQTorch's ``VectorQuant`` does, written out plainly (the paper's library).

    Channels last -> rows, torch.cdist per chunk of 1024 rows + topk(1, largest=False),
    F.embedding, STE output z + sg(z_q - z) (+ nu * z_q - sg(nu * z_q)), loss
    beta * mse(sg(z), z_q) + (1 - beta) * mse(z, sg(z_q)). Learned affine: C_hat = C * (1 + lr*s)
    + lr*b with s, b of shape [1, D]. Dead-code replacement like VQTorch's LRU hook: a code unused
    for ``replace_freq`` consecutive steps is reset to a random input row plus 1% noise.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float,
        affine_lr: float,
        sync_nu: float,
        replace_freq: int,
    ) -> None:
        super().__init__()
        # same init as vqmodel (std 1/sqrt(D)), so both search the same kind of codebook
        self.weight = nn.Parameter(torch.randn(num_codes, dim) * dim**-0.5)
        self.beta = beta
        self.affine_lr = affine_lr
        self.sync_nu = sync_nu
        self.replace_freq = replace_freq
        if affine_lr > 0:
            self.scale = nn.Parameter(torch.zeros(1, dim))
            self.bias = nn.Parameter(torch.zeros(1, dim))
        self.register_buffer("unused", torch.zeros(num_codes, dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        if self.affine_lr > 0:
            return self.weight * (1.0 + self.affine_lr * self.scale) + self.affine_lr * self.bias
        return self.weight

    @torch.no_grad()
    def search(self, rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        # VQTorch's euclidean path: true (sqrt) distances via cdist, chunked, then topk(1)
        parts = [
            torch.cdist(chunk, codebook).topk(1, dim=1, largest=False).indices[:, 0]
            for chunk in rows.split(CHUNK)
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def replace_dead(self, rows: torch.Tensor) -> None:
        """Reset codes unused for ``replace_freq`` steps to random rows (+ noise).

        Runs BEFORE the codebook enters this step's graph: writing it afterwards would bump the
        version of a tensor autograd saved (the affine's product needs the raw codebook).
        """
        dead = (self.unused >= self.replace_freq).nonzero().flatten()
        if dead.numel() == 0:
            return
        pick = torch.randint(rows.shape[0], (dead.numel(),), device=rows.device)
        noise = torch.randn(dead.numel(), rows.shape[1], device=rows.device) * 0.01
        # written as raw rows; with the affine this is approximate, which is what VQTorch does too
        self.weight[dead] = rows[pick] + noise * rows.std()
        self.unused[dead] = 0

    @torch.no_grad()
    def count_usage(self, indices: torch.Tensor) -> None:
        used = torch.bincount(indices, minlength=self.unused.numel()) > 0
        self.unused.add_(1).masked_fill_(used, 0)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = z.movedim(1, -1)
        rows = x.reshape(-1, x.shape[-1])
        lru = self.training and self.replace_freq > 0
        if lru:
            self.replace_dead(rows.detach())
        codebook = self.codebook()
        indices = self.search(rows.detach(), codebook.detach())
        if lru:
            self.count_usage(indices)
        z_q = F.embedding(indices, codebook)
        loss = self.beta * F.mse_loss(rows.detach(), z_q) + (1.0 - self.beta) * F.mse_loss(
            rows, z_q.detach()
        )
        out = rows + (z_q - rows).detach()
        if self.sync_nu > 0:
            out = out + self.sync_nu * z_q - (self.sync_nu * z_q).detach()
        return out.reshape(x.shape).movedim(-1, 1), {"loss": loss, "indices": indices}


# -- building the three implementations ----------------------------------------------------------
@dataclass
class Impl:
    name: str
    layer: nn.Module
    run: Callable[[nn.Module, torch.Tensor], StepOutput]


def _run_dict_layer(layer: nn.Module, z: torch.Tensor) -> StepOutput:
    z_q, info = layer(z)
    return z_q, info["loss"]


def _run_vqp(layer: nn.Module, z: torch.Tensor) -> StepOutput:
    z_q, _indices, loss = layer(z)
    return z_q, loss


def build_ours(option_set: str) -> nn.Module:
    opts = TOOLKIT[option_set]
    if option_set == "plain":
        return VectorQuantizer(num_codes=NUM_CODES, dim=DIM, beta=BETA)
    return VectorQuantizer(
        num_codes=NUM_CODES,
        dim=DIM,
        beta=BETA,
        affine="learned",
        affine_lr=opts["affine_lr"],
        sync_nu=opts["sync_nu"],
        replace_freq=int(opts["replace_freq"]),
    )


def build_reference(option_set: str) -> nn.Module:
    opts = TOOLKIT[option_set]
    return ReferenceVQ(
        NUM_CODES, DIM, BETA, opts["affine_lr"], opts["sync_nu"], int(opts["replace_freq"])
    )


def build_vqp(option_set: str) -> nn.Module:
    """vector-quantize-pytorch's closest configuration (choices read from its 1.32 source).

    Both sets: ``accept_image_fmap=True`` (takes (N, C, H, W) and returns that shape);
    ``learnable_codebook=True, ema_update=False``: the codebook is a parameter learned by the loss,
    as in ours (its default is an EMA codebook, a different algorithm); ``rotation_trick=False``:
    its default for dim > 1 is the rotation trick, not the plain STE; ``commitment_weight=1``:
    its only loss is mse(quantize, x) with gradients to BOTH x and the codebook (learnable), i.e.
    codebook + commitment terms with equal weight; it has no beta split, so beta 0.95 has no exact
    counterpart (the cost is the same either way).

    Toolkit set: ``sync_update_v=0.2`` is its implementation of the paper's synchronised update
    (eq. 21, same formula as our nu). ``affine_param=True`` is its affine re-parameterisation, but
    running batch/codebook statistics (EMA), NOT learned scale/bias: there is no learned variant,
    so this is the closest. ``threshold_ema_dead_code=2`` (its README's example value): its
    dead-code rule is "EMA (decay 0.8) of the per-step cluster size < 2", not "unused for 20
    steps"; with ema_update=False this still makes it track cluster sizes every step (a one-hot
    N x K einsum), which is what its dead-code replacement costs.
    """
    if VectorQuantize is None:
        raise RuntimeError("vector-quantize-pytorch is not installed")
    common: dict[str, Any] = {
        "dim": DIM,
        "codebook_size": NUM_CODES,
        "accept_image_fmap": True,
        "learnable_codebook": True,
        "ema_update": False,
        "rotation_trick": False,
        "commitment_weight": 1.0,
    }
    if option_set == "plain":
        return VectorQuantize(**common)
    return VectorQuantize(
        **common,
        affine_param=True,
        sync_update_v=TOOLKIT["toolkit"]["sync_nu"],
        threshold_ema_dead_code=2,
    )


BUILDERS: dict[
    str, tuple[Callable[[str], nn.Module], Callable[[nn.Module, torch.Tensor], StepOutput]]
] = {
    "ours": (build_ours, _run_dict_layer),
    "reference": (build_reference, _run_dict_layer),
    "vqp": (build_vqp, _run_vqp),
}


def available_impls() -> list[str]:
    return [name for name in IMPLS if name != "vqp" or VectorQuantize is not None]


def build_impl(name: str, option_set: str, device: torch.device) -> Impl:
    build, run = BUILDERS[name]
    torch.manual_seed(0)  # every implementation starts from a seeded codebook
    layer = build(option_set).to(device).train()
    return Impl(name, layer, run)


# -- one step, timing ----------------------------------------------------------------------------
def make_input(device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(SHAPE, generator=gen).to(device).requires_grad_(True)


def step(impl: Impl, z: torch.Tensor) -> None:
    """One training step of the layer alone: forward, the task + VQ loss, backward."""
    z.grad = None
    impl.layer.zero_grad(set_to_none=True)
    z_q, vq_loss = impl.run(impl.layer, z)
    (z_q.square().mean() + vq_loss).backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(impl: Impl, z: torch.Tensor, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step(impl, z)
    sync(device)
    return (time.perf_counter() - start) * 1e3


def time_option_set(
    option_set: str, impls: list[str], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Round-robin: every round runs each implementation once, in the same order."""
    z = make_input(device)
    built = [build_impl(name, option_set, device) for name in impls]
    for _ in range(warmup):
        for impl in built:
            step(impl, z)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(rounds):
        for impl in built:
            times[impl.name].append(timed_step(impl, z, device))
    return times


# -- peak memory (child process side) -----------------------------------------------------------
PEAK_METHODS = {
    "vmhwm": "CPU: peak RSS during a step minus RSS before it (VmHWM reset, malloc_trim), "
    "after a warm step, median of 5 steps, fresh process per impl, median over processes",
    "maxrss": "ru_maxrss of a fresh process minus that of a baseline process (preamble only)",
    "cuda": "torch.cuda.max_memory_allocated over one warm step minus memory_allocated before",
}


def _reset_rss_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS.

    Preferred over ru_maxrss: a child's ru_maxrss starts at the PARENT's peak (it survives fork
    and exec), so after the timing phase every child would report the parent's footprint.
    """
    try:
        reset_peak_rss()
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _preamble(device: torch.device) -> torch.Tensor:
    """Inputs plus a tiny autograd op, so the thread pool and the autograd engine exist before
    the peak is reset (or before the baseline process reads its peak)."""
    z = make_input(device)
    probe = torch.randn(64, 64, device=device, requires_grad=True)
    (probe @ probe).sum().backward()
    sync(device)
    return z


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next step's peak is its own and not
    hidden in pages a previous step left resident."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: readings just get noisier
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _steady_rss_peak(impl: Impl, z: torch.Tensor, cycles: int) -> int:
    """Median over ``cycles`` steps of (peak RSS during the step - RSS before it).

    The first (warm) step already ran: shared-library code pages that an operator touches the
    first time would otherwise count as memory of whichever implementation ran first. Single
    readings scatter by a few MiB (allocator arenas), hence the median.
    """
    readings = []
    for _ in range(cycles):
        _malloc_trim()
        before = rss_bytes("self", "VmRSS")
        _reset_rss_peak()
        step(impl, z)
        readings.append(rss_bytes("self", "VmHWM") - before)
    return int(statistics.median(readings))


def measure_peak_in_this_process(
    impl_name: str, option_set: str, device: torch.device, cycles: int = 5
) -> tuple[int, str]:
    """(bytes, method) for one step of the layer after a warm step.

    ``impl_name == "baseline"`` runs the preamble only (used by the ru_maxrss fallback).
    """
    z = _preamble(device)
    impl = None if impl_name == "baseline" else build_impl(impl_name, option_set, device)
    if device.type == "cuda":
        if impl is None:
            return 0, "cuda"
        step(impl, z)  # warm: the caching allocator keeps its blocks, lazy state is created
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(impl, z)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda"
    if impl is not None:
        step(impl, z)
    if _reset_rss_peak():
        return (_steady_rss_peak(impl, z, cycles) if impl is not None else 0), "vmhwm"
    if impl is not None:
        step(impl, z)
    return _maxrss_bytes(), "maxrss"


# -- peak memory (parent side) -------------------------------------------------------------------
def run_child(impl_name: str, option_set: str, device: torch.device) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "benchmarks.vq_layer", "--peak-memory", impl_name, option_set]
    cmd += ["--device", str(device)]
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=repo)
    reading = json.loads(result.stdout.strip().splitlines()[-1])
    return int(reading["peak_bytes"]), str(reading["method"])


def median_reading(impl_name: str, option_set: str, device: torch.device, repeats: int) -> float:
    readings = [run_child(impl_name, option_set, device)[0] for _ in range(repeats)]
    return statistics.median(readings)


def measure_peaks(
    impls: list[str], device: torch.device, repeats: int
) -> tuple[dict[str, dict[str, float]], str]:
    """MiB per option set and implementation, and the method that produced them."""
    _, method = run_child("baseline", "plain", device)
    baseline = median_reading("baseline", "plain", device, repeats) if method == "maxrss" else 0
    peaks: dict[str, dict[str, float]] = {}
    for option_set in OPTION_SETS:
        peaks[option_set] = {}
        for name in impls:
            peak = median_reading(name, option_set, device, repeats)
            peaks[option_set][name] = max(peak - baseline, 0) / 2**20
    return peaks, method


# -- profile -------------------------------------------------------------------------------------
def profile(impl_name: str, option_set: str, device: torch.device, steps: int) -> None:
    """Operator-level profile of ``steps`` forward+backward steps (after a short warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    z = make_input(device)
    impl = build_impl(impl_name, option_set, device)
    for _ in range(5):
        step(impl, z)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step(impl, z)
        sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=40))


# -- report --------------------------------------------------------------------------------------
def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {"median_ms": statistics.median(ts), "min_ms": min(ts)} for name, ts in times.items()
    }


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    ours = summary["ours"]["median_ms"]
    out = {"ours/reference": ours / summary["reference"]["median_ms"]}
    if "vqp" in summary:
        out["ours/vqp"] = ours / summary["vqp"]["median_ms"]
    return out


def targets(
    all_ratios: dict[str, dict[str, float]], peaks: dict[str, dict[str, float]] | None
) -> dict[str, bool | None]:
    met: dict[str, bool | None] = {}
    for option_set, r in all_ratios.items():
        met[f"{option_set}: ours/reference <= {TARGET_VS_REFERENCE}"] = (
            r["ours/reference"] <= TARGET_VS_REFERENCE
        )
        met[f"{option_set}: ours/vqp <= {TARGET_VS_VQP}"] = (
            r["ours/vqp"] <= TARGET_VS_VQP if "ours/vqp" in r else None
        )
        met[f"{option_set}: peak ours <= reference"] = (
            peaks[option_set]["ours"] <= peaks[option_set]["reference"] if peaks else None
        )
    return met


def markdown(
    results: dict[str, dict[str, dict[str, float]]],
    all_ratios: dict[str, dict[str, float]],
    peaks: dict[str, dict[str, float]] | None,
    met: dict[str, bool | None],
) -> str:
    lines = [
        "| option set | implementation | median ms | min ms | peak MiB |",
        "|---|---|---:|---:|---:|",
    ]
    for option_set, summary in results.items():
        for name, row in summary.items():
            peak = f"{peaks[option_set][name]:.1f}" if peaks else "-"
            lines.append(
                f"| {option_set} | {name} | {row['median_ms']:.2f} | {row['min_ms']:.2f} | {peak} |"
            )
    lines += ["", "| option set | ours/reference (median) | ours/vqp (median) |", "|---|---:|---:|"]
    for option_set, r in all_ratios.items():
        vqp = f"{r['ours/vqp']:.3f}" if "ours/vqp" in r else "-"
        lines.append(f"| {option_set} | {r['ours/reference']:.3f} | {vqp} |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in met.items()]
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed round-robin rounds first")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up (smoke test)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--memory-repeats", type=int, default=2, help="processes per peak number")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory processes")
    parser.add_argument(
        "--peak-memory",
        nargs=2,
        metavar=("IMPL", "OPTIONSET"),
        help="internal: print this process's peak memory for one implementation as JSON",
    )
    parser.add_argument(
        "--profile",
        nargs=2,
        metavar=("IMPL", "OPTIONSET"),
        help="print a torch.profiler table of IMPL's forward+backward instead of benchmarking",
    )
    parser.add_argument("--profile-steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.memory_repeats = 3, 1, 1
    return args


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    # fixed thread count: comparable numbers on any host, and the shared 2-core CI box
    torch.set_num_threads(THREADS)
    if args.peak_memory:
        impl_name, option_set = args.peak_memory
        peak, method = measure_peak_in_this_process(impl_name, option_set, device)
        print(json.dumps({"peak_bytes": peak, "method": method}))
        return
    if args.profile:
        profile(args.profile[0], args.profile[1], device, args.profile_steps)
        return

    impls = available_impls()
    load_before = _load_average()
    # memory first: the children are spawned while this process is still small
    peaks, peak_method = (
        (None, None) if args.skip_memory else measure_peaks(impls, device, args.memory_repeats)
    )
    results = {
        option_set: summarise(time_option_set(option_set, impls, args.rounds, args.warmup, device))
        for option_set in OPTION_SETS
    }
    load_after = _load_average()
    all_ratios = {option_set: ratios(summary) for option_set, summary in results.items()}
    met = targets(all_ratios, peaks)

    print(
        f"device={device} threads={torch.get_num_threads()} rounds={args.rounds} "
        f"warmup={args.warmup} shape={SHAPE} codes={NUM_CODES} dim={DIM}"
    )
    print(markdown(results, all_ratios, peaks, met))
    record = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        # a shared box: other jobs' load makes 2-thread OpenMP steps many times slower
        "load_average_1min": {"before": load_before, "after": load_after},
        "rounds": args.rounds,
        "warmup": args.warmup,
        "shape": list(SHAPE),
        "num_codes": NUM_CODES,
        "dim": DIM,
        "torch": torch.__version__,
        "vector_quantize_pytorch": package_version("vector-quantize-pytorch"),
        "timing_ms": results,
        "ratios": all_ratios,
        "peak_mib": peaks,
        "peak_method": PEAK_METHODS.get(peak_method or ""),
        "targets_met": met,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
