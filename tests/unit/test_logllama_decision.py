"""The LogLLaMA top-K rule on hand-made sequences: chunking, ranks, verdicts, scores and alert evidence.

The model here is a hand-set bigram table (the next key's logits depend on the current key only),
so every expected rank can be read off the table: the rule is tested, not a trained network.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from logstream.detectors.logllama import LogLLaMADetector
from logstream.logkeys import END, START, UNKNOWN, LogKeyMiner
from logstream.logllama import (
    IGNORE,
    Artifact,
    KeyScorer,
    KeyWindow,
    ends_naturally,
    judge,
    plan_chunks,
    ranks_of_targets,
    window_chunks,
    window_score,
)
from logstream.records import LogLine, Verdict, Window

A, B, C, D = "scheduler started job <*>", "worker running task <*> of <*>", "job <*> finished", "disk <*> ok"
KEYS = LogKeyMiner().add_all([A, B, C, D]).freeze()
KA, KB, KC, KD = (KEYS.key(t) for t in (A, B, C, D))
# preference order of the next key after each key (best first); candidates are END and the 4 templates
ORDER = {
    START: [KA, KD, KB, KC, END],
    KA: [KB, KC, KD, END, KA],
    KB: [KC, KB, END, KD, KA],
    KC: [END, KA, KD, KB, KC],
    KD: [KA, END, KB, KC, KD],
    UNKNOWN: [KB, KA, KC, KD, END],
}


class Bigram(nn.Module):
    """logits[t] = table[input[t]]: a stand-in whose ranks follow ORDER exactly."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(KEYS.size, KEYS.size)
        for current, preferred in ORDER.items():
            for position, key in enumerate(preferred):
                table[current, key] = 10.0 - position
        self.table = nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def detector(top_k: int, context: int = 16) -> LogLLaMADetector:
    config = {"format": 1, "decision": {"top_k": top_k}, "model": {"context": context}}
    artifact = Artifact(Bigram().eval(), KEYS, config)
    return LogLLaMADetector(artifact, device="cpu", cache_size=100)


def window(templates: list[str], kind: str = "count", reason: str = "size") -> Window:
    lines = [LogLine("logs", 0, 100 + i, raw=f"raw line {i}: {t}", template=t, event_time=float(i))
             for i, t in enumerate(templates)]
    return Window(kind, "blk_1" if kind == "session" else "logs/0", "logs", 0, lines, reason)  # type: ignore[arg-type]


def test_chunks_rank_every_target_once_with_history() -> None:
    for context in (4, 5, 8, 16):
        history = context // 2
        for n in range(1, 60):
            scored: list[int] = []
            for start, stop, first in plan_chunks(n, context):
                assert stop - start <= context and start >= 0
                for target in range(first, stop + 1):
                    assert target - start >= min(target, history)  # keys read before predicting it
                    scored.append(target)
            assert scored == list(range(1, n + 1))


def test_window_chunks_map_positions_to_lines_and_end() -> None:
    keyed = KeyWindow((KA, KB, KC, KA, KB), ends=True)
    chunks = window_chunks(0, keyed, context=4)
    lines = sorted(line for chunk in chunks for line in chunk.lines if line >= 0)
    assert lines == [0, 1, 2, 3, 4, 5]  # five lines, then END
    for chunk in chunks:
        for position, line in enumerate(chunk.lines):
            if line >= 0:
                assert chunk.targets[position] == keyed.targets[line]
            else:
                assert chunk.targets[position] == IGNORE


def test_ranks_count_candidates_scored_higher() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 1.0, 5.0, 3.0, 3.0, 2.0]]]).repeat(1, 4, 1)
    logits[..., :END] = float("-inf")  # PAD, START, UNKNOWN are never predicted
    targets = torch.tensor([[4, 5, UNKNOWN, IGNORE]])
    assert ranks_of_targets(logits, targets).tolist() == [[1, 2, 6, 0]]  # ties share the better rank; 5 candidates


def test_judge_flags_any_key_outside_the_top_k() -> None:
    calm = judge([1, 1, 2], top_k=2, candidates=10)
    assert not calm.anomalous and calm.misses == () and calm.worst_rank == 2 and 0 < calm.score < 50
    verdict = judge([1, 4, 3, 11, 1], top_k=2, candidates=10)
    assert verdict.anomalous and verdict.misses == (3, 1, 2)  # worst first
    assert verdict.worst_rank == 11 and verdict.score == 98.333  # unseen (rank 11 of 10 candidates), 3 misses
    assert not judge([3, 3], top_k=3, candidates=10).anomalous


def test_score_is_below_50_exactly_when_normal_and_grows_with_the_worst_rank() -> None:
    normal = [window_score(r, 0, 8, 20) for r in range(1, 9)]
    assert normal[0] == 0.0 and all(a < b < 50 for a, b in itertools.pairwise(normal))
    missed = [window_score(r, 1, 8, 20) for r in range(9, 22)]
    assert all(50 < a < b <= 95 for a, b in itertools.pairwise(missed))
    assert window_score(21, 1, 8, 20) == 95.0  # an unseen template alone
    assert window_score(21, 1, 8, 20) < window_score(21, 3, 8, 20) <= 100.0  # more misses, higher score
    with pytest.raises(ValueError):
        window_score(1, 0, 0, 20)


def test_expected_sequence_is_normal_and_a_swap_is_flagged_with_its_lines() -> None:
    strict = detector(top_k=1)
    assert strict.score([window([A, B, C])]) == [Verdict(False, 0.0)]
    # A then C (rank 2 after A), then B (rank 4 after C)
    [verdict] = strict.score([window([A, C, B])])
    assert verdict.anomalous
    assert [(e["line"], e["offset"], e["rank"], e["reason"], e["template"]) for e in verdict.evidence] == [
        (2, 102, 4, "unexpected_key", B), (1, 101, 2, "unexpected_key", C)]
    assert verdict.evidence[0]["expected"] == ["<end of session>", A, D]  # what the model expected after C
    assert not detector(top_k=4).score([window([A, C, B])])[0].anomalous


def test_unseen_template_is_always_a_miss_and_named() -> None:
    lenient = detector(top_k=5)  # every candidate is in the top K
    [verdict] = lenient.score([window([A, "kernel panic <*> not syncing", B])])
    assert verdict.anomalous and verdict.score >= 95
    [item] = verdict.evidence
    assert item["reason"] == "unseen_template" and item["line"] == 1 and item["offset"] == 101
    assert item["rank"] is None and item["template"] == "kernel panic <*> not syncing"


def test_a_session_that_stops_early_is_an_unexpected_end_on_its_last_line() -> None:
    model = detector(top_k=2)
    complete = window([A, B, C], kind="session", reason="gap")
    cut = window([A, B], kind="session", reason="gap")  # after B the end ranks 3rd
    forced = window([A, B], kind="session", reason="max_size")  # closed by a cap: its end says nothing
    assert ends_naturally(cut) and not ends_naturally(forced) and not ends_naturally(window([A, B]))
    normal, early, capped = model.score([complete, cut, forced])
    assert not normal.anomalous and not capped.anomalous
    assert early.anomalous and [(e["line"], e["reason"], e["rank"]) for e in early.evidence] == [
        (1, "unexpected_end", 3)]


def test_chunked_ranking_equals_whole_window_ranking() -> None:
    keys = tuple([KA, KB, KC, KD] * 12 + [UNKNOWN, KB])
    long = KeyScorer(Bigram(), context=64, device=torch.device("cpu")).rank([KeyWindow(keys, ends=True)])
    short = KeyScorer(Bigram(), context=6, device=torch.device("cpu")).rank([KeyWindow(keys, ends=True)])
    assert long[0].ranks == short[0].ranks and len(long[0].ranks) == len(keys) + 1
    assert long[0].expected == short[0].expected


def test_identical_windows_are_ranked_once() -> None:
    model = detector(top_k=1)
    first = model.score([window([A, C]), window([A, C]), window([A, B])])
    assert model.ranked == 2 and model.cache.stats() == (1, 2)
    again = model.score([window([A, C])])
    assert again[0] == first[0] and model.ranked == 2
