"""ONNX export: a checkpoint becomes a served model directory (``service/model_dir.py``).

    vqtok-export runs/default/checkpoints/best --out models/default [--card card.json] [--fp16]
                 [--triton triton_repo]

Two graphs, both single ``.onnx`` files with dynamic N, H and W:

- encoder: images float32 [N,3,H,W] in [0,1] -> tokens int64 [N,H/f,W/f]. The nearest-code search
  is inside the graph, written as the served rule (``VQVAE.encode``): q = argmin_k
  (||C_k||^2 - 2 z.C_k) in fp64 with ONNX ArgMin's first-index tie-break (also with ``--fp16``,
  where only the conv stacks run in half precision). fp64 because fp32 scores from two GEMM
  kernels differ by a few ulps of |z|.|C|, enough to flip near-ties (1-6 tokens per 10^4 on a
  channel-norm model whose features have norm ~20).
- decoder: tokens int64 [N,h,w] -> images float32 [N,3,h*f,w*f] in [0,1] (codebook lookup inside).

Exporter: torch 2.13's dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with
``external_data=False``, which keeps the weights inside the .onnx file. The legacy TorchScript
exporter also gives a single file with dynamic axes and the same tokens, but it is deprecated
since torch 2.9 and prints a warning on every call; dynamo is the supported path.

Nothing is reported as exported before onnxruntime reproduced torch on real photos: batch 1 and
8 at three sizes (one square at the native size, two non-square), decoded images within 1e-4 and
every token equal except near-ties (two codes within a relative distance gap of 1e-4), and those
at most 1 per 10^4 tokens. The encoder's convolutions run in fp32 in both engines, and fp32 sums
depend on the kernel and its thread split: torch alone picks the other code of a 5e-7 tie at 1
vs 2 threads (seen on vqtok-f8-k1024 trained 2026-12-07), so exact equality on every tie would be
luck. The served contract (one engine, one provider) stays exact (README "The token contract").
The directory is assembled next to ``--out`` and renamed into place, so an interrupted or failed
export leaves the previous model directory untouched.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.cli_parser import CliParser
from service.files import replace_directory, write_bytes_atomic
from service.images import fit_crop, unit_pixels
from service.model_dir import (
    DECODER_FILE,
    DECODER_INPUT,
    DECODER_OUTPUT,
    ENCODER_FILE,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    FORMAT,
    FORMAT_VERSION,
    MODEL_FILE,
    io_contract,
    model_id,
    sha256_bytes,
)
from training.cli_errors import user_error
from training.model_card import write_card
from training.records import command_line, git_state
from training.select import read_selection
from vqmodel.checkpoint import CheckpointError, load_metadata, load_model, save_checkpoint
from vqmodel.search import SERVED_DTYPE, CodebookTerms, nearest_codes
from vqmodel.vqvae import VQVAE

IMAGE_TOLERANCE = 1e-4  # max |onnxruntime - torch| of decoded pixels in [0,1]
NEAR_TIE = 1e-4  # relative distance gap under which two codes count as tied (rounding noise)
NEAR_TIE_RATE = 1e-4  # most near-tie tokens torch and onnxruntime may disagree on, per token
VERIFY_BATCH = 8
Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """The export could not be written or does not reproduce torch; the message says how."""


class ExportInputError(ExportError):
    """What the command was given cannot be used (checkpoint, --out, --card, --metrics)."""


# -- the two graphs --------------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    """images [N,3,H,W] in [0,1] -> tokens int64 [N,H/f,W/f], the argmin inside the graph.

    The served token rule itself (``vqmodel.search.nearest_codes`` in ``SERVED_DTYPE``, as
    ``VQVAE.encode``) with the effective codebook Ĉ = A(C) frozen into constants (eval-mode
    semantics): ``Ĉ^T`` and ``||Ĉ_k||^2`` in fp64, so the graph is conv stack -> one fp64 GEMM ->
    ArgMin. One block (``chunk_size=None``): onnxruntime streams the [N*h*w, K] score matrix
    through one Gemm, bounded by the batch the caller sends.
    """

    def __init__(self, model: VQVAE, fp16: bool = False) -> None:
        super().__init__()
        model._check_single_token_grid()
        terms = CodebookTerms.of(model.quantizer.codebooks[0].effective(), SERVED_DTYPE)
        self.encoder = copy.deepcopy(model.encoder).eval()
        if fp16:
            self.encoder.half()
        self.fp16 = fp16
        self.l2_input = model.config.quantizer.input_norm == "l2"
        self.register_buffer("codebook_t", terms.codebook_t.contiguous())
        self.register_buffer("code_sq", terms.code_sq)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2.0 - 1.0
        z = self.encoder(x.half() if self.fp16 else x).float()
        n, d, h, w = z.shape
        rows = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.l2_input:
            rows = F.normalize(rows, dim=-1)
        terms = CodebookTerms(self.codebook_t, self.code_sq)
        tokens, _ = nearest_codes(rows, terms, chunk_size=None, dtype=SERVED_DTYPE)
        return tokens.reshape(n, h, w)


class DecoderGraph(nn.Module):
    """tokens int64 [N,h,w] -> images float32 [N,3,h*f,w*f] in [0,1] (``VQVAE.decode``, eval)."""

    def __init__(self, model: VQVAE, fp16: bool = False) -> None:
        super().__init__()
        model._check_single_token_grid()
        self.decoder = copy.deepcopy(model.decoder).eval()
        if fp16:
            self.decoder.half()
        self.fp16 = fp16
        codebook = model.quantizer.codebooks[0].effective().detach().float().clone()
        self.register_buffer("codebook", codebook)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        z_q = F.embedding(tokens, self.codebook).permute(0, 3, 1, 2)
        x = self.decoder(z_q.half() if self.fp16 else z_q).float()
        return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def export_graph(
    graph: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str
) -> None:
    """One single-file ONNX graph with dynamic batch and spatial axes of ``example``."""
    dim = torch.export.Dim
    if example.dtype.is_floating_point:  # images [N,3,H,W]: H and W from the token grid x f
        dynamic = {0: dim("N"), 2: dim.DYNAMIC, 3: dim.DYNAMIC}
    else:  # tokens [N,h,w]
        dynamic = {0: dim("N"), 1: dim("h"), 2: dim("w")}
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    with warnings.catch_warnings():
        # the exporter warns about optional torchvision ops and pytree deprecations: not ours
        warnings.simplefilter("ignore")
        registration_log.setLevel(logging.ERROR)
        try:
            _dynamo_export(graph, example, path, input_name, output_name, dynamic)
        finally:
            registration_log.setLevel(level)
    side_files = sorted(p.name for p in path.parent.glob(f"{path.name}*") if p != path)
    if side_files:
        raise ExportError(f"{path}: the exporter wrote side files {side_files}; expected one file")
    _check_dynamic(path, input_name, list(dynamic))


def _dynamo_export(
    graph: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str,
    dynamic: dict[int, Any],
) -> None:
    torch.onnx.export(
        graph.eval(),
        (example,),
        str(path),
        dynamo=True,
        external_data=False,  # weights inside the .onnx file, no side .onnx.data
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes={input_name: dynamic},
        verbose=False,
    )


def _check_dynamic(path: Path, input_name: str, axes: list[int]) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    (tensor,) = [i for i in graph.input if i.name == input_name]
    dims = tensor.type.tensor_type.shape.dim
    fixed = [axis for axis in axes if not dims[axis].dim_param]
    if fixed:
        raise ExportError(f"{path}: input {input_name} axes {fixed} were exported with fixed sizes")


# -- verification ----------------------------------------------------------------------------------
@dataclass
class ParityCase:
    """onnxruntime vs torch on one batch of photos."""

    batch: int
    height: int
    width: int
    tokens_total: int
    tokens_differing: int
    max_image_diff: float
    near_tie_gap: float | None = None  # largest relative distance gap among differing tokens

    @property
    def near_ties_only(self) -> bool:
        """Every differing token is a near-tie (vacuously true when none differ)."""
        if self.tokens_differing == 0:
            return True
        return self.near_tie_gap is not None and self.near_tie_gap < NEAR_TIE

    @property
    def passed(self) -> bool:
        return self.near_ties_only and self.max_image_diff <= IMAGE_TOLERANCE


@dataclass
class ParityReport:
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def tokens_total(self) -> int:
        return sum(c.tokens_total for c in self.cases)

    @property
    def tokens_differing(self) -> int:
        return sum(c.tokens_differing for c in self.cases)

    @property
    def token_agreement(self) -> float:
        return 1.0 - self.tokens_differing / max(1, self.tokens_total)

    @property
    def max_image_diff(self) -> float:
        return max((c.max_image_diff for c in self.cases), default=0.0)

    @property
    def near_tie_tokens(self) -> int:
        return sum(c.tokens_differing for c in self.cases if c.near_ties_only)

    def summary(self) -> dict[str, Any]:
        return {
            "tokens_total": self.tokens_total,
            "tokens_differing": self.tokens_differing,
            "near_tie_tokens": self.near_tie_tokens,
            "near_tie_limit": NEAR_TIE_RATE,
            "token_agreement": self.token_agreement,
            "max_image_abs_diff": self.max_image_diff,
            "image_tolerance": IMAGE_TOLERANCE,
            "cases": [asdict(c) for c in self.cases],
        }

    def failures(self) -> list[str]:
        lines = []
        allowed = NEAR_TIE_RATE * self.tokens_total
        too_many_ties = self.near_tie_tokens > allowed
        if too_many_ties:
            lines.append(
                f"{self.near_tie_tokens} of {self.tokens_total} tokens differ as near-ties "
                f"(relative distance gap < {NEAR_TIE:g}), more than the {NEAR_TIE_RATE:g} per "
                f"token ({allowed:.2f}) that fp32 rounding explains"
            )
        for c in self.cases:
            where = f"batch {c.batch} at {c.height}x{c.width}"
            if too_many_ties and c.tokens_differing and c.near_ties_only:
                lines.append(
                    f"{where}: {c.tokens_differing} of {c.tokens_total} tokens differ, all "
                    f"near-ties (largest relative distance gap between the two codes "
                    f"{c.near_tie_gap:.2g} < {NEAR_TIE:g}: rounding picks the other code)"
                )
            if c.passed:
                continue
            if not c.near_ties_only:
                lines.append(
                    f"{where}: {c.tokens_differing} of {c.tokens_total} tokens differ, NOT "
                    f"near-ties (relative distance gap up to {c.near_tie_gap:.3g}): the exported "
                    "graph computes something different from torch"
                )
            if c.max_image_diff > IMAGE_TOLERANCE:
                lines.append(
                    f"{where}: decoded images differ by up to {c.max_image_diff:.3g} "
                    f"(limit {IMAGE_TOLERANCE:g})"
                )
        return lines


def verification_sizes(image_size: int, downsample: int) -> list[tuple[int, int]]:
    """Native square, landscape 1.5x and a small portrait-ish size, all multiples of f."""

    def snap(side: float) -> int:
        return max(downsample, round(side / downsample) * downsample)

    s = image_size
    return [(snap(s), snap(s)), (snap(s), snap(1.5 * s)), (snap(s / 2) + downsample, snap(s / 2))]


def verification_photos(sizes: Sequence[tuple[int, int]], count: int) -> dict[tuple, np.ndarray]:
    """{(h, w): float32 [count,3,h,w]}: real photos (pip-bundled) under the service's ``fit``
    policy (``service.images.fit_crop``) at the longer side, centre-cropped to h x w."""
    from PIL import Image

    from training.data import pip_photos

    photos = [Image.fromarray(rgb) for _, rgb in pip_photos().images()][:count]
    if len(photos) < count:
        photos = (photos * count)[:count]
    batches = {}
    for h, w in sizes:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        crops = [fit_crop(photo, side)[top : top + h, left : left + w] for photo in photos]
        batches[(h, w)] = np.stack([unit_pixels(crop) for crop in crops])
    return batches


def compare_to_torch(
    model: VQVAE,
    encode: Callable[[np.ndarray], np.ndarray],
    decode: Callable[[np.ndarray], np.ndarray],
    batches: dict[tuple, np.ndarray],
    batch_sizes: Sequence[int] = (1, VERIFY_BATCH),
    progress: Progress | None = None,
    exact: bool = True,
) -> ParityReport:
    """Run ``encode``/``decode`` (onnxruntime) and the torch model on the same photos.

    ``exact=False`` (fp16 graphs) only changes the progress wording: agreement is measured, not
    required.
    """
    report = ParityReport()
    model = model.eval()
    for (h, w), images in batches.items():
        for b in batch_sizes:
            x = images[:b]
            with torch.no_grad():
                expected = model.encode(torch.from_numpy(x)).numpy()
            got = encode(x)
            differing = int((got != expected).sum()) if got.shape == expected.shape else got.size
            gap = _tie_gap(model, x, expected, got) if differing else None
            # the decoder is judged on the torch tokens so an encoder flip cannot hide in it
            with torch.no_grad():
                reference = model.decode(torch.from_numpy(expected)).numpy()
            decoded = decode(expected)
            image_diff = float(np.abs(decoded - reference).max())
            case = ParityCase(b, h, w, int(expected.size), differing, image_diff, gap)
            report.cases.append(case)
            if progress is not None:
                status = "ok" if case.passed else "MISMATCH" if exact else "(fp16 vs fp32)"
                if case.passed and differing:
                    status = f"ok ({differing} near-tie, relative gap {gap:.1g})"
                progress(
                    f"  parity batch {b:>2} {h}x{w}: tokens {case.tokens_total - differing}/"
                    f"{case.tokens_total} equal, max image diff {image_diff:.2e}  {status}"
                )
    return report


@torch.no_grad()
def _tie_gap(model: VQVAE, images: np.ndarray, expected: np.ndarray, got: np.ndarray) -> float:
    """Largest |d(torch code) - d(onnx code)| / d(torch code) over differing tokens, in fp64."""
    if got.shape != expected.shape:
        return float("inf")
    z = model.encode_features(torch.from_numpy(images))
    rows, _ = model.quantizer._to_rows(z)
    rows = rows.reshape(-1, rows.shape[-1]).double()
    codebook = model.quantizer.codebooks[0].effective().double()
    mask = torch.from_numpy((got != expected).reshape(-1))
    sel = rows[mask]
    a = codebook[torch.from_numpy(expected.reshape(-1))[mask]]
    b = codebook[torch.from_numpy(got.reshape(-1))[mask].clamp(0, codebook.shape[0] - 1)]
    d_a, d_b = (sel - a).pow(2).sum(1), (sel - b).pow(2).sum(1)
    return float(((d_a - d_b).abs() / d_a.clamp_min(1e-12)).max())


# -- the model directory ---------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    parity: ParityReport


def export_model_dir(
    model: VQVAE,
    out: str | os.PathLike[str],
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
    fp16: bool = False,
    source: str | None = None,
    command: str | None = None,
    verify_batches: dict[tuple, np.ndarray] | None = None,
    progress: Progress | None = print,
) -> ExportResult:
    """Write the model directory ``out`` for ``model`` (CPU, eval mode) and verify it.

    Args:
        model: a single-grid VQVAE (groups=1, residual_stages=1).
        out: the model directory; replaced as a whole if it already holds a model directory.
        training: the training record (data, steps, hardware, wall time, command, git rev...).
        metrics: eval metrics (may be empty).
        card: the human text of model.json: ``description``, ``license``, ``limitations``
            (see :func:`check_card`); every figure comes from the records above.
        fp16: conv stacks in half precision (for GPUs); distances and argmin stay fp64. Token
            agreement with fp32 torch is reported, not required.
        source: where the weights came from (a checkpoint path); kept out of the public view.
        command: the export command line, recorded under ``export``.
        verify_batches: {(h, w): float32 [B,3,h,w]} photos to verify on; default: pip photos at
            :func:`verification_sizes`, batch 1 and 8.
        progress: called with one line per step; None for silence.

    Raises:
        ExportError: on a parity failure (fp32) or an unusable ``out``; ``out`` is left as it was.
    """
    say = progress or (lambda _line: None)
    out = Path(out)
    _check_out_dir(out)
    model = model.cpu().eval()
    card = check_card(card or {})
    records = {"training": dict(training or {}), "metrics": dict(metrics or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        started = time.perf_counter()
        save_checkpoint(tmp, model, metadata={"training": records["training"], "source": source})
        export_graphs(model, tmp, fp16, say)
        parity = verify_parity(model, tmp, verify_batches, fp16, say)
        say("[4/4] writing model.json ...")
        export = {"command": command, "seconds": time.perf_counter() - started, "parity": parity}
        manifest = build_manifest(model, tmp, fp16, records, card, export, source)
        write_bytes_atomic(tmp / MODEL_FILE, json.dumps(manifest, indent=2).encode())
        write_card(tmp)  # README.md, every figure read back from model.json
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"exported {manifest['id']} to {out}")
    return ExportResult(out, manifest, parity)


CARD_KEYS = ("description", "license", "limitations")


def check_card(card: dict[str, Any]) -> dict[str, str]:
    """The card's human text, refused when it holds anything but CARD_KEYS strings or when a
    text holds a digit: figures on a card come from records (training, eval, export), never typed.
    """
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ExportInputError(
            f"--card: unknown key(s) {unknown}; a card holds only {', '.join(CARD_KEYS)} (the "
            "training record, metrics and export figures are recorded, not typed)"
        )
    for key, text in card.items():
        if not isinstance(text, str):
            raise ExportInputError(f"--card: {key} must be a string, got {type(text).__name__}")
        digits = sorted({char for char in text if char.isdigit()})
        if digits:
            raise ExportInputError(
                f"--card: {key} holds the digit(s) {''.join(digits)}; a card's text carries no "
                f"figures (they come from model.json's records): {text!r}"
            )
    return dict(card)


def export_graphs(model: VQVAE, folder: Path, fp16: bool, say: Progress) -> None:
    """encoder.onnx and decoder.onnx for ``model`` into ``folder`` (steps 1 and 2 of 4)."""
    cfg = model.config
    s = cfg.image_size
    say(f"[1/4] exporting encoder ({'fp16 convs, ' if fp16 else ''}fp64 argmin) ...")
    images = torch.rand(2, 3, s, s)
    export_graph(EncoderGraph(model, fp16), images, folder / ENCODER_FILE, ENCODER_INPUT,
                 ENCODER_OUTPUT)  # fmt: skip
    say("[2/4] exporting decoder ...")
    tokens = torch.randint(0, cfg.quantizer.num_codes, (2, cfg.token_size, cfg.token_size))
    export_graph(DecoderGraph(model, fp16), tokens, folder / DECODER_FILE, DECODER_INPUT,
                 DECODER_OUTPUT)  # fmt: skip


def verify_parity(
    model: VQVAE,
    folder: Path,
    batches: dict[tuple, np.ndarray] | None,
    fp16: bool,
    say: Progress,
) -> ParityReport:
    """onnxruntime on the graphs in ``folder`` against torch (step 3 of 4); raises ExportError
    when an fp32 export does not reproduce torch (fp16 agreement is only measured)."""
    say("[3/4] verifying onnxruntime against torch on real photos ...")
    if batches is None:
        sizes = verification_sizes(model.config.image_size, model.config.downsample)
        batches = verification_photos(sizes, VERIFY_BATCH)
    encode, decode = _ort_runners(folder)
    parity = compare_to_torch(model, encode, decode, batches, progress=say, exact=not fp16)
    failures = parity.failures()
    if failures and not fp16:
        raise ExportError("onnxruntime does not reproduce torch:\n  " + "\n  ".join(failures))
    return parity


def build_manifest(
    model: VQVAE,
    folder: Path,
    fp16: bool,
    records: dict[str, dict[str, Any]],
    card: dict[str, Any],
    export: dict[str, Any],
    source: str | None,
) -> dict[str, Any]:
    """model.json for the files in ``folder``: id, sha256 of each file, config, io contract,
    the training and metrics ``records``, the ``export`` record (command, seconds, parity)."""
    cfg = model.config
    f, k = cfg.downsample, cfg.quantizer.num_codes
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    hashes = {name: sha256_bytes((folder / name).read_bytes()) for name in names}
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "id": model_id(f, k, hashes),
        "image_size": cfg.image_size,
        "downsample": f,
        "codebook_size": k,
        "code_dim": cfg.code_dim,
        "precision": "fp16" if fp16 else "fp32",
        "io": io_contract(f, k),
        "model_config": cfg.model_dump(mode="json"),
        "training": records["training"],
        "metrics": records["metrics"],
        "export": {
            "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
            **git_state(),
            "command": export["command"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(export["seconds"], 1),
            "parity": export["parity"].summary(),
        },
        **card,
        "files": hashes,
    }
    if source is not None:
        manifest["source"] = source
    return manifest


def _ort_runners(model_dir: Path) -> tuple[Callable, Callable]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    enc = ort.InferenceSession(str(model_dir / ENCODER_FILE), options, providers=providers)
    dec = ort.InferenceSession(str(model_dir / DECODER_FILE), options, providers=providers)

    def encode(images: np.ndarray) -> np.ndarray:
        return enc.run(None, {ENCODER_INPUT: images})[0]

    def decode(tokens: np.ndarray) -> np.ndarray:
        return dec.run(None, {DECODER_INPUT: tokens.astype(np.int64)})[0]

    return encode, decode


def _check_out_dir(out: Path) -> None:
    # replacing a directory wholesale is only safe when it is one of ours
    if out.exists() and not out.is_dir():
        raise ExportInputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MODEL_FILE).is_file():
        raise ExportInputError(
            f"--out {out} is a non-empty directory without {MODEL_FILE}; refusing to replace it "
            "(choose a new directory or remove it)"
        )


# -- CLI -------------------------------------------------------------------------------------------
def _read_json(path: str | None, what: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ExportInputError(f"--{what} {path}: cannot read JSON: {err}") from err
    if not isinstance(data, dict):
        raise ExportInputError(
            f"--{what} {path}: expected a JSON object, got {type(data).__name__}"
        )
    return data


def training_record(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training record, metrics) from the checkpoint's metadata, whatever the trainer stored."""
    metadata = dict(load_metadata(checkpoint))
    metrics = metadata.pop("metrics", {}) or {}
    record = metadata.pop("training", None)
    if isinstance(record, dict):
        metadata = {**metadata, **record}
    # a checkpoint inside a run directory (runs/X/checkpoints/step_N): the run's resolved config
    # says what data, steps and options produced it
    resolved = checkpoint.resolve()
    run_config = resolved.parent.parent / "config.yaml"
    if resolved.parent.name == "checkpoints" and run_config.is_file():
        import yaml

        metadata.setdefault("run_config", yaml.safe_load(run_config.read_text()))
    selection = read_selection(checkpoint)
    if selection is not None:  # chosen on a validation split by vqtok-select
        metadata["selection"] = selection
    return metadata, metrics if isinstance(metrics, dict) else {"value": metrics}


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="vqtok-export",
        description="Export a vqmodel checkpoint to a served model directory (ONNX + model.json).",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (config.json + weights)")
    parser.add_argument("--out", required=True, help="model directory to write, e.g. models/x")
    parser.add_argument("--card", help="JSON object merged into model.json (training, metrics...)")
    parser.add_argument("--metrics", help="JSON object of eval metrics (e.g. vqtok-eval output)")
    parser.add_argument(
        "--fp16", action="store_true", help="half-precision conv stacks (GPU); argmin stays fp64"
    )
    parser.add_argument("--triton", help="also write a Triton model repository into this folder")
    parser.add_argument("--triton-max-batch", type=int, default=32)
    parser.add_argument("--triton-instances", type=int, default=1)
    parser.add_argument("--triton-kind", choices=("KIND_CPU", "KIND_GPU"), default="KIND_CPU")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0; 2 with one line on stderr for a user error (a missing, unreadable or wrong
    checkpoint, an unusable --out/--card/--metrics, the export packages not installed); 1 when
    the export itself fails (onnxruntime does not reproduce torch)."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    command = command_line(["vqtok-export", *(sys.argv[1:] if argv is None else argv)])
    try:
        run(args, command)
    except ImportError as err:
        return user_error(
            "vqtok-export",
            f"error: {err}; the export needs onnx, onnxscript and onnxruntime: "
            "pip install -e '.[export,serve]'",
        )
    except (ExportInputError, CheckpointError, OSError) as err:
        return user_error("vqtok-export", f"error: {err}")
    except (ExportError, ValueError) as err:
        print(f"vqtok-export: error: {err}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, command: str) -> None:
    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoints").is_dir():
        raise ExportInputError(
            f"{checkpoint} is a training run directory; pass one of its checkpoints, e.g. "
            f"{checkpoint / 'checkpoints' / 'best'} or {checkpoint / 'checkpoints' / 'latest'}"
        )
    model, _ = load_model(checkpoint)
    training, metrics = training_record(checkpoint)
    training.setdefault("hardware_export", platform.platform())
    metrics.update(_read_json(args.metrics, "metrics"))
    result = export_model_dir(
        model,
        args.out,
        training=training,
        metrics=metrics,
        card=_read_json(args.card, "card"),
        fp16=args.fp16,
        source=str(checkpoint.resolve()),
        command=command,
    )
    if args.fp16:
        print(
            f"fp16 token agreement with fp32 torch: {result.parity.token_agreement:.4%} "
            f"({result.parity.tokens_differing} of {result.parity.tokens_total} differ)"
        )
    if args.triton:
        from training.triton import write_triton_repository

        repo = write_triton_repository(
            result.path,
            args.triton,
            max_batch_size=args.triton_max_batch,
            instances=args.triton_instances,
            kind=args.triton_kind,
        )
        print(f"Triton model repository written to {repo}")


if __name__ == "__main__":
    raise SystemExit(main())
