"""The chaos harness in short form: SIGKILLs at random moments lose and invent nothing."""

from __future__ import annotations

import pytest

from bench.chaos import run_chaos


@pytest.mark.parametrize("window", ["count", "session"])
def test_sigkill_loses_nothing_and_exactly_once_duplicates_nothing(bootstrap: str, window: str, tmp_path) -> None:
    results = run_chaos(lines=20_000, kills=3, modes=["exactly-once", "at-least-once"], window=window,
                        bootstrap=bootstrap, log_dir=tmp_path, rate=4000.0)
    for result in results:
        assert result.kills == 3
        assert result.expected > 0 and result.lost == 0 and result.unexpected == 0, result.line()
        if result.mode == "exactly-once":
            assert result.duplicated == 0, result.line()
