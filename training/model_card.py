"""The model card (a model folder's README.md), rendered from model.json and nothing else.

    python -m training.model_card models/default            # rewrite models/default/README.md
    python -m training.model_card models/default --check    # exit 1 if README.md is stale

Every figure on the card is read from model.json (the export's own records: config, training
record, eval report, parity check, file sizes), so the card cannot drift from the model it
describes; the only human text is model.json's `description`, `license` and `limitations`.
`vqtok-export` writes the card; tests/training/test_model_card.py checks models/default's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from service.cli_parser import CliParser
from service.files import write_bytes_atomic
from service.model_dir import MODEL_FILE, ModelDirError, read_manifest

CARD_FILE = "README.md"


def render_card(manifest: dict[str, Any], sizes: dict[str, int]) -> str:
    """The card's markdown for a model.json dict and its files' sizes in bytes."""
    lines = [
        f"# {manifest['id']} — model card",
        "",
        f"Generated from `{MODEL_FILE}` by `python -m training.model_card` (do not edit by hand).",
        "",
        manifest.get("description", ""),
        "",
        "| | |",
        "|---|---|",
        *_architecture_rows(manifest),
        *_training_rows(manifest.get("training", {})),
        *_metric_rows(manifest.get("metrics", {})),
        *_export_rows(manifest.get("export", {}), sizes),
        "",
        *_per_image(manifest.get("metrics", {})),
        f"Licence: {manifest.get('license', 'not stated')}",
        "",
        f"Limitations: {manifest.get('limitations', 'not stated')}",
        "",
    ]
    return "\n".join(lines)


def _architecture_rows(manifest: dict[str, Any]) -> list[str]:
    config = manifest.get("model_config", {})
    quantizer = config.get("quantizer", {})
    f, k = manifest["downsample"], manifest["codebook_size"]
    return [
        f"| architecture | VQ-VAE, f = {f}, base {config.get('base_channels')} channels × "
        f"{tuple(config.get('channel_mult', ()))}, {_res_blocks(config)}, "
        f"norm `{config.get('norm')}`, code dim {config.get('code_dim')} |",
        f"| codebook | {k} codes, β {quantizer.get('beta')}, affine `{quantizer.get('affine')}`, "
        f"sync ν {quantizer.get('sync_nu')}, k-means init {quantizer.get('kmeans_init')}, "
        f"replacement every {quantizer.get('replace_freq')} steps |",
        f"| native size | {manifest['image_size']} (any H, W that are multiples of {f}) |",
    ]


def _res_blocks(config: dict[str, Any]) -> str:
    encoder = config.get("num_res_blocks")
    decoder = config.get("decoder_res_blocks") or encoder
    if decoder == encoder:
        return f"{encoder} residual block(s) per level"
    return f"{encoder} (encoder) / {decoder} (decoder) residual block(s) per level"


def _training_rows(training: dict[str, Any]) -> list[str]:
    keys = ("step", "mode", "device", "world_size", "torch", "command", "git_rev", "git_dirty")
    rows = [f"| training {key} | {training[key]} |" for key in keys if key in training]
    if "wall_s" in training:
        cpu = f", {training['cpu_s'] / 3600:.2f} CPU hours" if "cpu_s" in training else ""
        rows.append(f"| training time | {training['wall_s'] / 60:.1f} min wall{cpu} |")
    if "started_at" in training:
        rows.append(f"| training ran | {training['started_at']} to {training.get('ended_at')} |")
    invocations = training.get("invocations") or []
    if len(invocations) > 1:  # a resumed run: each invocation, so config changes are visible
        runs = "; ".join(
            f"from step {run.get('from_step')} at {run.get('started_at')}: `{run.get('command')}`"
            for run in invocations
        )
        rows.append(f"| training invocations | {len(invocations)}: {runs} |")
    hardware = training.get("hardware")
    if isinstance(hardware, dict):
        rows.append(
            f"| training hardware | {hardware.get('cpu')}, {hardware.get('cpus')} CPUs, "
            f"{hardware.get('machine')}, {hardware.get('system')} |"
        )
    data = training.get("data")
    if isinstance(data, dict):
        rows.append(f"| training data | `{data.get('source')}`: {data.get('images')} images |")
    elif data is not None:
        rows.append(f"| training data | {data} |")
    return rows + _selection_rows(training.get("selection"))


def _selection_rows(selection: dict[str, Any] | None) -> list[str]:
    if not selection:
        return []
    chosen = selection["chosen"]
    return [
        f"| checkpoint choice | step {chosen['step']} of {len(selection['candidates'])} "
        f"checkpoints, highest {selection['metric']} on `{selection['data']}` "
        f"({len(selection['images'])} images): {_fmt(chosen['psnr'], '.2f')} dB, usage "
        f"{_fmt(100 * chosen['usage'], '.1f')} % |"
    ]


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    if not metrics:
        return ["| evaluation | none recorded |"]
    worst = min(metrics.get("per_image", []), key=lambda row: row["psnr"], default=None)
    rows = [
        f"| evaluation | {metrics.get('images')} images of `{metrics.get('data')}` at native "
        f"size ({metrics.get('conventions', {}).get('padding', '')}) |",
        f"| PSNR / SSIM | {_fmt(metrics.get('psnr'), '.2f')} dB / "
        f"{_fmt(metrics.get('ssim'), '.3f')} |",
        f"| codebook usage | {_fmt(100 * metrics.get('usage', 0), '.1f')} % of "
        f"{metrics.get('num_codes')} codes ({metrics.get('dead_codes')} unused), perplexity "
        f"{_fmt(metrics.get('perplexity'), '.1f')} |",
        f"| bits per pixel | {_fmt(metrics.get('bpp_fixed'), '.4f')} fixed-length, "
        f"{_fmt(metrics.get('bpp_entropy'), '.4f')} empirical entropy |",
    ]
    if worst is not None:
        rows.append(f"| worst image | {worst['name']}: {_fmt(worst['psnr'], '.2f')} dB |")
    return rows


def _export_rows(export: dict[str, Any], sizes: dict[str, int]) -> list[str]:
    parity = export.get("parity", {})
    equal = parity.get("tokens_total", 0) - parity.get("tokens_differing", 0)
    total = sum(sizes.values())
    files = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(sizes.items()))
    return [
        f"| export | `{export.get('command')}` at git {export.get('git_rev')}, "
        f"{export.get('created')} |",
        f"| torch vs onnxruntime | {equal} / {parity.get('tokens_total')} tokens equal, images "
        f"within "
        f"{_fmt(parity.get('max_image_abs_diff'), '.1e')} |",
        f"| size | {total / 1e6:.1f} MB ({files}) |",
    ]


def _per_image(metrics: dict[str, Any]) -> list[str]:
    rows = metrics.get("per_image", [])
    if not rows:
        return []
    table = ["| image | H×W | PSNR dB | SSIM | codes used |", "|---|---|---:|---:|---:|"]
    table += [
        f"| {r['name']} | {r['height']}×{r['width']} | {_fmt(r['psnr'], '.2f')} | "
        f"{_fmt(r['ssim'], '.3f')} | {r.get('codes_used')} |"
        for r in rows
    ]
    return [*table, ""]


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def card_for(model_dir: Path) -> str:
    manifest = read_manifest(model_dir)  # a ModelDirError names the file and what is wrong
    sizes = {name: (model_dir / name).stat().st_size for name in manifest.get("files", {})}
    return render_card(manifest, sizes)


def write_card(model_dir: Path) -> Path:
    path = model_dir / CARD_FILE
    write_bytes_atomic(path, card_for(model_dir).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    args = parser.parse_args(argv)
    try:
        card = card_for(args.model_dir)
    except ModelDirError as err:  # missing folder, missing or broken model.json: one line
        print(f"model_card: error: {err}", file=sys.stderr)
        return 2
    path = args.model_dir / CARD_FILE
    if args.check:
        if (path.read_text() if path.is_file() else "") != card:
            print(f"model_card: {path} is stale; regenerate it", file=sys.stderr)
            return 1
        return 0
    write_bytes_atomic(path, card.encode())
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
