"""Fixtures for the service's ASGI tests (helpers in service_fakes.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from service_fakes import FakeEngine, make_client


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(fake_engine: FakeEngine) -> Iterator[TestClient]:
    with make_client(fake_engine) as test_client:
        yield test_client
