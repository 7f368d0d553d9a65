"""Evidence for LogLLM verdicts: which of a window's distinct masked messages drive the anomalous answer.

LogLLM answers one question per window ("normal or anomalous?") and says nothing about why. For a
window judged anomalous (only those: normal windows pay nothing), this module ranks the distinct
masked messages the model saw by their contribution to the answer's log-odds,
`log P(anomalous) - log P(normal)` at the decision token, with one of these methods:

  - `occlusion`: the window is scored again with every occurrence of one distinct message removed,
    one row per distinct message, in batched forwards; contribution = log-odds of the window minus
    log-odds without the message (what the message adds, all its occurrences together). Costs one
    LLM row per distinct message; windows already in the verdict cache are not scored again.
  - `gradient`: gradient x input on the projected message vectors (one forward and one backward
    of the LLM with grad on the inputs only); contribution = sum over a message's positions of
    grad . vector, a first-order estimate of the same log-odds drop.
  - `attention`: the decision position's attention to each message position, averaged over heads
    and layers (one forward with eager attention); contribution = attention share (0-1), not signed.
  - `mixed`: attention ranks every message, occlusion re-ranks the first `shortlist` (4).

Which one serves is chosen by measurement (`bench/attribution.py`, bench/RESULTS.md); the others
stay selectable with `--logllm-evidence` for comparison. A ranking is a property of the message
sequence the model saw, so it is cached with the verdict and turned into per-window evidence (line
index, offset, count) by `localize` every time the window's lines differ.

Shapes: n messages of a window, H the LLM's hidden size, He the encoder's.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

from logstream.records import Window

if TYPE_CHECKING:
    from logstream.model import LogLLM, MessageView

EvidenceMethod = Literal["occlusion", "gradient", "attention", "mixed"]
EVIDENCE_METHODS: tuple[str, ...] = get_args(EvidenceMethod)
MAX_EVIDENCE = 5  # messages named per alert (the alert's sample lines start from them)
REASON = "drives_anomalous_answer"
_P_EPS = 1e-6

# P(anomalous) of a list of windows (masked messages each), scored as the detector scores them.
Judge = Callable[[list[list[str]]], list[float]]


@dataclass(frozen=True, slots=True)
class Attribution:
    """A ranking of a window's distinct messages, most anomalous first, with the work it took."""

    method: str
    ranking: tuple[tuple[str, float], ...]  # (masked message, contribution), contribution descending
    rows: int  # LLM rows scored for it (forward passes of one window each)
    seconds: float


def log_odds(p: float) -> float:
    """log P(anomalous) - log P(normal) for P(anomalous) = p, clamped away from 0 and 1."""
    p = min(max(p, _P_EPS), 1.0 - _P_EPS)
    return math.log(p) - math.log1p(-p)


class Attributor:
    """Ranks the distinct messages of windows LogLLM judged anomalous (one method, one model)."""

    def __init__(self, model: LogLLM, method: EvidenceMethod, *, shortlist: int = 4) -> None:
        if method not in EVIDENCE_METHODS:
            raise ValueError(f"unknown evidence method {method!r}; choose one of {', '.join(EVIDENCE_METHODS)}")
        if shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {shortlist}")
        self.model = model
        self.method = method
        self.shortlist = shortlist

    def attribute(self, messages: Sequence[str], vectors: Mapping[str, Tensor], p: float, judge: Judge) -> Attribution:
        """Rank `messages`' distinct values (the capped window, in order) for a window scored `p`.

        `vectors` maps each message to its encoder vector [He] (the detector's embedding cache);
        `judge` scores whole windows (occlusion only). A window of one distinct message names it
        with the window's own log-odds and costs nothing.
        """
        started = time.perf_counter()
        distinct = list(dict.fromkeys(messages))
        if len(distinct) == 1:
            return self._result(((distinct[0], log_odds(p)),), 0, started)
        rows = 0
        if self.method == "occlusion":
            scores = self._occlusion(messages, distinct, p, judge)
            rows = len(distinct)
        elif self.method == "gradient":
            scores = self._gradient(messages, distinct, vectors)
            rows = 1
        elif self.method == "attention":
            scores = self._attention(messages, distinct, vectors)
            rows = 1
        else:
            estimate = self._attention(messages, distinct, vectors)
            ranked = sorted(distinct, key=lambda m: -estimate[m])
            short = ranked[: self.shortlist]
            exact = self._occlusion(messages, short, p, judge)
            # the shortlisted messages first, in occlusion order, with their occlusion contribution;
            # the rest below them in attention order, contribution 0 (not measured: never named as evidence)
            head = sorted(((m, float(exact[m])) for m in short), key=lambda item: -item[1])
            ranking = (*head, *((m, 0.0) for m in ranked[self.shortlist:]))
            return self._result(ranking, 1 + len(short), started)
        ranking = tuple(sorted(((m, float(scores[m])) for m in distinct), key=lambda item: -item[1]))
        return self._result(ranking, rows, started)

    def _result(self, ranking: Sequence[tuple[str, float]], rows: int, started: float) -> Attribution:
        """The attribution, its elements of the model's view named by their masked messages (the counts
        view writes "<k> x <message>"; one element per message, so the names stay distinct)."""
        named = tuple((self.model.template_of(m), c) for m, c in ranking)
        return Attribution(self.method, named, rows, time.perf_counter() - started)

    # --- the methods ----------------------------------------------------------------------------

    def _occlusion(self, messages: Sequence[str], candidates: Sequence[str], p: float,
                   judge: Judge) -> dict[str, float]:
        """Log-odds drop when every occurrence of a candidate leaves the window (one row per candidate).

        A model that sees runs of repeats once (the runs view) sees the variant that way too; in the
        counts view each message is one element already, so the variant only loses it."""
        variants = [[m for m in messages if m != candidate] for candidate in candidates]
        if getattr(self.model, "view", "lines") == "runs":
            variants = [[m for m, _ in itertools.groupby(variant)] for variant in variants]
        base = log_odds(p)
        return {c: base - log_odds(q) for c, q in zip(candidates, judge(variants))}

    def _inputs(self, messages: Sequence[str], vectors: Mapping[str, Tensor]) -> Tensor:
        """Projected message vectors of the window as a leaf that takes gradients. [n, H]"""
        stacked = torch.stack([vectors[m] for m in messages]).clone()  # a plain tensor, even from inference mode
        return self.model.project(stacked).detach()

    def _forward(self, projected: Tensor) -> Tensor:
        """Decision logits (normal, anomalous) of one row ending in the answers' common prefix. [2]"""
        batch = self.model.assemble([projected], [self.model.prompt.common])
        out = self.model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1, list(self.model.prompt.decision)].float()

    def _gradient(self, messages: Sequence[str], distinct: Sequence[str],
                  vectors: Mapping[str, Tensor]) -> dict[str, float]:
        """Gradient x input of the log-odds on the projected vectors, summed per distinct message."""
        with torch.inference_mode(False), torch.enable_grad():
            projected = self._inputs(messages, vectors).requires_grad_(True)
            normal, anomalous = self._forward(projected)
            (grad,) = torch.autograd.grad(anomalous - normal, projected)
            per_position = (grad * projected).sum(-1).float().tolist()  # [n]
        return _per_message(messages, distinct, per_position)

    def _attention(self, messages: Sequence[str], distinct: Sequence[str],
                   vectors: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean attention of the decision position to each message position, summed per distinct message."""
        captured: list[Tensor] = []

        def keep_last_row(_module: Any, _args: Any, output: Any) -> None:
            weights = output[1]  # [1, heads, L, L] with eager attention
            captured.append(weights[0, :, -1, :].mean(0).float())  # [L]

        layers = [module for name, module in self.model.llm.named_modules() if name.endswith("self_attn")]
        with torch.inference_mode(), _eager_attention(self.model.llm):
            hooks = [layer.register_forward_hook(keep_last_row) for layer in layers]
            try:
                self._forward(self.model.project(torch.stack([vectors[m] for m in messages])))
            finally:
                for hook in hooks:
                    hook.remove()
        share = torch.stack(captured).mean(0)  # [L] over layers
        start = len(self.model.prompt.head)
        per_position = share[start:start + len(messages)].tolist()  # the message positions
        return _per_message(messages, distinct, per_position)


def _per_message(messages: Sequence[str], distinct: Sequence[str], per_position: Sequence[float]) -> dict[str, float]:
    totals = dict.fromkeys(distinct, 0.0)
    for message, value in zip(messages, per_position):
        if message in totals:
            totals[message] += value
    return totals


@contextlib.contextmanager
def _eager_attention(llm: Any) -> Iterator[None]:
    """Attention weights exist only in the eager kernel: switch to it for one forward, then back."""
    config = llm.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


# --- evidence in the alert ---------------------------------------------------------------------------


def ranking_evidence(attribution: Attribution) -> tuple[dict[str, Any], ...]:
    """The window-independent part of the evidence (cached with the verdict): message, contribution, method.

    The messages that push towards the anomalous answer (contribution > 0), at most MAX_EVIDENCE;
    when none does (contributions that only make sense together), the strongest one alone.
    """
    positive = [(m, c) for m, c in attribution.ranking if c > 0][:MAX_EVIDENCE] or list(attribution.ranking[:1])
    return tuple({"template": m, "contribution": round(c, 4), "method": attribution.method} for m, c in positive)


def first_seen_line(templates: Sequence[str], max_messages: int, view: MessageView) -> int:
    """Index of the window's first line the model saw (`LogLLM.cap`): it sees the latest `max_messages`
    messages (lines view), runs of repeated messages (runs view), or distinct messages by first
    appearance (counts view: from the first line of the earliest kept one; counts cover the window)."""
    if view == "lines":
        return max(0, len(templates) - max_messages)
    if view == "counts":
        first = list(dict.fromkeys(templates))
        if len(first) <= max_messages:
            return 0
        return templates.index(first[-max_messages])
    runs = 0
    for index in range(len(templates) - 1, -1, -1):
        if index == len(templates) - 1 or templates[index] != templates[index + 1]:
            runs += 1
            if runs > max_messages:
                return index + 1
    return 0


def localize(window: Window, seen_from: int, ranked: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Evidence items for this window: the first line of each ranked message among the lines the model saw.

    `seen_from` is the index of the first line the model saw (the window keeps its latest lines
    when capped). Each item: line (index into the window), offset, reason, template, count (lines
    with that message among those seen), contribution, method.
    """
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for index in range(seen_from, window.size):
        template = window.lines[index].template
        if template not in counts:
            first[template] = index
            counts[template] = 1
        else:
            counts[template] += 1
    items = []
    for item in ranked:
        template = item["template"]
        if template not in first:  # cannot happen for a ranking of this window's own messages
            continue
        index = first[template]
        items.append({"line": index, "offset": window.lines[index].offset, "reason": REASON, "template": template,
                      "count": counts[template], "contribution": item["contribution"], "method": item["method"]})
    return tuple(items)
