"""The cheap baselines every evaluation reports beside the model, fitted on the train split only.

- `novelty`: the consumer's unseen-template detector, fitted on the train split's normal lines.
- `count_vector`: logistic regression on per-window template counts (log1p-scaled, balanced class
  weights). Count vectors with a linear model or a tree are the classic strong baseline on these
  data sets (HDFS F1 near 0.99 in published comparisons); if an LLM cannot beat them, it does not
  earn its cost.
- `tfidf`: TF-IDF over the tokens of the window's masked messages (1- and 2-grams, sublinear tf)
  with a class-balanced logistic regression: the strongest cheap text classifier on BGL.

Both implement the consumer's `Detector` interface, so they are scored by the same code as a model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from logstream.detectors.novelty import NoveltyDetector
from logstream.records import LogLine, Verdict, Window
from trainer.data import LabeledWindow


def normal_lines(train: Sequence[LabeledWindow]) -> Iterator[LogLine]:
    """Lines known to be normal: every line of a normal window, and lines labelled normal elsewhere.

    Line labels exist for BGL/Thunderbird/Liberty; for HDFS (block labels only) an anomalous
    block's lines are all left out.
    """
    for item in train:
        for line in item.window.lines:
            if not item.label or line.label is False:
                yield line


def fit_novelty(train: Sequence[LabeledWindow]) -> NoveltyDetector:
    """The unseen-template detector as `logstream novelty fit` would build it from the train split."""
    return NoveltyDetector.fit(normal_lines(train), source="train split")


class _WindowClassifier:
    """A class-balanced logistic regression on per-window features; score = 100 x P(anomalous).

    Subclasses say how a window becomes features (`_vectorizer`, `_inputs`, `_scale`); fitting,
    scoring and the one-class refusal are shared.
    """

    name = ""
    version = "1"

    def __init__(self, vectorizer: Any, model: Any) -> None:
        self.vectorizer = vectorizer
        self.model = model

    @classmethod
    def fit(cls, train: Sequence[LabeledWindow], seed: int = 42) -> Any:
        """Learn on the train windows; what training never saw is ignored at scoring time.
        ValueError when the train windows hold one class only."""
        from sklearn.linear_model import LogisticRegression

        labels = [item.label for item in train]
        if len(set(labels)) < 2:
            raise ValueError("the train split has one class only; a classifier needs both")
        vectorizer = cls._vectorizer()
        features = cls._scale(vectorizer.fit_transform(cls._inputs([item.window for item in train])))
        model = LogisticRegression(max_iter=5000, class_weight="balanced", random_state=seed)
        model.fit(features, labels)
        return cls(vectorizer, model)

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        if not windows:
            return []
        features = self._scale(self.vectorizer.transform(self._inputs(windows)))
        column = list(self.model.classes_).index(True)
        probabilities = self.model.predict_proba(features)[:, column]
        return [Verdict(anomalous=bool(p >= 0.5), score=round(float(p) * 100.0, 4)) for p in probabilities]

    def close(self) -> None:
        return None

    @staticmethod
    def _vectorizer() -> Any:
        raise NotImplementedError

    @staticmethod
    def _inputs(windows: Sequence[Window]) -> list[Any]:
        raise NotImplementedError

    @staticmethod
    def _scale(features: Any) -> Any:
        return features


class CountVectorDetector(_WindowClassifier):
    """Logistic regression on log1p-scaled template-count vectors."""

    name = "count_vector"

    @staticmethod
    def _vectorizer() -> Any:
        from sklearn.feature_extraction import DictVectorizer

        return DictVectorizer()

    @staticmethod
    def _inputs(windows: Sequence[Window]) -> list[Any]:
        return [dict(window.template_counts()) for window in windows]

    @staticmethod
    def _scale(features: Any) -> Any:
        return features.log1p()


class TfidfDetector(_WindowClassifier):
    """TF-IDF over the tokens of the masked messages (1-2 grams, sublinear tf) + logistic regression."""

    name = "tfidf"

    @staticmethod
    def _vectorizer() -> Any:
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=_TOKEN_PATTERN, lowercase=True,
                               dtype=np.float64)

    @staticmethod
    def _inputs(windows: Sequence[Window]) -> list[Any]:
        return [_document(window) for window in windows]


# Words of masked messages, the `<*>` placeholder included as a token of its own.
_TOKEN_PATTERN = r"<\*>|[A-Za-z_][A-Za-z0-9_.\-]*"


def _document(window: Window) -> str:
    """A window as text: its masked messages, one per line (2-grams may span two messages, as in a log)."""
    return "\n".join(window.templates)
