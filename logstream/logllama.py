"""LogLLaMA: a small Llama-architecture causal LM over log keys, and the top-K decision rule.

One module for the consumer's detector and the trainer (the same chunking, ranking and artifact).

A window's lines become keys (`logstream.logkeys`), the model reads `[START] + keys` and predicts
each next key from the ones before it; a session window that ended naturally (inactivity gap, or
the end of the input) has one more target, `END`, so a session that stops where the model expected
more lines is a miss on its last line (HDFS blocks that fail early are short). Count windows end
at a line count, so they get no `END`.

Ranking: at every position the *candidates* (END and the templates) are ordered by the model's
logits; the true next key's rank is 1 + the number of candidates scored strictly higher. A key
never seen in training (`UNKNOWN`) gets rank `candidates + 1`, worse than any candidate, so
"rank > K" is the only rule: a line is a *miss* when its key is outside the top K, and a window is
anomalous when it has at least one miss.

Windows longer than the model's context are read in chunks: the first chunk starts at `START`,
each later one re-reads `context // 2` keys of history before the keys it scores, so every key is
ranked exactly once and never with less than half a context of history (or the whole window so far).

Score 0-100 from the worst rank r (K = top_k, T = candidates, m = misses):
  no miss:  50 * ln(r) / ln(K + 1)                            in [0, 50)
  misses:   50 + 45 * ln(r / K) / ln((T + 1) / K) + 5 * (1 - 1/m)  in (50, 100]
so score >= 50 exactly when the verdict is anomalous (the alert's severity bands stay meaningful),
an unseen template scores at least 95, and more misses break ties between equally bad windows.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch
from torch import Tensor, nn

from logstream.atomicfile import write_atomic
from logstream.logkeys import END, FIRST_TEMPLATE, PAD, START, UNKNOWN, KeysError, LogKeys
from logstream.logs import get_logger
from logstream.records import Window

log = get_logger(__name__)

ARTIFACT_KIND = "logllama"
ARTIFACT_FORMAT = 1
ARTIFACT_CONFIG = "logllama.json"
KEYS_FILE = "keys.json"
LM_DIR = "lm"
IGNORE = -100  # target of a position that is not scored (padding, re-read history)
EXPECTED_SHOWN = 3  # the model's top predictions kept per position, for the alert's evidence


class ArtifactError(ValueError):
    """A LogLLaMA artifact is missing, incomplete or of another kind; the message says which."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The Llama configuration of a model trained from scratch; defaults train on two CPU cores in minutes."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 256
    context: int = 128  # keys per forward pass; longer windows are read in chunks

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads, self.intermediate) < 1:
            raise ValueError(f"model shape values must be positive: {self}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not a multiple of the {self.heads} heads")
        if self.context < 4:
            raise ValueError(f"context must be at least 4 keys, got {self.context}")


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers: our own bars and JSON log lines say what happens."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_model(shape: ModelShape, vocab_size: int, seed: int) -> nn.Module:
    """A freshly initialised LlamaForCausalLM over `vocab_size` keys (tied input/output embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=shape.context, pad_token_id=PAD, bos_token_id=START, eos_token_id=None,
        tie_word_embeddings=True, use_cache=False,
    )
    config._attn_implementation = "eager"  # measured faster than sdpa for these tiny heads on CPU
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def init_from_pretrained(load_dir: Path, keys: LogKeys, *, layers: int | None, context: int) -> nn.Module:
    """A pretrained Llama-architecture LM re-purposed for keys: embeddings resized to the key vocabulary.

    The pretrained token embeddings mean nothing for template ids, so each key's row starts as the
    mean embedding of its template text's tokens (similar templates start close); `START` and
    `END` take the BOS and EOS embeddings, `UNKNOWN` the mean of all rows, `PAD` zeros. `layers` keeps only the first
    decoder layers (a 30-layer model is too slow to train on CPU).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    _quiet_transformers()
    model = LlamaForCausalLM.from_pretrained(load_dir, dtype=torch.float32)
    if model.config.model_type != "llama":
        raise ValueError(f"{load_dir} is a {model.config.model_type!r} model; LogLLaMA needs a Llama architecture")
    if layers is not None:
        if not 1 <= layers <= model.config.num_hidden_layers:
            raise ValueError(f"--init-layers {layers}: the model has {model.config.num_hidden_layers} layers")
        model.model.layers = nn.ModuleList(list(model.model.layers)[:layers])
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    tokenizer = AutoTokenizer.from_pretrained(load_dir)
    table = model.get_input_embeddings().weight.detach().clone()
    rows = torch.zeros(keys.size, table.shape[1])
    for key in range(FIRST_TEMPLATE, keys.size):
        ids = tokenizer(keys.describe(key), add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id or 0]
        rows[key] = table[ids].mean(0)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    rows[START] = table[bos]
    rows[END] = table[eos]
    rows[UNKNOWN] = table.mean(0)
    model.resize_token_embeddings(keys.size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(rows)
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            output.weight.copy_(rows)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = PAD, START, None
    model.config.use_cache = False
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, context)
    model.config._attn_implementation = "eager"
    return model


# --- chunks and batches -------------------------------------------------------------------------


def plan_chunks(n: int, context: int) -> list[tuple[int, int, int]]:
    """How to read x = [START] + n keys: (start, stop, first) per chunk.

    The model reads x[start:stop]; its output at x[i] predicts x[i + 1]; targets x[first..stop]
    are scored by this chunk. Every target 1..n is scored by exactly one chunk.
    """
    if n < 1:
        raise ValueError("a window has at least one line")
    history = context // 2
    chunks = [(0, min(context, n), 1)]
    while chunks[-1][1] < n:
        first = chunks[-1][1] + 1
        start = first - history
        chunks.append((start, min(start + context, n), first))
    return chunks


def ends_naturally(window: Window) -> bool:
    """A session closed by inactivity or the end of the input: where it stops is part of its sequence."""
    return window.kind == "session" and window.close_reason in ("gap", "end_of_input")


@dataclass(frozen=True, slots=True)
class KeyWindow:
    """A window as the model sees it: its lines' keys, and whether END is a target after the last one."""

    keys: tuple[int, ...]
    ends: bool = False

    @classmethod
    def of(cls, window: Window, keys: LogKeys) -> KeyWindow:
        return cls(tuple(keys.keys(window.templates)), ends_naturally(window))

    @property
    def targets(self) -> list[int]:
        """What is ranked: every line's key, then END where the window ended naturally."""
        return [*self.keys, END] if self.ends else list(self.keys)

    def digest(self) -> bytes:
        payload = b"".join(k.to_bytes(4, "little") for k in self.keys) + (b"E" if self.ends else b".")
        return hashlib.blake2b(payload, digest_size=16).digest()


@dataclass(slots=True)
class Chunk:
    """One model row: the keys read, the target per position (IGNORE if not scored), the line it ranks."""

    window: int
    inputs: list[int]
    targets: list[int]
    lines: list[int]  # index of each position's target in the window's targets; -1 where IGNORE


def window_chunks(window: int, keyed: KeyWindow, context: int) -> list[Chunk]:
    """The rows that rank every target of one window (see `plan_chunks`)."""
    x = [START, *keyed.targets]
    result = []
    for start, stop, first in plan_chunks(len(x) - 1, context):
        targets = [x[t] if t >= first else IGNORE for t in range(start + 1, stop + 1)]
        lines = [t - 1 if t >= first else -1 for t in range(start + 1, stop + 1)]
        result.append(Chunk(window, x[start:stop], targets, lines))
    return result


@dataclass(slots=True)
class Batch:
    """Right-padded rows: input ids, attention mask and targets, all [B, L]."""

    inputs: Tensor
    mask: Tensor
    targets: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.inputs.to(device), self.mask.to(device), self.targets.to(device))


def collate(chunks: Sequence[Chunk]) -> Batch:
    width = max(len(c.inputs) for c in chunks)
    inputs = torch.full((len(chunks), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    targets = torch.full((len(chunks), width), IGNORE, dtype=torch.long)
    for row, chunk in enumerate(chunks):
        n = len(chunk.inputs)
        inputs[row, :n] = torch.tensor(chunk.inputs)
        mask[row, :n] = 1
        targets[row, :n] = torch.tensor(chunk.targets)
    return Batch(inputs, mask, targets)


def key_logits(model: nn.Module, batch: Batch) -> Tensor:
    """[B, L, V] logits with PAD, START and UNKNOWN masked out: only candidates are ever predicted."""
    logits = model(input_ids=batch.inputs, attention_mask=batch.mask).logits.float()
    return logits.masked_fill(_reserved(logits), float("-inf"))


def _reserved(logits: Tensor) -> Tensor:
    reserved = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    reserved[:END] = True
    return reserved


def ranks_of_targets(logits: Tensor, targets: Tensor) -> Tensor:
    """Rank (1 = top) of each target among the candidates; UNKNOWN -> candidates + 1; IGNORE -> 0."""
    valid = targets != IGNORE
    true = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1))  # UNKNOWN's logit is -inf
    ranks = 1 + (logits > true).sum(-1)
    return torch.where(valid, ranks, torch.zeros_like(ranks))


# --- the decision rule ----------------------------------------------------------------------------


def window_score(worst_rank: int, misses: int, top_k: int, candidates: int) -> float:
    """0-100 from the worst rank and the number of misses (formula in the module docstring)."""
    if top_k < 1 or candidates < 1:
        raise ValueError("top_k and candidates must be positive")
    if misses == 0:
        return round(50.0 * math.log(max(worst_rank, 1)) / math.log(top_k + 1), 3)
    span = math.log((candidates + 1) / top_k)
    fraction = min(1.0, math.log(worst_rank / top_k) / span) if span > 0 else 1.0
    return round(min(100.0, 50.0 + 45.0 * fraction + 5.0 * (1.0 - 1.0 / misses)), 3)


@dataclass(frozen=True, slots=True)
class Judgement:
    """The top-K rule applied to one window's ranks."""

    anomalous: bool
    score: float
    misses: tuple[int, ...]  # target indices ranked outside the top K (worst first, then in order)
    worst_rank: int


def judge(ranks: Sequence[int], top_k: int, candidates: int) -> Judgement:
    """Anomalous iff some target ranks outside the top K (an unseen template always does)."""
    if not ranks:
        raise ValueError("no ranks to judge")
    misses = sorted((i for i, r in enumerate(ranks) if r > top_k), key=lambda i: (-ranks[i], i))
    worst = max(ranks)
    return Judgement(bool(misses), window_score(worst, len(misses), top_k, candidates), tuple(misses), worst)


@dataclass(slots=True)
class RankedWindow:
    """Per target of a window (its lines, then END where it ended naturally): rank and top predictions."""

    keyed: KeyWindow
    ranks: list[int]
    expected: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def worst_rank(self) -> int:
        return max(self.ranks)


class KeyScorer:
    """Ranks every line of key sequences with a model, in batched forwards (shared by detector and trainer)."""

    def __init__(self, model: nn.Module, context: int, device: torch.device, *, rows_per_forward: int = 64,
                 max_tokens: int = 16_384) -> None:
        self.model = model
        self.context = context
        self.device = device
        self.rows_per_forward = rows_per_forward
        self.max_tokens = max_tokens

    @torch.inference_mode()
    def rank(self, windows: Sequence[KeyWindow]) -> list[RankedWindow]:
        results = [RankedWindow(w, [0] * len(w.targets), [()] * len(w.targets)) for w in windows]
        chunks = [c for i, w in enumerate(windows) for c in window_chunks(i, w, self.context)]
        chunks.sort(key=lambda c: len(c.inputs))  # similar lengths together: little padding
        was_training = self.model.training
        self.model.eval()
        try:
            for group in self._groups(chunks):
                batch = collate(group).to(self.device)
                logits = key_logits(self.model, batch)
                ranks = ranks_of_targets(logits, batch.targets).tolist()
                top = logits.topk(min(EXPECTED_SHOWN, logits.shape[-1] - END), dim=-1).indices.tolist()
                for row, chunk in enumerate(group):
                    result = results[chunk.window]
                    for position, line in enumerate(chunk.lines):
                        if line >= 0:
                            result.ranks[line] = ranks[row][position]
                            result.expected[line] = tuple(top[row][position])
        finally:
            self.model.train(was_training)
        return results

    def _groups(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        groups: list[list[Chunk]] = []
        for chunk in chunks:
            if groups and len(groups[-1]) < self.rows_per_forward and \
                    len(chunk.inputs) * (len(groups[-1]) + 1) <= self.max_tokens:
                groups[-1].append(chunk)
            else:
                groups.append([chunk])
        return groups


# --- the artifact ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Artifact:
    """A loaded LogLLaMA artifact: the model, the frozen keys and the JSON config."""

    model: nn.Module
    keys: LogKeys
    config: dict[str, Any]

    @property
    def top_k(self) -> int:
        return int(self.config["decision"]["top_k"])

    @property
    def context(self) -> int:
        return int(self.config["model"]["context"])


def save_artifact(directory: Path, model: nn.Module, keys: LogKeys, *, top_k: int, context: int,
                  info: dict[str, Any]) -> None:
    """Write DIR/lm (weights), DIR/keys.json and DIR/logllama.json; the config last, so it marks completeness.

    `info` adds the stage, decision details, window and training provenance to the config.
    """
    if not 1 <= top_k <= keys.candidates:
        raise ValueError(f"top_k {top_k} outside 1..{keys.candidates} (the number of candidate keys)")
    _quiet_transformers()
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / ARTIFACT_CONFIG
    config_path.unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    tmp = directory / f".{LM_DIR}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(directory / LM_DIR, ignore_errors=True)
    tmp.rename(directory / LM_DIR)
    keys.save(directory / KEYS_FILE)
    llama = model.config
    body = {
        "kind": ARTIFACT_KIND,
        "format": ARTIFACT_FORMAT,
        "created_at": time.time(),
        **info,
        "decision": {**info.get("decision", {}), "top_k": top_k},
        "model": {**info.get("model", {}), "context": context, "vocab_size": keys.size, "layers":
                  llama.num_hidden_layers, "hidden": llama.hidden_size, "heads": llama.num_attention_heads,
                  "intermediate": llama.intermediate_size},
        "keys": {"file": KEYS_FILE, "templates": keys.templates, "drain": asdict(keys.options)},
    }
    write_atomic(config_path, orjson.dumps(body, option=orjson.OPT_INDENT_2))


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / ARTIFACT_CONFIG
    if not directory.is_dir():
        raise ArtifactError(f"LogLLaMA artifact {directory} not found (train one with `logstream-train fit-logllama "
                            f"... --output {directory}`)")
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a complete LogLLaMA artifact: {ARTIFACT_CONFIG} is missing "
                            "(an interrupted training run? finish it with `fit-logllama --resume`)")
    try:
        body = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("kind") != ARTIFACT_KIND:
        kind = body.get("kind") if isinstance(body, dict) else None
        raise ArtifactError(f"{directory} is not a LogLLaMA artifact (kind {kind!r})")
    if body.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{directory} has artifact format {body.get('format')!r}; this version reads "
                            f"format {ARTIFACT_FORMAT} (retrain it)")
    return body


def load_artifact(directory: Path, device: torch.device) -> Artifact:
    """The model, keys and config of an artifact, checked for consistency; the model in eval mode on `device`."""
    from transformers import LlamaForCausalLM

    config = read_config(directory)
    try:
        keys = LogKeys.load(directory / KEYS_FILE)
    except KeysError as exc:
        raise ArtifactError(f"{directory}: {exc}") from None
    if not (directory / LM_DIR / "config.json").is_file():
        raise ArtifactError(f"{directory}/{LM_DIR} holds no model (config.json missing)")
    _quiet_transformers()
    model = LlamaForCausalLM.from_pretrained(directory / LM_DIR, dtype=torch.float32)
    if model.config.vocab_size != keys.size:
        raise ArtifactError(f"{directory}: the model predicts {model.config.vocab_size} keys but keys.json has "
                            f"{keys.size}")
    top_k = int(config.get("decision", {}).get("top_k", 0))
    if not 1 <= top_k <= keys.candidates:
        raise ArtifactError(f"{directory}: decision.top_k {top_k} outside 1..{keys.candidates}")
    model.config._attn_implementation = "eager"
    model.to(device).eval()
    return Artifact(model, keys, config)


def artifact_fingerprint(directory: Path) -> str:
    """A content hash of what decides verdicts: config, keys and weights."""
    digest = hashlib.sha256()
    files = [directory / ARTIFACT_CONFIG, directory / KEYS_FILE]
    files += sorted((directory / LM_DIR).glob("*.safetensors"))
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
