"""vqtok-eval: native-size metrics against independent computations, whole-set usage, reports."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from service.images import decode_image, open_image
from training.evaluate import evaluate, main, pad_to_multiple, resolve_checkpoint
from vqmodel import VQVAE, ModelConfig, save_checkpoint

F4 = 4


class PaletteTokenizer:
    """A stand-in tokenizer with a known answer: each f×f block becomes the index of the nearest
    palette colour, and decoding paints that colour back (plus ``offset``). Images made of
    palette-coloured blocks therefore reconstruct exactly when ``offset`` is 0."""

    def __init__(self, palette: torch.Tensor, offset: float = 0.0) -> None:
        self.palette = palette
        self.offset = offset
        self.config = ModelConfig(
            downsample=F4,
            channel_mult=(1, 1),
            code_dim=3,
            image_size=16,
            quantizer={"num_codes": len(palette)},
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        means = F.avg_pool2d(images, F4).permute(0, 2, 3, 1)  # [N,h,w,3]
        return torch.cdist(means.reshape(-1, 3), self.palette).argmin(1).view(means.shape[:3])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        pixels = self.palette[tokens].permute(0, 3, 1, 2) + self.offset
        return pixels.repeat_interleave(F4, dim=2).repeat_interleave(F4, dim=3).clamp(0, 1)


PALETTE = torch.tensor(
    [
        [0.2, 0.2, 0.2],
        [0.8, 0.2, 0.2],
        [0.2, 0.8, 0.2],
        [0.2, 0.2, 0.8],
        [0.5, 0.5, 0.5],
        [0.8, 0.8, 0.2],
        [0.2, 0.8, 0.8],
        [0.8, 0.2, 0.8],
    ]
)


def block_image(codes: list[list[int]]) -> np.ndarray:
    """[3, 4·rows, 4·cols] image whose f×f blocks are the given palette colours."""
    tokens = torch.tensor(codes)[None]
    return PaletteTokenizer(PALETTE).decode(tokens)[0].numpy()


def tiny_model(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    config = ModelConfig(
        downsample=8,
        base_channels=8,
        channel_mult=(1, 1, 1),
        code_dim=4,
        image_size=32,
        quantizer={"num_codes": 32},
    )
    return VQVAE(config).eval()


# -- metrics ---------------------------------------------------------------------------------------
def test_exact_reconstruction_and_whole_set_usage() -> None:
    # image A uses codes 0 and 1 (two blocks each), image B codes 2 and 3: each image alone uses
    # 2 of 8 codes, the whole set 4 of 8 with a uniform distribution (perplexity 4, 2 bits)
    images = [block_image([[0, 1], [1, 0]]), block_image([[2, 3], [3, 2]])]
    result = evaluate(PaletteTokenizer(PALETTE), images, progress=False)
    assert result["mse"] == 0.0 and math.isinf(result["psnr"])
    assert result["ssim"] == pytest.approx(1.0)
    assert [row["codes_used"] for row in result["per_image"]] == [2, 2]
    assert result["usage"] == pytest.approx(0.5)
    assert result["dead_codes"] == 4
    assert result["perplexity"] == pytest.approx(4.0)
    assert result["code_counts"] == [2, 2, 2, 2, 0, 0, 0, 0]
    assert result["bpp_fixed"] == pytest.approx(3 / 16)  # log2(8) bits per 4×4 block
    assert result["bpp_entropy"] == pytest.approx(2 / 16)


def test_psnr_of_a_known_error_is_per_image_then_averaged() -> None:
    # a decoder off by +0.1 everywhere: MSE 0.01, PSNR exactly 20 dB for every image
    images = [block_image([[0, 4], [2, 3]]), block_image([[4, 4, 0]])]
    result = evaluate(PaletteTokenizer(PALETTE, offset=0.1), images, progress=False)
    assert result["mse"] == pytest.approx(0.01, rel=1e-5)
    assert [row["psnr"] for row in result["per_image"]] == pytest.approx([20.0, 20.0], abs=1e-4)
    assert result["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert result["ssim"] < 1.0


def test_mean_psnr_is_the_mean_of_per_image_values() -> None:
    # one exact image would make the mean inf; use two different error levels instead
    tokenizer = PaletteTokenizer(PALETTE, offset=0.1)
    dark = block_image([[0, 0], [0, 0]])  # 0.2 + 0.1 everywhere: error 0.1
    bright = np.full((3, 8, 8), 0.55, dtype=np.float32)  # decodes to 0.5+0.1: error 0.05
    result = evaluate(tokenizer, [dark, bright], progress=False)
    expected = [10 * math.log10(1 / 0.1**2), 10 * math.log10(1 / 0.05**2)]
    assert [row["psnr"] for row in result["per_image"]] == pytest.approx(expected, abs=1e-3)
    assert result["psnr"] == pytest.approx(np.mean(expected), abs=1e-3)
    assert result["psnr"] != pytest.approx(10 * math.log10(1 / result["mse"]), abs=0.1)


def test_native_sizes_not_multiple_of_f_match_skimage() -> None:
    model = tiny_model()
    rng = np.random.default_rng(0)
    shapes = [(21, 30), (17, 17), (21, 30), (40, 8)]
    images = [rng.random((3, h, w), dtype=np.float32) for h, w in shapes]
    result = evaluate(model, images, keep_samples=len(images), progress=False)

    assert [(r["height"], r["width"]) for r in result["per_image"]] == shapes
    for (_, original, recon), row in zip(result["samples"], result["per_image"]):
        assert recon.shape == original.shape  # cropped back to the input size
        assert row["psnr"] == pytest.approx(
            peak_signal_noise_ratio(original, recon, data_range=1.0), abs=1e-4
        )
        expected_ssim = structural_similarity(
            original.transpose(1, 2, 0).astype(np.float64),
            recon.transpose(1, 2, 0).astype(np.float64),
            data_range=1.0,
            channel_axis=-1,
        )
        assert row["ssim"] == pytest.approx(expected_ssim, abs=1e-6)
    # every token of every padded image is counted once, over the whole set
    tokens = sum(math.ceil(h / 8) * math.ceil(w / 8) for h, w in shapes)
    assert sum(result["code_counts"]) == tokens == result["tokens"]
    assert result["pixels"] == sum(h * w for h, w in shapes)


def test_padding_is_the_services_edge_padding() -> None:
    image = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 3, 6, 6)
    padded = pad_to_multiple(image, 4)
    assert padded.shape[-2:] == (8, 8)
    assert padded[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 5, 5]  # edge, not reflect
    assert padded[0, 0, :, 0].tolist() == [0] * 8
    assert pad_to_multiple(torch.ones(1, 3, 2, 2), 8).shape[-2:] == (8, 8)  # pad > side
    exact = image[..., :4, :4]
    assert torch.equal(pad_to_multiple(exact, 4), exact)  # already a multiple: unchanged


class RecordingTokenizer(PaletteTokenizer):
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.seen = images.clone()
        return super().encode(images)


def test_evaluation_encodes_what_the_service_encodes_for_resize_pad() -> None:
    # vqtok-eval's numbers are for the service's own input: the same upload (21x30, not a
    # multiple of f) through service.images' resize=pad and through evaluate's padding
    rgb = np.random.default_rng(0).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    upload = io.BytesIO()
    Image.fromarray(rgb).save(upload, format="PNG")
    prepared = decode_image(
        open_image(upload.getvalue(), field="images"),
        policy="pad",
        native_size=16,
        downsample=F4,
        field="images",
    )
    tokenizer = RecordingTokenizer(PALETTE)
    evaluate(tokenizer, [rgb.transpose(2, 0, 1)], progress=False)  # uint8: scaled by 1/255
    assert tokenizer.seen.shape[-2:] == prepared.image_size == (24, 32)
    np.testing.assert_allclose(tokenizer.seen[0].numpy(), prepared.pixels, atol=1e-6)


# -- CLI and reports -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoints" / "best", tiny_model(), metadata={"step": 3})
    lines = [
        {"step": s, "split": "train", "loss": 1.0 / s, "psnr": 10 + s, "usage": 0.1 * s, "lr": 1e-3}
        for s in (1, 2, 3)
    ]
    lines.append({"step": 3, "split": "eval", "psnr": 12.5, "perplexity": 7.0})
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 4, "spl'  # killed mid-write
    (run / "metrics.jsonl").write_text(text)
    return run


def test_cli_on_a_run_dir_writes_reports_and_curves(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    argv = [str(run_dir), "--data", "pip-photos", "--limit", "2", "--out", str(out)]
    assert main([*argv, "--no-progress", "--device", "cpu", "--grid", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 2 and report["data"] == "pip-photos"
    assert [row["name"] for row in report["per_image"]] == ["astronaut", "chelsea"]
    # chelsea is 300×451: not a multiple of 8, evaluated at its own size
    assert (report["per_image"][1]["height"], report["per_image"][1]["width"]) == (300, 451)
    assert report["model"]["path"].endswith("checkpoints/best")
    assert report["model"]["metadata"] == {"step": 3}
    assert sum(report["code_counts"]) == report["tokens"] == 64 * 64 + 38 * 57
    assert 0 < report["usage"] <= 1 and 10 * math.log10(1 / report["mse"]) < 60
    markdown = (out / "report.md").read_text()
    assert "PSNR" in markdown and "chelsea | 300×451" in markdown
    for name in ("reconstructions.png", "code_usage.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in markdown


def test_exported_model_dir_without_log_skips_curves(run_dir: Path, tmp_path: Path) -> None:
    exported = tmp_path / "model"
    exported.mkdir()
    for name in ("config.json", "weights.safetensors"):  # no checkpoint.json: not verified
        shutil.copy(run_dir / "checkpoints" / "best" / name, exported / name)
    assert main([str(exported), "--limit", "1", "--no-progress", "--grid", "0"]) == 0
    out = exported / "eval"
    assert json.loads((out / "report.json").read_text())["images"] == 1
    assert not (out / "training_curves.png").exists()
    assert not (out / "reconstructions.png").exists()


def test_not_a_checkpoint_names_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json.*weights\.safetensors.*checkpoints"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}"], "CHECKPOINT {missing} does not exist"),
        (["{run}", "--data", "folder:{missing}"], "--data='folder:{missing}': image folder"),
        (["{run}", "--data", "no-such-source"], "unknown image source 'no-such-source'"),
        (["{run}", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["{run}", "--device", "cuda:99"], "--device cuda:99"),
        (["{bad}"], "config.json"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad"  # a checkpoint whose config is not JSON
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    shutil.copy(run_dir / "checkpoints" / "best" / "weights.safetensors", bad)
    paths = {"missing": tmp_path / "missing", "run": run_dir, "bad": bad}
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = main([a.format(**paths) for a in argv] + ["--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("vqtok-eval: ") and err.count("\n") == 1, err
    assert message.format(**paths) in err
