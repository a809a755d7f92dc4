"""The model card is rendered from model.json: every figure on it is model.json's."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from training.model_card import CARD_FILE, card_for, main, render_card

DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"


def test_the_shipped_card_is_the_rendering_of_its_model_json() -> None:
    assert (DEFAULT / CARD_FILE).read_text() == card_for(DEFAULT), (
        "models/default/README.md is stale: python -m training.model_card models/default"
    )
    assert main([str(DEFAULT), "--check"]) == 0


def test_the_card_follows_the_records() -> None:
    manifest = json.loads((DEFAULT / "model.json").read_text())
    sizes = {"encoder.onnx": 3_500_000}
    card = render_card(manifest, sizes)
    assert f"{manifest['metrics']['psnr']:.2f} dB" in card
    assert f"{100 * manifest['metrics']['usage']:.1f} %" in card
    changed = copy.deepcopy(manifest)
    changed["metrics"]["psnr"] = 31.25
    changed["metrics"]["per_image"][0]["psnr"] = 12.5
    new = render_card(changed, sizes)
    assert "31.25 dB" in new and "12.50" in new and new != card


def test_a_resumed_run_lists_its_invocations() -> None:
    manifest = json.loads((DEFAULT / "model.json").read_text())
    changed = copy.deepcopy(manifest)
    changed["training"]["invocations"] = [
        {"from_step": 0, "started_at": "2026-12-02T01:00:00Z", "command": "vqtok-train A"},
        {"from_step": 79, "started_at": "2026-12-02T02:00:00Z", "command": "vqtok-train B"},
    ]
    card = render_card(changed, {})
    first = "from step 0 at 2026-12-02T01:00:00Z: `vqtok-train A`;"
    assert f"| training invocations | 2: {first}" in card
    assert "from step 79 at 2026-12-02T02:00:00Z: `vqtok-train B` |" in card


def test_a_missing_or_broken_model_json_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nowhere")]) == 2
    (tmp_path / "model.json").write_text("{not json")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "not valid JSON" in err[1], err
