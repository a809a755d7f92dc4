"""TrainConfig: YAML + dotted overrides; each mistake is named by its dotted key before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, TrainConfig, load_config
from training.select import DEFAULT_DATA

CONFIG_DIR = Path(__file__).resolve().parents[2] / "training" / "configs"
TINY = CONFIG_DIR / "tiny.yaml"


def _error(overrides: list[str], path: Path | None = TINY) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return str(err.value)


@pytest.mark.parametrize("name", ["tiny.yaml", "default.yaml"])
def test_shipped_training_configs_load(name: str) -> None:
    config = load_config(CONFIG_DIR / name)
    assert config.data.patch_size % config.model.downsample == 0


def test_overrides_use_dotted_keys_and_yaml_values() -> None:
    config = load_config(
        TINY,
        ["model.quantizer.num_codes=32", "optim.lr=3e-4", "optim.betas=[0.5, 0.9]", "amp=false"],
    )
    assert config.model.quantizer.num_codes == 32
    assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.5, 0.9)
    assert config.amp == "off"
    # everything else still comes from the file
    assert config.model.base_channels == yaml.safe_load(TINY.read_text())["model"]["base_channels"]


@pytest.mark.parametrize(
    ("overrides", "key", "detail"),
    [
        (["optim.lrr=1e-3"], "optim.lrr", "unknown key"),
        (["model.quantizer.num_codez=8"], "model.quantizer.num_codez", "unknown key"),
        (["model.quantizer.num_codes=many"], "model.quantizer.num_codes", "'many'"),
        (["steps=ten"], "steps", "'ten'"),
        (["mode=sideways"], "mode", "'sideways'"),
        (["model.downsample=6"], "model.downsample", "power of two"),
        (["model.image_size=30"], "model.image_size", "image_size=30"),
        (["data.patch_size=18"], "data.patch_size", "data.patch_size=18"),
        (["model.quantizer.groups=3"], "model.quantizer.dim", "groups=3"),
        (["model.quantizer.inplace=true"], "model.quantizer.inplace", "mode=inplace"),
        # VQVAE.encode (and the export) serve one token per position: refused before training
        (["model.quantizer.groups=2"], "model.quantizer.groups", "groups=2 is not supported"),
        (["model.quantizer.residual_stages=2"], "model.quantizer.residual_stages", "=1"),
    ],
)
def test_bad_values_name_the_dotted_key(overrides: list[str], key: str, detail: str) -> None:
    message = _error(overrides)
    assert f"\n  {key}: " in message
    assert detail in message


def test_unknown_key_in_the_yaml_file_is_named(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["data"]["batchsize"] = 8
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    message = _error([], path)
    assert "data.batchsize: unknown key" in message and str(path) in message


def test_override_into_a_value_and_malformed_override_are_errors() -> None:
    assert "steps is a value" in _error(["steps=10", "steps.fast=1"])
    assert "dotted.key=value" in _error(["steps"])


def test_yaml_scalars_follow_yaml_1_2() -> None:
    # YAML 1.1 would read `off` as False and `3e-4` as a string
    config = load_config(TINY, ["model.quantizer.affine=off", "optim.lr=3e-4", "amp=false"])
    assert config.model.quantizer.affine == "off"
    assert config.optim.lr == 3e-4 and config.amp == "off"


def test_mode_inplace_switches_the_quantizer_to_its_inplace_step() -> None:
    config = load_config(TINY, ["mode=inplace"])
    assert config.model.quantizer.inplace is True
    assert load_config(TINY, ["mode=standard"]).model.quantizer.inplace is False


def test_resolved_yaml_loads_back_identical(tmp_path: Path) -> None:
    config = load_config(TINY, ["mode=inplace", "optim.lr=1e-3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_config_is_frozen() -> None:
    config = TrainConfig()
    with pytest.raises(ValueError):
        config.steps = 3  # type: ignore[misc]


def test_the_default_pipeline_chooses_on_the_validation_half_of_its_training_photos() -> None:
    """`make train-default` and `vqtok-select`'s default must name the :val split of the
    photo set that training/configs/default.yaml trains on: a recipe moved to new photos while
    the checkpoint is still chosen on the old ones would choose on a split it never held out."""
    source = load_config(CONFIG_DIR / "default.yaml").data.source
    name, split = source.rsplit(":", 1)
    assert split == "train", source
    makefile = (CONFIG_DIR.parents[1] / "Makefile").read_text().splitlines()
    commands = [
        line.split() for line in makefile if line.startswith("\t") and "vqtok-select" in line
    ]
    assert [command[-2:] for command in commands] == [["--data", f"{name}:val"]]
    assert f"{name}:val" == DEFAULT_DATA
