"""Detectors by name: an explicit map, imported lazily so `null` never loads torch."""

from __future__ import annotations

import importlib

from logstream.detectors.base import Detector
from logstream.settings import Settings

DETECTORS: dict[str, str] = {
    "null": "logstream.detectors.null:NullDetector",
    "novelty": "logstream.detectors.novelty:NoveltyDetector",
    "logllm": "logstream.detectors.logllm:LogLLMDetector",
    "logllama": "logstream.detectors.logllama:LogLLaMADetector",
}


def load_detector(settings: Settings) -> Detector:
    """Build the configured detector; raises `DetectorNotReady` with a clear message when it cannot start."""
    try:
        module_name, class_name = DETECTORS[settings.detector].split(":")
    except KeyError:
        raise ValueError(f"unknown detector {settings.detector!r}; choose one of {', '.join(DETECTORS)}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_settings(settings)
