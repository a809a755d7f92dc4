"""Shared test settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The CI machine has 2 shared cores: one intra-op thread per test process is both faster
    # and far less sensitive to other load than oversubscribing.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- shared model fixtures (export / engine / service tests) ---------------------------------------
PHOTO_SIZES = ((64, 64), (64, 96), (96, 64), (48, 80))


@pytest.fixture(scope="session")
def photo_images() -> list:
    """Real photos (pip-bundled: astronaut, chelsea, coffee, rocket) as float32 [3,H,W] in [0,1],
    downscaled and centre-cropped to ``PHOTO_SIZES`` (multiples of 8, three non-square)."""
    import numpy as np
    from PIL import Image

    from service.images import fit_crop, unit_pixels
    from training.data import pip_photos

    photos = []
    for (h, w), (_, rgb) in zip(PHOTO_SIZES, pip_photos().images()):
        # the service's fit to the longer side, then the centre h x w (as export verification)
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        crop = fit_crop(Image.fromarray(rgb), side)[top : top + h, left : left + w]
        photos.append(unit_pixels(np.ascontiguousarray(crop)))
    return photos


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, photo_images: list) -> object:
    """A served model directory (model.json, encoder.onnx, decoder.onnx, weights) of a tiny
    random VQVAE: f=8, 64 codes, image_size 64, base_channels 8. The codebook is k-means on the
    encoder's outputs for the photos, so the photos use many codes (not the 2-3 a random
    codebook would give). Exported (and parity-verified) once per test session; treat it as
    read-only."""
    from training.export import export_model_dir
    from vqmodel import VQVAE, ModelConfig, kmeans

    torch.manual_seed(0)
    config = ModelConfig(base_channels=8, image_size=64, quantizer={"num_codes": 64})
    model = VQVAE(config).eval()
    with torch.no_grad():
        rows = torch.cat(
            [
                model.encode_features(torch.from_numpy(p)[None]).permute(0, 2, 3, 1).flatten(0, 2)
                for p in photo_images
            ]
        )
        centers = kmeans(rows, 64, iters=10, generator=torch.Generator().manual_seed(0))
        model.quantizer.codebooks[0].weight.copy_(centers)
    out = tmp_path_factory.mktemp("models") / "tiny"
    batches = {tuple(p.shape[1:]): p[None] for p in photo_images}
    export_model_dir(
        model,
        out,
        training={"data": "random weights, k-means codebook on pip photos", "steps": 0},
        verify_batches=batches,
        progress=None,
    )
    return out
