"""The `null` detector: judges every window normal. For plumbing checks and throughput benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from logstream.logs import get_logger
from logstream.records import Verdict, Window
from logstream.settings import Settings

log = get_logger(__name__)

_NORMAL = Verdict(anomalous=False, score=0.0)


class NullDetector:
    name = "null"
    version = "1"

    @classmethod
    def from_settings(cls, settings: Settings) -> NullDetector:
        """The detector; a `--model` given with it is not read, and the log says so (a config that meant
        another detector would otherwise judge every window normal without a word)."""
        if settings.model is not None:
            log.warning("model_ignored", detector="null", model=str(settings.model),
                        consequence="--detector null reads no model and judges every window normal; "
                        "choose the detector the model was made for (--detector logllm|logllama|novelty)")
        return cls()

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        return [_NORMAL] * len(windows)

    def close(self) -> None:
        return None
