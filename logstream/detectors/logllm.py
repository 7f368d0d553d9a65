"""The `logllm` detector: LogLLM (BERT -> projector -> Llama) served on the fast path.

Why it is fast (the paper's reference re-encodes every message of every window and decodes token
by token):
  - an embedding cache keyed by the masked message text: after masking a few hundred distinct
    messages make up most traffic, so BERT runs on new messages only;
  - a verdict cache keyed by the sequence of masked messages the model sees: identical windows
    (bursts of one message, periodic jobs) are judged once;
  - windows are batched (the scoring thread hands over up to `batch_size`), grouped by length to
    limit padding, and judged by ONE forward pass each: the logits of the first token where
    "The sequence is normal." and "... anomalous." differ give P(anomalous); the window is
    anomalous when P >= the artifact's threshold (chosen on validation by `fit`; 0.5 for older
    artifacts), and the alert score is P shifted in log-odds so that the threshold sits at 50
    (`calibrated_score`);
  - `torch.inference_mode`, LoRA adapters merged into the base weights, CUDA when available.

Evidence: a window judged anomalous gets its distinct messages ranked by what they add to the
anomalous answer (`logstream.attribution`, method `--logllm-evidence`); the ranking is cached with
the verdict and placed on each window's own lines (`localize`). Normal windows cost nothing more.

Cache counters count each distinct message (or window) of a batch once: a hit is work avoided.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from logstream.attribution import (
    Attributor,
    EvidenceMethod,
    first_seen_line,
    localize,
    log_odds,
    ranking_evidence,
)
from logstream.basemodels import BaseModelError
from logstream.coverage import TemplateCoverage
from logstream.detectors.base import DetectorNotReady
from logstream.logs import get_logger
from logstream.lru import CountingLRU, split_cached
from logstream.model import PROMPT_VERSION, ArtifactError, LogLLM, artifact_fingerprint, calibrated_score
from logstream.records import Verdict, Window
from logstream.settings import Settings

log = get_logger(__name__)

# Rows of one forward are grouped so the longest is at most this much longer than the shortest
# (padding is wasted compute) and their padded tokens stay under a bound (activation memory).
_LENGTH_RATIO = 1.5
_MAX_TOKENS_PER_FORWARD = 8192


def verdict_key(messages: Sequence[str]) -> bytes:
    """A 128-bit digest of the message sequence (length-prefixed, so no two sequences share an encoding)."""
    digest = hashlib.blake2b(digest_size=16)
    for message in messages:
        data = message.encode()
        digest.update(len(data).to_bytes(4, "little"))
        digest.update(data)
    return digest.digest()


def length_groups(lengths: Sequence[int], fixed: int, max_tokens: int = _MAX_TOKENS_PER_FORWARD) -> list[list[int]]:
    """Indices of rows grouped for one forward each: sorted by length, split on ratio and token budget."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        row = fixed + lengths[index]
        if current and (row > _LENGTH_RATIO * (fixed + lengths[current[0]]) or row * (len(current) + 1) > max_tokens):
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


class LogLLMDetector:
    """Scores windows with a trained LogLLM artifact; owns the model and its two caches."""

    name = "logllm"

    def __init__(self, model: LogLLM, *, embedding_cache_size: int, verdict_cache_size: int,
                 fingerprint: str = "", evidence: EvidenceMethod | None = None) -> None:
        self.model = model
        self.attributor = Attributor(model, evidence) if evidence is not None else None
        self.attributed = 0  # anomalous windows whose messages were ranked
        self.evidence_seconds = 0.0  # time spent ranking them (the cost of evidence)
        self.version = f"{PROMPT_VERSION}+{fingerprint[:12]}" if fingerprint else str(PROMPT_VERSION)
        self.embeddings: CountingLRU[str, Tensor] = CountingLRU(embedding_cache_size)
        self.verdicts: CountingLRU[bytes, Verdict] = CountingLRU(verdict_cache_size)
        self.encoded = 0  # messages BERT actually encoded
        self.judged = 0  # windows the LLM actually judged

    @classmethod
    def from_settings(cls, settings: Settings) -> LogLLMDetector:
        if settings.model is None:
            raise DetectorNotReady(
                "--detector logllm needs --model DIR, a trained LogLLM artifact (`logstream-train fit ... "
                "--output DIR`); an untrained projector would only produce noise"
            )
        try:
            model = LogLLM.from_pretrained(
                settings.model, cache_dir=settings.cache_dir, embedder=settings.embedder, llm=settings.llm,
                device=settings.device, load_in_4bit=settings.load_in_4bit, max_messages=settings.max_messages,
            )
            fingerprint = artifact_fingerprint(settings.model)
        except (ArtifactError, BaseModelError) as exc:
            raise DetectorNotReady(str(exc)) from None
        except ValueError as exc:  # e.g. a CUDA device or 4-bit requested where there is none
            raise DetectorNotReady(f"cannot load LogLLM artifact {settings.model}: {exc}") from None
        model.merge_lora()
        evidence = None if settings.logllm_evidence == "off" else settings.logllm_evidence
        detector = cls(model, embedding_cache_size=settings.embedding_cache_size,
                       verdict_cache_size=settings.verdict_cache_size, fingerprint=fingerprint, evidence=evidence)
        log.info("logllm_ready", model=str(settings.model), version=detector.version, device=str(model.device),
                 max_messages=model.max_messages, threshold=model.threshold, llm_layers=model.llm_layers,
                 evidence=settings.logllm_evidence)
        return detector

    # --- scoring --------------------------------------------------------------------------------

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        """One verdict per window, in order; new windows are judged together in as few forwards as fit."""
        started = time.perf_counter()
        capped = [self.model.cap(window.templates) for window in windows]
        keys = [verdict_key(messages) for messages in capped]
        known, todo = split_cached(self.verdicts, keys)
        if todo:
            new = [capped[index] for index in todo.values()]
            probabilities, vectors = self._judge(new)
            for key, messages, p in zip(todo, new, probabilities):
                # The artifact's validation-chosen threshold decides; the score puts it at exactly 50.
                threshold = self.model.threshold
                verdict = Verdict(anomalous=p >= threshold, score=round(calibrated_score(p, threshold), 3))
                if verdict.anomalous and self.attributor is not None:
                    verdict = self._with_ranking(verdict, messages, p, vectors)
                known[key] = verdict
                self.verdicts.put(key, verdict)
        log.debug("logllm_batch", windows=len(windows), judged=len(todo),
                  seconds=round(time.perf_counter() - started, 3))
        return [self._placed(window, known[key]) for window, key in zip(windows, keys)]

    def _judge(self, windows: list[list[str]]) -> tuple[list[float], dict[str, Tensor]]:
        """P(anomalous) for windows not seen before, and the encoder vectors of their messages."""
        with torch.inference_mode():
            vectors = self._message_vectors(dict.fromkeys(m for messages in windows for m in messages))
            result = self._probabilities(windows, vectors)
        self.judged += len(windows)
        return result, vectors

    def _probabilities(self, windows: list[list[str]], vectors: dict[str, Tensor]) -> list[float]:
        """P(anomalous) of windows whose message vectors are all in `vectors`, in length-grouped forwards."""
        with torch.inference_mode():
            stacked = [torch.stack([vectors[m] for m in messages]) for messages in windows]  # B x [n, He]
            fixed = len(self.model.prompt.head) + len(self.model.prompt.tail) + len(self.model.prompt.common)
            result = [0.0] * len(windows)
            for group in length_groups([len(messages) for messages in windows], fixed):
                probabilities = self.model.anomaly_probability([stacked[i] for i in group]).tolist()
                for index, p in zip(group, probabilities):
                    result[index] = p
        return result

    # --- evidence -------------------------------------------------------------------------------

    def _with_ranking(self, verdict: Verdict, messages: list[str], p: float, vectors: dict[str, Tensor]) -> Verdict:
        """The verdict with its messages ranked (window-independent evidence, cached with it)."""
        assert self.attributor is not None
        attribution = self.attributor.attribute(messages, vectors, p, lambda ws: self._variants(ws, vectors))
        self.attributed += 1
        self.evidence_seconds += attribution.seconds
        return Verdict(anomalous=verdict.anomalous, score=verdict.score, evidence=ranking_evidence(attribution))

    def _variants(self, windows: list[list[str]], vectors: dict[str, Tensor]) -> list[float]:
        """P(anomalous) of occlusion variants: from the verdict cache where a real window had that sequence."""
        result: list[float | None] = []
        for messages in windows:
            key = verdict_key(messages)
            cached = self.verdicts.get(key) if key in self.verdicts else None  # a hit is a forward saved
            result.append(None if cached is None else self._probability_of(cached.score))
        todo = [i for i, p in enumerate(result) if p is None]
        for i, p in zip(todo, self._probabilities([windows[i] for i in todo], vectors) if todo else []):
            result[i] = p
        return [p for p in result if p is not None]

    def _probability_of(self, score: float) -> float:
        """P(anomalous) behind a verdict's 0-100 score (the score puts the decision threshold at 50)."""
        shift = log_odds(score / 100.0) + log_odds(self.model.threshold)  # inverse of `calibrated_score`
        return 1.0 / (1.0 + math.exp(-shift))

    def _placed(self, window: Window, verdict: Verdict) -> Verdict:
        """A cached verdict's ranked messages placed on this window's lines (index, offset, count)."""
        if not verdict.evidence:
            return verdict
        seen_from = first_seen_line(window.templates, self.model.max_messages, self.model.view)
        evidence = localize(window, seen_from, verdict.evidence)
        return Verdict(anomalous=verdict.anomalous, score=verdict.score, evidence=evidence)

    def _message_vectors(self, distinct: dict[str, None]) -> dict[str, Tensor]:
        """Encoder vectors of the distinct messages: from the cache, else encoded now (and cached)."""
        vectors: dict[str, Tensor] = {}
        missing: list[str] = []
        for message in distinct:
            vector = self.embeddings.get(message)
            if vector is None:
                missing.append(message)
            else:
                vectors[message] = vector
        if missing:
            encoded = self.model.encode_messages(missing)  # [m, He]
            for message, row in zip(missing, encoded):
                row = row.clone()  # own storage: an evicted row must not pin its whole batch tensor
                vectors[message] = row
                self.embeddings.put(message, row)
            self.encoded += len(missing)
        return vectors

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) per cache, read by the pipeline's metrics after each batch."""
        return {"embedding": self.embeddings.stats(), "verdict": self.verdicts.stats()}

    def template_coverage(self) -> TemplateCoverage | None:
        """The templates of the artifact's training split (None for an artifact that did not record them)."""
        return TemplateCoverage.of(self.model.coverage) if self.model.coverage is not None else None

    def close(self) -> None:
        """Drop the cached tensors (and hand freed CUDA memory back to the driver)."""
        self.embeddings.clear()
        self.verdicts.clear()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
