"""The `novelty` detector: a window is anomalous when it holds a template never seen in normal traffic.

A strong, cheap baseline on these data sets (an unseen-template rule) and a useful detector in its
own right. It is fitted on a normal-traffic reference (a log file; where the format carries labels,
only lines labelled normal are used) and saved as a small JSON artifact.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson

from logstream.atomicfile import write_atomic
from logstream.coverage import TemplateCoverage, TrainingCoverage
from logstream.detectors.base import DetectorNotReady
from logstream.records import LogLine, Verdict, Window
from logstream.settings import Settings

ARTIFACT_KIND = "logstream.novelty"
FORMAT_VERSION = "1"  # the artifact's layout


class NoveltyDetector:
    """`version` is `1+<fingerprint of the known templates>`: alerts name the model that judged them."""

    name = "novelty"

    def __init__(self, known_templates: Iterable[str], *, source: str = "", lines: int = 0,
                 unseen_share: float | None = None) -> None:
        self.known = frozenset(known_templates)
        digest = hashlib.blake2b(digest_size=6)
        for template in sorted(self.known):
            digest.update(template.encode("utf-8", "surrogatepass") + b"\n")
        self.version = f"{FORMAT_VERSION}+{digest.hexdigest()}"
        self.source = source
        self.lines = lines
        self.unseen_share = unseen_share  # new-template share of the latest lines of the fit (logstream.coverage)

    # --- fitting and persistence --------------------------------------------------------------

    @classmethod
    def fit(cls, lines: Iterable[LogLine], *, source: str = "") -> NoveltyDetector:
        """Learn the templates of the normal lines (lines labelled anomalous are left out).

        Also records how often the latest fifth of those lines still brought a new template: the
        unseen share a serving consumer compares its traffic with (`logstream.coverage`)."""
        templates: list[str] = [line.template for line in lines if not line.label]
        if not templates:
            raise ValueError("no normal lines to fit on")
        coverage = TrainingCoverage.from_stream(source, templates)
        return cls(coverage.templates, source=source, lines=len(templates), unseen_share=coverage.unseen_share)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "kind": ARTIFACT_KIND,
            "version": FORMAT_VERSION,
            "source": self.source,
            "lines": self.lines,
            "fitted_at": time.time(),
            "unseen_share": self.unseen_share,
            "templates": sorted(self.known),
        }
        write_atomic(path, orjson.dumps(body, option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, path: Path) -> NoveltyDetector:
        try:
            body = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise DetectorNotReady(
                f"novelty model {path} not found; fit one with `logstream novelty fit --format F --input LOG "
                f"--output {path}`"
            ) from None
        except IsADirectoryError:
            raise DetectorNotReady(
                f"novelty model {path} is a directory; --model for novelty is the JSON file written by "
                "`logstream novelty fit --output FILE` (a directory is a logllm or logllama artifact)"
            ) from None
        except OSError as exc:
            raise DetectorNotReady(f"cannot read novelty model {path}: {exc.strerror or exc}") from None
        except orjson.JSONDecodeError as exc:
            raise DetectorNotReady(f"novelty model {path} is not valid JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("kind") != ARTIFACT_KIND:
            raise DetectorNotReady(f"{path} is not a novelty model (kind {body.get('kind')!r})")
        share = body.get("unseen_share")
        return cls(body["templates"], source=body.get("source", ""), lines=int(body.get("lines", 0)),
                   unseen_share=float(share) if isinstance(share, (int, float)) else None)

    @classmethod
    def from_settings(cls, settings: Settings) -> NoveltyDetector:
        if settings.model is None:
            raise DetectorNotReady("--detector novelty needs --model PATH (a model from `logstream novelty fit`)")
        return cls.load(settings.model)

    # --- scoring ------------------------------------------------------------------------------

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        return [self.judge(window) for window in windows]

    def judge(self, window: Window) -> Verdict:
        novel = [i for i, line in enumerate(window.lines) if line.template not in self.known]
        if not novel:
            return Verdict(anomalous=False, score=0.0)
        score = min(100.0, 60.0 + 40.0 * len(novel) / window.size)
        evidence = tuple(
            {"line": i, "offset": window.lines[i].offset, "reason": "unseen_template",
             "template": window.lines[i].template}
            for i in novel[:20]
        )
        return Verdict(anomalous=True, score=round(score, 2), evidence=evidence)

    def template_coverage(self) -> TemplateCoverage:
        """Its own templates: a line the model never saw is exactly what it flags; many of them mean the
        traffic is not what it was fitted on."""
        return TemplateCoverage(self.source or "(source not recorded)", self.known.__contains__, self.unseen_share)

    def close(self) -> None:
        return None
