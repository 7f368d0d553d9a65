"""The `logllama` detector: flags the lines a next-key model trained on normal logs could not predict.

Each line's masked message maps to a key through the artifact's frozen Drain templates (a template
never seen in training is `UNKNOWN`, always a miss); the model ranks every line's key given the
lines before it in the window (and, for a session that ended, the end itself), and a window is
anomalous when some key falls outside the top K (`logstream.logllama`). The verdict's evidence
names those lines — index, offset, template, rank and what the model expected instead — so the
alert says *which* lines were unexpected (reasons `unseen_template`, `unexpected_key`, and
`unexpected_end` on the last line of a session that stopped where more was expected).

A rank cache keyed by the window's key sequence skips the model for repeated windows (periodic
jobs, identical HDFS block lifecycles); evidence is rebuilt per window, so offsets stay right.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from logstream.coverage import TemplateCoverage
from logstream.detectors.base import DetectorNotReady
from logstream.logkeys import UNKNOWN
from logstream.logllama import (
    Artifact,
    ArtifactError,
    KeyScorer,
    KeyWindow,
    RankedWindow,
    artifact_fingerprint,
    judge,
    load_artifact,
)
from logstream.logs import get_logger
from logstream.lru import CountingLRU, split_cached
from logstream.records import Verdict, Window
from logstream.settings import Settings

log = get_logger(__name__)

MAX_EVIDENCE = 20
_EXPECTED_CHARS = 200


class LogLLaMADetector:
    """Scores windows with a trained LogLLaMA artifact; owns the model, the keys and a rank cache."""

    name = "logllama"

    def __init__(self, artifact: Artifact, *, device: object, cache_size: int = 10_000, fingerprint: str = "") -> None:
        import torch

        self.artifact = artifact
        self.keys = artifact.keys
        self.top_k = artifact.top_k
        self.version = f"{artifact.config['format']}+{fingerprint[:12]}" if fingerprint else str(
            artifact.config["format"])
        self.scorer = KeyScorer(artifact.model, artifact.context, torch.device(str(device)))
        self.cache: CountingLRU[bytes, RankedWindow] = CountingLRU(cache_size)
        self.ranked = 0  # windows the model actually ranked

    @classmethod
    def load(cls, directory: Path, *, device: str | None = None, cache_size: int = 10_000) -> LogLLaMADetector:
        """Build from an artifact directory; any problem with it is a `DetectorNotReady` with the reason."""
        from logstream.device import pick_device

        try:
            target = pick_device(device)
            artifact = load_artifact(directory, target)
            fingerprint = artifact_fingerprint(directory)
        except (ArtifactError, OSError) as exc:
            raise DetectorNotReady(str(exc)) from None
        except ValueError as exc:  # e.g. a CUDA device requested where there is none
            raise DetectorNotReady(f"cannot load LogLLaMA artifact {directory}: {exc}") from None
        detector = cls(artifact, device=target, cache_size=cache_size, fingerprint=fingerprint)
        log.info("logllama_ready", model=str(directory), version=detector.version, device=str(target),
                 candidates=artifact.keys.candidates, top_k=detector.top_k, stage=artifact.config.get("stage"))
        return detector

    @classmethod
    def from_settings(cls, settings: Settings) -> LogLLaMADetector:
        if settings.model is None:
            raise DetectorNotReady(
                "--detector logllama needs --model DIR, a trained LogLLaMA artifact (`logstream-train fit-logllama "
                "... --output DIR`)"
            )
        detector = cls.load(settings.model, device=settings.device, cache_size=settings.verdict_cache_size)
        trained = detector.artifact.config.get("window", {})
        if trained.get("kind") and trained["kind"] != settings.window:
            log.warning("logllama_window_mismatch", trained=trained, serving=settings.window,
                        hint="the model learned sequences of the training windows; serve with the same --window")
        return detector

    # --- scoring --------------------------------------------------------------------------------

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        """One verdict per window, in order; windows with a new key sequence are ranked together."""
        started = time.perf_counter()
        keyed = [KeyWindow.of(window, self.keys) for window in windows]
        digests = [item.digest() for item in keyed]
        known, todo = split_cached(self.cache, digests)
        if todo:
            for digest, ranked in zip(todo, self.scorer.rank([keyed[index] for index in todo.values()])):
                known[digest] = ranked
                self.cache.put(digest, ranked)
            self.ranked += len(todo)
        verdicts = [self.verdict(window, known[digest]) for window, digest in zip(windows, digests)]
        log.debug("logllama_batch", windows=len(windows), ranked=len(todo),
                  seconds=round(time.perf_counter() - started, 3))
        return verdicts

    def verdict(self, window: Window, ranked: RankedWindow) -> Verdict:
        judgement = judge(ranked.ranks, self.top_k, self.keys.candidates)
        evidence = tuple(self._evidence(window, ranked, i) for i in judgement.misses[:MAX_EVIDENCE])
        return Verdict(anomalous=judgement.anomalous, score=judgement.score, evidence=evidence)

    def _evidence(self, window: Window, ranked: RankedWindow, index: int) -> dict[str, object]:
        """One missed target as alert evidence: the line (the last one for an unexpected end) and why."""
        ending = index == len(ranked.keyed.keys)
        line_index = index - 1 if ending else index
        line = window.lines[line_index]
        unseen = not ending and ranked.keyed.keys[index] == UNKNOWN
        reason = "unexpected_end" if ending else "unseen_template" if unseen else "unexpected_key"
        return {
            "line": line_index,
            "offset": line.offset,
            "reason": reason,
            "template": line.template,
            "rank": None if unseen else ranked.ranks[index],
            "top_k": self.top_k,
            "expected": [self.keys.describe(k)[:_EXPECTED_CHARS] for k in ranked.expected[index]],
        }

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) of the rank cache, read by the pipeline's metrics after each batch."""
        return {"verdict": self.cache.stats()}

    def template_coverage(self) -> TemplateCoverage:
        """Known = a line whose message matches one of the frozen training templates (else UNKNOWN)."""
        training = self.artifact.config.get("training") or {}
        dataset = " ".join(str(part) for part in (training.get("dataset"), training.get("logs")) if part)
        share = (self.artifact.config.get("coverage") or {}).get("unseen_share")
        return TemplateCoverage(dataset or "(dataset not recorded)", lambda message: self.keys.key(message) != UNKNOWN,
                                float(share) if isinstance(share, (int, float)) else None)

    def close(self) -> None:
        self.cache.clear()
