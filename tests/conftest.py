"""Shared fixtures: one embedded broker per test session (real Kafka protocol, no mocks)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The cache with the prepared embedded base models (setup.sh prepared them; else converted once here)."""
    from logstream.basemodels import resolve_embedder, resolve_llm
    from logstream.settings import Settings

    cache = Settings().cache_dir
    resolve_embedder(None, cache)
    resolve_llm(None, cache)
    return cache


@pytest.fixture(scope="session")
def tiny_logllm(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Path:
    """A LogLLM artifact on the embedded models, trained for a few steps (tests/logllm_tools.py)."""
    from tests.logllm_tools import train_tiny_artifact

    return train_tiny_artifact(tmp_path_factory.mktemp("logllm") / "artifact", model_cache_dir)
