"""Settings: VQTOK_* environment, CLI flags over the environment, refused combinations."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import flag_overrides, main, parse_args
from service.settings import Settings


def test_environment_is_read_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQTOK_MAX_BATCH", "4")
    monkeypatch.setenv("VQTOK_MODEL_DIR", "/env/model")
    monkeypatch.setenv("VQTOK_API_KEY", "s3cret-key")
    assert Settings().max_batch == 4
    settings = Settings(**flag_overrides(parse_args(["--max-batch", "8", "--no-warmup"])))
    assert settings.max_batch == 8  # flag over environment
    assert settings.model_dir == Path("/env/model")  # environment where no flag was given
    assert settings.warmup is False
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret-key" not in repr(settings)  # the key never shows up in logs


def test_drain_flags_and_no_workers_flag(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--pre-stop-delay-s", "0.5", "--drain-timeout-s", "7"]
    settings = Settings(**flag_overrides(parse_args(flags)))
    assert (settings.pre_stop_delay_s, settings.drain_timeout_s) == (0.5, 7.0)
    # one process per replica: several processes would skip the model check and the drain
    with pytest.raises(SystemExit) as refused:
        parse_args(["--workers", "4"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --workers 4" in capsys.readouterr().err


def test_an_empty_api_key_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQTOK_API_KEY", "")
    assert Settings().api_key is None


def test_refused_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match="max_images"):
        Settings(max_images=32, max_queue=16)
    with pytest.raises(ValidationError):
        Settings(providers="gpu")
    assert main(["--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err
