"""Log keys for LogLLaMA: Drain templates mined over the masked content, then frozen.

Why Drain on top of the regex masking: masking removes variable *tokens*, but messages that differ
in a word or two (a state name, a user) still come out as different strings. Drain (`drain3`)
groups masked messages of the same length and prefix into one template, so the vocabulary stays
small and a next-key model has few, well-populated classes to predict.

What Drain sees (`drain_text`): each masked variable becomes the literal token `<var>` and a run of
them becomes one, so a list of any length (`delete <*> <*> <*>`) is one template, and a message
that is mostly variables still matches its own template (Drain does not count its own `<*>`
wildcards as similar tokens when mining, so raw `<*>`-heavy messages would each open a new
cluster). Templates are shown with `<*>` again.

Ids: 0 padding, 1 window start, 2 unknown template, 3 end of session (a predictable "the session
ends here", so a session that stops early is a miss too); mined templates from 4 on, in the order
Drain created them (deterministic for the same input order). *Candidates* are the ids a model may
predict: END and the templates.

Mining (`LogKeyMiner.add`) happens only in training. `LogKeys` is frozen: it maps a masked message
with Drain's `match`, which never creates or changes a cluster, so serving is deterministic and a
template never seen in training maps to `UNKNOWN` (a miss for the detector). The Drain tree and
clusters are saved as plain JSON (not drain3's jsonpickle state, which can run code on load).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from drain3.drain import Drain, LogCluster, Node

from logstream.atomicfile import write_atomic
from logstream.parsing import MASK

PAD, START, UNKNOWN, END = 0, 1, 2, 3
FIRST_TEMPLATE = 4
RESERVED_NAMES = ("<pad>", "<start>", "<unknown>", "<end of session>")
KEYS_FORMAT = 1
_MATCH_CACHE_MAX = 100_000  # distinct masked messages remembered; cleared whole when full
_VAR = "<var>"


def drain_text(template: str) -> str:
    """The masked message as Drain sees it: `<*>` -> `<var>`, consecutive ones collapsed into one."""
    tokens: list[str] = []
    for token in template.split():
        if token == MASK:
            if tokens and tokens[-1] == _VAR:
                continue
            token = _VAR
        tokens.append(token)
    return " ".join(tokens)


class KeysError(ValueError):
    """A saved key mapping is missing, of another format, or inconsistent; the message says which."""


@dataclass(frozen=True, slots=True)
class DrainOptions:
    """Drain's knobs (drain3 names): prefix-tree depth, similarity threshold, children per node."""

    depth: int = 4
    sim_th: float = 0.5  # loghub's setting for HDFS and BGL; drain3's default 0.4 merges more eagerly
    max_children: int = 100

    def __post_init__(self) -> None:
        if self.depth < 3:
            raise ValueError(f"drain depth must be at least 3, got {self.depth}")
        if not 0.0 < self.sim_th <= 1.0:
            raise ValueError(f"drain similarity threshold must be in (0, 1], got {self.sim_th}")
        if self.max_children < 2:
            raise ValueError(f"drain max_children must be at least 2, got {self.max_children}")

    def drain(self) -> Drain:
        return Drain(depth=self.depth, sim_th=self.sim_th, max_children=self.max_children, max_clusters=None)


class LogKeyMiner:
    """Online template mining over masked messages (training only); `freeze` gives the key mapping."""

    def __init__(self, options: DrainOptions | None = None) -> None:
        self.options = options or DrainOptions()
        self.drain = self.options.drain()
        self.messages = 0

    def add(self, template: str) -> None:
        self.drain.add_log_message(drain_text(template))
        self.messages += 1

    def add_all(self, templates: Iterable[str]) -> LogKeyMiner:
        for template in templates:
            self.add(template)
        return self

    def freeze(self) -> LogKeys:
        """The key mapping: every mined cluster gets a key; the miner should not be used afterwards."""
        if not self.drain.id_to_cluster:
            raise ValueError("no messages were mined: nothing to build a vocabulary from")
        return LogKeys(self.options, self.drain, sorted(self.drain.id_to_cluster), messages=self.messages)


class LogKeys:
    """Frozen masked-message -> key mapping (Drain `match` only; unseen templates -> UNKNOWN)."""

    def __init__(self, options: DrainOptions, drain: Drain, cluster_ids: Sequence[int], *, messages: int = 0) -> None:
        self.options = options
        self.drain = drain
        self.cluster_ids = list(cluster_ids)
        self.messages = messages  # how many messages were mined (provenance)
        self.key_of_cluster = {cid: FIRST_TEMPLATE + i for i, cid in enumerate(self.cluster_ids)}
        self._cache: dict[str, int] = {}

    @property
    def size(self) -> int:
        """Vocabulary size of the model: reserved ids plus one per template."""
        return FIRST_TEMPLATE + len(self.cluster_ids)

    @property
    def templates(self) -> int:
        return len(self.cluster_ids)

    @property
    def candidates(self) -> int:
        """Ids a model ranks as next key: END and every template (K is at most this)."""
        return self.size - END

    def key(self, message: str) -> int:
        """The key of a masked message; UNKNOWN when no template learned in training matches it."""
        found = self._cache.get(message)
        if found is not None:
            return found
        cluster = self.drain.match(drain_text(message), full_search_strategy="fallback")
        key = UNKNOWN if cluster is None else self.key_of_cluster.get(cluster.cluster_id, UNKNOWN)
        if len(self._cache) >= _MATCH_CACHE_MAX:
            self._cache.clear()
        self._cache[message] = key
        return key

    def keys(self, messages: Iterable[str]) -> list[int]:
        return [self.key(message) for message in messages]

    def describe(self, key: int) -> str:
        """The template text of a key (reserved ids by name), for evidence and reports."""
        if 0 <= key < FIRST_TEMPLATE:
            return RESERVED_NAMES[key]
        cluster = self.drain.id_to_cluster[self.cluster_ids[key - FIRST_TEMPLATE]]
        return " ".join(MASK if token == _VAR else token for token in cluster.log_template_tokens)

    # --- persistence ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        clusters = [
            {"id": cid, "size": cluster.size, "tokens": list(cluster.log_template_tokens)}
            for cid, cluster in sorted(self.drain.id_to_cluster.items())
        ]
        return {
            "format": KEYS_FORMAT,
            "drain": asdict(self.options),
            "messages": self.messages,
            "counter": self.drain.clusters_counter,
            "vocabulary": self.cluster_ids,
            "clusters": clusters,
            "tree": _node_to_json(self.drain.root_node),
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> LogKeys:
        if not isinstance(body, dict) or body.get("format") != KEYS_FORMAT:
            raise KeysError(f"log keys of format {body.get('format') if isinstance(body, dict) else None!r}; "
                            f"this version reads format {KEYS_FORMAT}")
        try:
            options = DrainOptions(**body["drain"])
            drain = options.drain()
            for item in body["clusters"]:
                cluster = LogCluster(item["tokens"], int(item["id"]))
                cluster.size = int(item["size"])
                drain.id_to_cluster[cluster.cluster_id] = cluster
            drain.clusters_counter = int(body["counter"])
            drain.root_node = _node_from_json(body["tree"])
            vocabulary = [int(cid) for cid in body["vocabulary"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise KeysError(f"log keys are malformed: {exc!r}") from None
        missing = [cid for cid in vocabulary if cid not in drain.id_to_cluster]
        if missing:
            raise KeysError(f"log keys name clusters {missing[:5]} that are not saved")
        return cls(options, drain, vocabulary, messages=int(body.get("messages", 0)))

    def save(self, path: Path) -> None:
        write_atomic(path, orjson.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> LogKeys:
        try:
            body = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise KeysError(f"log keys {path} not found") from None
        except orjson.JSONDecodeError as exc:
            raise KeysError(f"log keys {path} are not valid JSON: {exc}") from None
        return cls.from_json(body)


def _node_to_json(node: Node) -> dict[str, Any]:
    return {"c": list(node.cluster_ids), "k": {token: _node_to_json(child) for token, child in
                                              node.key_to_child_node.items()}}


def _node_from_json(body: dict[str, Any]) -> Node:
    node = Node()
    node.cluster_ids = [int(cid) for cid in body["c"]]
    node.key_to_child_node = {token: _node_from_json(child) for token, child in body["k"].items()}
    return node
