"""Shared fixtures: one embedded broker per test session (real Kafka protocol, no mocks)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from logstream.broker import EmbeddedBroker  # noqa: E402
from logstream.logs import configure_logging  # noqa: E402

configure_logging(os.environ.get("LOGSTREAM_TEST_LOG_LEVEL", "WARNING"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The embedded broker, started once for the session on a free port with its own data directory."""
    instance = EmbeddedBroker(data_dir=tmp_path_factory.mktemp("broker")).start()
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def bootstrap(broker: EmbeddedBroker) -> str:
    return broker.bootstrap_servers
