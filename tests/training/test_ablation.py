"""vqtok-ablation: a tiny two-row run writes the table and JSON, and finished rows are skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import training.ablation as ablation
from training.ablation import load_ablation, main, row_config, run_ablation
from training.config import ConfigError


def tiny_spec(cache_dir: Path) -> dict[str, Any]:
    return {
        "base": {
            "model": {
                "downsample": 4,
                "base_channels": 8,
                "channel_mult": [1, 1],
                "code_dim": 4,
                "image_size": 16,
                "quantizer": {"num_codes": 32, "beta": 0.8},
            },
            "data": {
                "source": "pip-photos",
                "patch_size": 16,
                "bank_size": 64,
                "batch_size": 8,
                "workers": 0,
                "cache_dir": str(cache_dir),
            },
            "optim": {"warmup_steps": 1},
            "mode": "standard",
            "steps": 3,
            "log_every": 1,
            "ckpt_every": 3,
            "image_every": 0,
            "device": "cpu",
        },
        "eval": {"data": "pip-photos", "limit": 1},
        "pairs": [["full", "baseline"]],
        "rows": {
            "baseline": {"label": "baseline", "overrides": {}},
            "full": {
                "label": "full",
                "overrides": {
                    "mode": "alternating",
                    "model.quantizer.affine": "learned",
                    "model.quantizer.sync_nu": 0.2,
                    "model.quantizer.kmeans_init": True,
                    "model.quantizer.kmeans_samples": 64,
                    "model.quantizer.replace_freq": 2,
                },
            },
        },
    }


@pytest.fixture()
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp_path / "cache")))
    return path


def counting_train(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = ablation.train

    def spy(config: Any, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        calls.append(config.steps)
        return real(config, resume=resume, progress=progress)

    monkeypatch.setattr(ablation, "train", spy)
    return calls


def test_two_rows_write_table_and_json_then_rerun_skips_them(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    calls = counting_train(monkeypatch)
    argv = ["--config", str(config_file), "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert calls == [3, 3]

    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["baseline", "full"]
    for row_id, row in results["rows"].items():
        assert row["steps"] == 3 and row["sec_per_step"] > 0
        assert 0 < row["mse"] < 1 and 0 < row["usage"] <= 1 and row["perplexity"] >= 1
        assert list(row["per_image_psnr"]) == ["astronaut"]
        assert Path(row["checkpoint"]).parent.parent == out / row_id
    assert results["rows"]["full"]["config"]["mode"] == "alternating"
    assert results["rows"]["full"]["config"]["model"]["quantizer"]["affine"] == "learned"
    assert results["rows"]["baseline"]["config"]["model"]["quantizer"]["affine"] == "off"
    table = (out / "table.md").read_text()
    assert "| baseline |" in table and "| full |" in table
    assert "full / baseline perplexity ≥ 20×" in table  # the targets are checked
    assert "full MSE < baseline MSE" in table  # and the configured pair

    # re-run: nothing trains again, the results are untouched
    before = (out / "results.json").read_text()
    assert main(argv) == 0
    assert calls == [3, 3]
    after = json.loads((out / "results.json").read_text())
    assert after["rows"] == json.loads(before)["rows"]

    # a different step count is a different experiment: that row trains again from scratch
    assert main([*argv, "--rows", "baseline", "--steps", "2"]) == 0
    assert calls == [3, 3, 2]
    assert json.loads((out / "results.json").read_text())["rows"]["baseline"]["steps"] == 2


def test_seeds_repeat_rows_reuse_the_plain_run_and_report_means(
    config_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    calls = counting_train(monkeypatch)
    argv = ["--config", str(config_file), "--out", str(out), "--no-progress", "--threads", "1"]
    assert main([*argv, "--rows", "full"]) == 0  # the plain row first: seed 0
    assert main([*argv, "--rows", "full", "--seeds", "0,2"]) == 0
    assert calls == [3, 3]  # seed 0 is the plain run: only seed 2 trained

    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["full", "full-seed2"]
    seeded = results["rows"]["full-seed2"]
    assert (seeded["row"], seeded["seed"]) == ("full", 2)
    assert (seeded["config"]["seed"], seeded["config"]["data"]["seed"]) == (2, 2)
    assert Path(seeded["checkpoint"]).parent.parent == out / "full-seed2"
    # another seed is another experiment: other patches and initial weights, other numbers
    assert seeded["mse"] != results["rows"]["full"]["mse"]
    table = (out / "table.md").read_text()
    plain_part, seeds_part = table.split("Across seeds")
    assert "| full | 0,2 |" in seeds_part
    mean = (seeded["mse"] + results["rows"]["full"]["mse"]) / 2
    assert f"{mean:.3e} ± " in seeds_part
    assert plain_part.count("| full |") == 2  # the per-seed table and the window table

    assert main([*argv, "--rows", "full", "--seeds", "2,0"]) == 0  # all done: nothing trains
    assert calls == [3, 3]
    # --set changes every row's base config: another experiment, trained again
    assert main([*argv, "--rows", "full", "--set", "model.code_dim=8"]) == 0
    assert calls == [3, 3, 3]
    results = json.loads((out / "results.json").read_text())
    assert results["rows"]["full"]["config"]["model"]["code_dim"] == 8
    capsys.readouterr()
    assert main([*argv, "--rows", "full", "--set", "model.code_dimm=8"]) == 2
    assert "model.code_dimm: unknown key" in capsys.readouterr().err
    assert calls == [3, 3, 3]
    assert main([*argv, "--seeds", "1,x"]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err


def test_seed_table_keeps_runs_that_share_a_model_seed_apart() -> None:
    def run(row: str, seed: int, data_seed: int, mse: float) -> dict[str, Any]:
        metrics = {"mse": mse, "psnr": 20.0, "ssim": 0.5, "usage": 0.5, "perplexity": 10.0}
        return {
            **metrics,
            "dead_codes": 1,
            "sec_per_step": 0.1,
            "row": row,
            "label": row,
            "config": {"seed": seed, "data": {"seed": data_seed}},
            "final_train_metrics": {"recon": mse, "usage": 1.0, "perplexity": 9.0},
        }

    # a base with data seed 5: --seeds 0 is then another experiment than the plain row
    results = {
        "rows": {"full": run("full", 0, 5, 1e-3), "full-seed0": run("full", 0, 0, 3e-3)},
        "order": ["full"],
    }
    seeds_part = ablation.results_table(results).split("Across seeds")[1]
    assert "| full | 0,0/5 | 2.000e-03 ± 1.414e-03 |" in seeds_part


def test_bad_row_or_key_fails_before_any_training(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_train(monkeypatch)
    with pytest.raises(ConfigError, match=r"--rows: unknown row\(s\) \['nope'\]"):
        run_ablation(config_file, tmp_path / "out", rows=["baseline", "nope"], progress=False)
    spec = tiny_spec(tmp_path)
    spec["rows"]["full"]["overrides"]["model.quantizer.afine"] = "learned"
    config_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"(?s)row 'full'.*model\.quantizer\.afine: unknown key"):
        run_ablation(config_file, tmp_path / "out", progress=False)
    spec = tiny_spec(tmp_path)
    spec["pairs"] = [["full", "strongest"]]
    config_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(
        ConfigError, match=r"pairs: expected a list of \[method row, reference row\]"
    ):
        run_ablation(config_file, tmp_path / "out", progress=False)
    assert calls == []


def test_shipped_config_rows_differ_from_baseline_only_in_their_technique() -> None:
    spec = load_ablation("training/configs/ablation.yaml")
    assert list(spec["rows"]) == [
        "baseline",
        "affine",
        "sync",
        "alternating",
        "replacement",
        "kmeans",
        "full",
        "strong",
        "full_b95",
        "strong_b95",
    ]
    assert spec["pairs"] == [["full", "strong"], ["full_b95", "strong_b95"], ["full_b95", "strong"]]
    configs = {r: row_config(spec, r, Path("runs/x")) for r in spec["rows"]}
    base = configs["baseline"]
    q = base.model.quantizer
    assert (base.mode, q.beta, q.affine, q.sync_nu, q.replace_freq, q.kmeans_init) == (
        "standard",
        0.8,
        "off",
        0.0,
        0,
        False,
    )
    assert q.num_codes == 1024 and q.init_std is None
    full, strong = configs["full"], configs["strong"]
    assert full.mode == "alternating" and full.model.quantizer.affine != "off"
    assert full.model.quantizer.sync_nu > 0 and full.model.quantizer.kmeans_init
    assert strong.mode == "standard" and strong.model.quantizer.affine == "off"
    assert strong.model.quantizer.kmeans_init and strong.model.quantizer.replace_freq > 0
    # the pairs differ only in affine, sync and alternating (+ beta in the last one)
    for (method, reference), also in zip(spec["pairs"], ({}, {}, {"beta": 0.8})):
        a, b = configs[method], configs[reference]
        assert (a.mode, b.mode) == ("alternating", "standard")
        assert a.model.quantizer.model_copy(
            update={"affine": "off", "affine_lr": 1.0, "sync_nu": 0.0, **also}
        ) == b.model.quantizer.model_copy(update={"affine_lr": 1.0})
    for config in configs.values():  # same data, steps, seed, architecture
        assert (config.data, config.steps, config.seed) == (base.data, base.steps, base.seed)
        assert config.model.widths == base.model.widths


def test_report_follows_the_configured_rows_and_pairs() -> None:
    # no row is called baseline or full: the first row is the baseline, the pairs name the rest
    def run(label: str, mse: float, usage: float, perplexity: float) -> dict[str, Any]:
        metrics = {"mse": mse, "psnr": 20.0, "ssim": 0.5, "usage": usage, "perplexity": perplexity}
        window = {"recon": mse, "psnr": 20.0, "usage": usage, "perplexity": perplexity}
        extra = {"dead_codes": 0, "sec_per_step": 0.1, "final_train_metrics": window}
        return {**metrics, **extra, "label": label, "config": {"seed": 0, "data": {"seed": 0}}}

    results = {
        "rows": {
            "toolkit": run("the toolkit", 2e-3, 0.9, 300.0),
            "plain": run("plain STE", 1e-2, 0.05, 10.0),
            "kmeans": run("k-means only", 3e-3, 0.8, 250.0),
        },
        "order": ["plain", "toolkit", "kmeans"],
        "pairs": [["toolkit", "kmeans"]],
        "eval": {"data": "pip-photos"},
    }
    native = ablation.results_table(results).split("Last training log window")[0]
    assert native.index("| plain STE |") < native.index("| the toolkit |")  # config order
    assert "| the toolkit | 2.000e-03 |" in native and "| 0.20× | 30.0× |" in native
    assert "| toolkit / plain perplexity ≥ 20× | 30.0× | yes |" in native
    assert "| toolkit / plain MSE ≤ 0.6× | 0.20× | yes |" in native
    assert "| toolkit MSE < kmeans MSE | 0.667× | yes |" in native
    assert "| toolkit usage > kmeans usage | 90.0% vs 80.0% | yes |" in native
    assert "kmeans / plain" not in native  # a reference row has no headline target


def test_cli_user_errors_are_one_line_and_exit_2(
    config_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = counting_train(monkeypatch)
    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    spec = tiny_spec(tmp_path)
    spec["eval"]["data"] = f"folder:{tmp_path / 'none'}"
    no_eval_data = tmp_path / "no-eval-data.yaml"
    no_eval_data.write_text(yaml.safe_dump(spec))
    for argv, message in (
        (["--config", str(tmp_path / "nope.yaml")], "cannot read ablation config"),
        (["--config", str(no_eval_data)], f"eval.data='folder:{tmp_path / 'none'}': image folder"),
        (["--config", str(config_file), "--steps", "0"], "--steps must be >= 1, got 0"),
    ):
        assert main([*argv, *out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vqtok-ablation: ") and err.count("\n") == 1, err
        assert message in err
    assert calls == []
