"""An explicit GPU request that onnxruntime silently downgrades to CPU is refused, per graph."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

import service.engine
from service.engine import CPU, CUDA, Engine, EngineError


class _Downgraded:
    """A real CPU session that reports the providers a silent fallback would leave."""

    def __init__(self, session: ort.InferenceSession, providers: list[str]) -> None:
        self._session, self._providers = session, providers

    def get_providers(self) -> list[str]:
        return self._providers

    def run(self, *args, **kwargs):
        return self._session.run(*args, **kwargs)


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, fallback_for: str) -> None:
    real_session = service.engine._session
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])

    def session(model: bytes, options, providers: list[str], path: Path):
        made = real_session(model, options, [CPU], path)
        active = [CPU] if path.name == fallback_for else [CUDA, CPU]
        return _Downgraded(made, active)

    monkeypatch.setattr(service.engine, "_session", session)


@pytest.mark.parametrize("graph", ["encoder.onnx", "decoder.onnx"])
def test_a_gpu_request_downgraded_to_cpu_is_refused(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, graph: str
) -> None:
    _fake_gpu(monkeypatch, fallback_for=graph)
    with pytest.raises(EngineError, match=f"providers='cuda': onnxruntime runs {graph} on"):
        Engine(tiny_model_dir, providers="cuda", warmup=False)


def test_auto_accepts_whatever_onnxruntime_runs(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gpu(monkeypatch, fallback_for="decoder.onnx")
    engine = Engine(tiny_model_dir, providers="auto", warmup=False)  # auto may fall back
    assert engine.active_providers[0] == CUDA
