"""Detectors by name: an explicit map, imported lazily so `null` never loads torch."""

from __future__ import annotations

import importlib
import typing

from logstream.detectors.base import Detector, DetectorNotReady
from logstream.settings import DetectorName, Settings

DETECTORS: dict[str, str] = {
    "logllm": "logstream.detectors.logllm:LogLLMDetector",
    "logllama": "logstream.detectors.logllama:LogLLaMADetector",
    "novelty": "logstream.detectors.novelty:NoveltyDetector",
    "null": "logstream.detectors.null:NullDetector",
}
assert set(DETECTORS) == set(typing.get_args(DetectorName)), "Settings.detector and DETECTORS must name the same set"

CHOICES = (
    "logllm (a trained LogLLM artifact), logllama (a trained LogLLaMA artifact), novelty (a model from "
    "`logstream novelty fit`), null (judges every window normal: never alerts)"
)


def load_detector(settings: Settings) -> Detector:
    """Build the configured detector.

    Raises `DetectorNotReady` (one-line message) when none is chosen, the name is unknown, or the
    detector cannot start as configured.
    """
    if settings.detector is None:
        raise DetectorNotReady(f"choose a detector with --detector (LOGSTREAM_DETECTOR): {CHOICES}")
    try:
        module_name, class_name = DETECTORS[settings.detector].split(":")
    except KeyError:  # Settings validates the name; this guards a hand-built Settings (model_construct)
        raise DetectorNotReady(f"unknown detector {settings.detector!r}; choose one of: {CHOICES}") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_settings(settings)
