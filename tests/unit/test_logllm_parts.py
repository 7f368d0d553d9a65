"""LogLLM's pure parts: the counting LRU, verdict keys, length grouping, base-model hashing, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from logstream.basemodels import SOURCE_MARKER, directory_hash, file_hash
from logstream.detectors.base import DetectorNotReady
from logstream.lru import CountingLRU, split_cached
from logstream.settings import Settings


def test_lru_keeps_the_most_recently_used_within_its_bound() -> None:
    cache: CountingLRU[str, int] = CountingLRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)  # evicts "b", the least recently used
    assert len(cache) == 2 and "b" not in cache and cache.evictions == 1
    assert cache.get("b") is None and cache.get("c") == 3
    assert cache.stats() == (2, 1)
    for i in range(100):
        cache.put(str(i), i)
    assert len(cache) == 2


def test_lru_of_size_zero_keeps_nothing_but_counts() -> None:
    cache: CountingLRU[str, int] = CountingLRU(0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0 and cache.stats() == (0, 1)
    with pytest.raises(ValueError):
        CountingLRU(-1)


def test_split_cached_computes_each_new_key_once() -> None:
    cache: CountingLRU[str, int] = CountingLRU(10)
    cache.put("a", 1)
    known, todo = split_cached(cache, ["a", "b", "a", "c", "b"])
    assert known == {"a": 1} and todo == {"b": 1, "c": 3}
    assert cache.stats() == (3, 2)  # "a" twice from the cache, the second "b" from this batch


def test_verdict_key_depends_on_order_and_boundaries() -> None:
    from logstream.detectors.logllm import verdict_key

    assert verdict_key(["a", "b"]) == verdict_key(["a", "b"])
    assert verdict_key(["a", "b"]) != verdict_key(["b", "a"])
    assert verdict_key(["ab", "c"]) != verdict_key(["a", "bc"])
    assert verdict_key(["a"]) != verdict_key(["a", ""])


def test_length_groups_cover_every_row_once_and_limit_padding() -> None:
    from logstream.detectors.logllm import length_groups

    lengths = [20, 1, 2, 100, 3, 99, 22]
    groups = length_groups(lengths, fixed=20)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        rows = [20 + lengths[i] for i in group]
        assert max(rows) <= 1.5 * min(rows)
    assert all(len(g) * (20 + max(lengths[i] for i in g)) <= 400 for g in length_groups(lengths, 20, max_tokens=400))


def test_file_hash_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x" * 1000)
    cache = tmp_path / "cache"
    first = file_hash(weights, cache)
    assert orjson.loads((cache / "hashes.json").read_bytes())[str(weights.resolve())]["sha256"] == first
    weights.write_bytes(b"y" * 1000)  # same size, new content, new mtime
    os.utime(weights, ns=(1, 1))
    assert file_hash(weights, cache) != first


def test_directory_hash_ignores_docs_and_follows_a_prepared_source(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w")
    before = directory_hash(model, None)
    (model / "README.md").write_text("docs")
    assert directory_hash(model, None) == before
    (model / "config.json").write_text('{"hidden_size": 2}')
    assert directory_hash(model, None) != before
    (model / SOURCE_MARKER).write_bytes(orjson.dumps({"source": "x.gguf", "sha256": "ab" * 32}))
    assert directory_hash(model, None) == "ab" * 32


def test_logllm_refuses_to_start_without_a_trained_artifact(tmp_path: Path) -> None:
    from logstream.detectors.registry import load_detector

    with pytest.raises(DetectorNotReady, match="needs --model DIR"):
        load_detector(Settings(detector="logllm"))
    with pytest.raises(DetectorNotReady, match="not a directory"):
        load_detector(Settings(detector="logllm", model=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DetectorNotReady, match="not a LogLLM artifact"):
        load_detector(Settings(detector="logllm", model=tmp_path / "empty"))


def test_focal_loss_is_cross_entropy_at_zero_and_leaves_the_answers_got_wrong_to_lead() -> None:
    import torch
    import torch.nn.functional as F

    from logstream.model import LogLLM

    # two windows, two answer tokens each (the second row's last one is padding, -100)
    logits = torch.tensor([[[4.0, 0.0], [0.0, 4.0]], [[0.0, 4.0], [1.0, 1.0]]])  # [B=2, K-1=2, V=2]
    targets = torch.tensor([[0, 1], [0, -100]])  # row 0 right on both tokens, row 1 wrong on its one
    plain = LogLLM._weighted_loss(logits, targets, [1.0, 1.0])
    ce = F.cross_entropy(logits.reshape(-1, 2), targets.reshape(-1), ignore_index=-100, reduction="none")
    assert torch.isclose(plain, (ce[:2].mean() + ce[2]) / 2)
    assert torch.isclose(LogLLM._weighted_loss(logits, targets, [1.0, 1.0], focal_gamma=0.0), plain)
    focal = LogLLM._token_losses(logits, targets, 2.0)
    p = torch.exp(-ce.view(2, 2))
    assert torch.allclose(focal, (1 - p) ** 2 * ce.view(2, 2))
    assert focal[1, 1] == 0  # padding stays out
    # the right answers lose almost all their weight, the wrong one keeps most of it
    assert focal[0].sum() / ce[:2].sum() < 0.001 and focal[1, 0] / ce[2] > 0.95
    with pytest.raises(ValueError, match="focal_gamma"):
        LogLLM._token_losses(logits, targets, -1.0)
