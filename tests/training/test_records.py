"""A run records where and how it ran; the validation split; choosing a checkpoint on it; the
card shows the records (and nothing typed)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from training.config import load_config
from training.data import MissingSourceError
from training.data.photos import VAL_FRACTION, VAL_SHORT_SIDE, debian_photos, downscale, split_of
from training.export import training_record
from training.loop import train
from training.model_card import render_card
from training.records import command_line, git_state, hardware, utc_now
from training.select import SELECTED_LINK, main, read_selection, select_checkpoint
from vqmodel import load_metadata

TINY = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"


def test_records_come_from_the_machine_and_the_repository() -> None:
    state = git_state()
    assert re.fullmatch(r"[0-9a-f]{40}", state["git_rev"]) and isinstance(state["git_dirty"], bool)
    assert command_line(["/usr/local/bin/vqtok-train", "--config", "a b.yaml"]) == (
        "vqtok-train --config 'a b.yaml'"
    )
    facts = hardware()
    assert facts["cpus"] >= 1 and facts["machine"] and facts["cpu"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", utc_now())


def test_the_split_depends_on_the_file_name_only() -> None:
    names = [f"photo_{i}.jpg" for i in range(2000)]
    val = [name for name in names if split_of(name) == "val"]
    assert abs(len(val) / len(names) - VAL_FRACTION) < 0.03
    assert all(split_of(f"/other/dir/{name}") == "val" for name in val)  # the directory: no
    assert split_of("photo_1.jpg") == split_of("photo_1.jpg")


def test_validation_photos_are_downscaled_to_the_short_side() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (1200, 1800, 3), dtype=np.uint8)
    small = downscale(pixels)
    assert small.shape == (VAL_SHORT_SIDE, 768, 3) and small.dtype == np.uint8
    tiny = pixels[:100, :150]
    assert downscale(tiny) is tiny  # never upscaled
    with pytest.raises(ValueError, match="valid splits: train, val"):
        debian_photos(split="test")


def test_debian_train_and_val_partition_the_photos() -> None:
    try:
        whole, train_part, val_part = (debian_photos(split=s) for s in (None, "train", "val"))
    except MissingSourceError as err:
        pytest.skip(str(err))
    names = lambda source: {item.name for item in source.items}  # noqa: E731
    assert names(train_part) | names(val_part) == names(whole)
    assert not names(train_part) & names(val_part) and len(val_part) >= 1
    assert (train_part.spec, val_part.spec) == ("debian-photos:train", "debian-photos:val")
    assert min(val_part.items[0].load().shape[:2]) == VAL_SHORT_SIDE


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("select")
    overrides = [f"out_dir={root / 'run'}", f"data.cache_dir={root / 'banks'}", "steps=6",
                 "ckpt_every=2", "keep_last=5", "log_every=2", "image_every=0"]  # fmt: skip
    train(load_config(TINY, overrides), progress=False)
    return root / "run"


def test_a_checkpoint_records_how_it_was_trained(tiny_run: Path) -> None:
    meta = load_metadata(tiny_run / "checkpoints" / "step_0000006")
    assert meta["step"] == 6 and meta["cpu_s"] > 0 and meta["wall_s"] > 0
    assert meta["started_at"] <= meta["ended_at"]
    assert meta["git_rev"] == git_state()["git_rev"] and "git_dirty" in meta
    assert meta["command"] == command_line(sys.argv) and meta["hardware"]["cpus"] >= 1
    assert meta["data"]["source"] == "pip-photos" and meta["data"]["images"] >= 1
    assert len(meta["data"]["fingerprint"]) == 64


def test_select_chooses_the_best_checkpoint_on_the_given_data(tiny_run: Path, capsys) -> None:
    record = select_checkpoint(tiny_run, "pip-photos", progress=False)
    steps = [row["step"] for row in record["candidates"]]
    assert steps == [2, 4, 6]
    best = max(record["candidates"], key=lambda row: row["psnr"])
    assert record["chosen"] == best and record["data"] == "pip-photos"
    link = tiny_run / "checkpoints" / SELECTED_LINK
    assert link.resolve().name == best["checkpoint"]
    assert json.loads((tiny_run / "selection.json").read_text()) == record
    assert read_selection(link) == record  # what vqtok-export records
    other = next(row for row in record["candidates"] if row != best)["checkpoint"]
    assert read_selection(tiny_run / "checkpoints" / other) is None
    training, _ = training_record(link)
    card = render_card(_manifest(training), {})
    assert f"step {best['step']} of 3 checkpoints, highest psnr on `pip-photos`" in card
    assert "training hardware" in card and training["started_at"] in card


def test_select_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqtok-select: ") and "no step checkpoints" in err
    assert err.count("\n") == 1


def _manifest(training: dict) -> dict:
    return {"id": "x", "downsample": 4, "codebook_size": 64, "image_size": 32,
            "training": training, "metrics": {}, "export": {}}  # fmt: skip
