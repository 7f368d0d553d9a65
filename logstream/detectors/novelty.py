"""The `novelty` detector: a window is anomalous when it holds a template never seen in normal traffic.

A strong, cheap baseline on these data sets (an unseen-template rule) and a useful detector in its
own right. It is fitted on a normal-traffic reference (a log file; where the format carries labels,
only lines labelled normal are used) and saved as a small JSON artifact.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson

from logstream.detectors.base import DetectorNotReady
from logstream.records import LogLine, Verdict, Window
from logstream.settings import Settings

ARTIFACT_KIND = "logstream.novelty"


class NoveltyDetector:
    name = "novelty"
    version = "1"

    def __init__(self, known_templates: Iterable[str], *, source: str = "", lines: int = 0) -> None:
        self.known = frozenset(known_templates)
        self.source = source
        self.lines = lines

    # --- fitting and persistence --------------------------------------------------------------

    @classmethod
    def fit(cls, lines: Iterable[LogLine], *, source: str = "") -> NoveltyDetector:
        """Learn the templates of the normal lines (lines labelled anomalous are left out)."""
        known: set[str] = set()
        count = 0
        for line in lines:
            if line.label:
                continue
            known.add(line.template)
            count += 1
        if not known:
            raise ValueError("no normal lines to fit on")
        return cls(known, source=source, lines=count)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "kind": ARTIFACT_KIND,
            "version": self.version,
            "source": self.source,
            "lines": self.lines,
            "fitted_at": time.time(),
            "templates": sorted(self.known),
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
        tmp.replace(path)

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
        return cls(body["templates"], source=body.get("source", ""), lines=int(body.get("lines", 0)))

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

    def close(self) -> None:
        return None
