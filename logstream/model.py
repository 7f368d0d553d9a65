"""LogLLM: BERT -> projector -> Llama. One model for the consumer's scoring and the trainer's fine-tuning.

Reading order (top to bottom): constants of the prompt and the LoRA recipe, loading the two base
models, the fixed prompt pieces as token ids, the `LogLLM` module (message encoding, prompt
assembly, the one forward that gives the answer-token loss and the anomaly probability, the
reference-style decoding), and the artifact on disk.

The prompt (../shared/papers/NOTES.md), one row per window, left-padded in a batch:

    <BOS> "Below is a sequence of system log messages:" v_1 ... v_n ". Is this sequence normal or anomalous? \n"
          answer = "The sequence is normal." <EOS>  |  "The sequence is anomalous." <EOS>

where v_j = projector(BERT pooler output of message j), one input embedding per message. Training
puts the whole answer in the row and takes the cross-entropy of the answer tokens only. Scoring
puts only the answers' common prefix ("The sequence is") in the row and compares, in one forward
pass, the logits of the first token where the two answers differ; score = P(anomalous | the two).
The reference-style path (`reference_answer`) instead decodes up to 6 tokens greedily and searches
the text for normal|anomalous, as the paper's code does: it is the oracle and the benchmark baseline.

Messages per window are capped at `max_messages`, keeping the LATEST ones: in a stream the lines
that closed the window are the freshest evidence, and the cap is the same in training and serving.
The message view (`view`, an artifact setting; `model_view`) says what the LLM is given of a window,
before the cap: `lines` every masked message; `runs` a run of consecutive identical messages once (a
BGL window of 100 lines holds about 9 such runs, so the prompt is ~4x shorter and the LLM ~3x
cheaper, with the order of events kept); `counts` each distinct message once, in order of first
appearance, as the text "<k> x <message>" with k its number of lines in the window (an HDFS block's
health shows in how OFTEN messages occur: bench/RESULTS.md, HDFS round 3; the count is text the
encoder reads, so everything keyed by message — vector caches, verdict keys, evidence — works as is).

Shapes in comments: B windows, n messages of a window, T tokens of a message (<= 100), L prompt
length, He encoder hidden size, H LLM hidden size, V vocabulary size, K kept logit positions.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import orjson
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from logstream.basemodels import BaseModel, BaseModelError, resolve_embedder, resolve_llm
from logstream.coverage import TrainingCoverage
from logstream.device import pick_device
from logstream.logs import get_logger
from logstream.peftlib import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

log = get_logger(__name__)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft probes `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning
    on every wrap; it is peft's call, not ours, and says nothing to an operator."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# --- the recipe -----------------------------------------------------------------------------------

PROMPT_VERSION = 1  # bump when any text below changes: artifacts record it and refuse a mismatch
PROMPT_HEAD = "Below is a sequence of system log messages:"
PROMPT_TAIL = ". Is this sequence normal or anomalous? \n"
ANSWER_NORMAL = "The sequence is normal."
ANSWER_ANOMALOUS = "The sequence is anomalous."
MAX_MESSAGE_TOKENS = 100  # BERT truncation per message
DEFAULT_MAX_MESSAGES = 128  # messages per window given to the LLM (the latest kept)
DEFAULT_THRESHOLD = 0.5  # the LLM's own answer: "anomalous" more likely than "normal"
REFERENCE_MAX_NEW_TOKENS = 6  # the reference decodes this many tokens at most
_REFERENCE_ANSWER = re.compile(r"normal|anomalous")

ARTIFACT_KIND = "logllm"
ARTIFACT_FORMAT = 1
ARTIFACT_CONFIG = "logllm.json"
PROJECTOR_FILE = "projector.safetensors"
EMBEDDER_ADAPTER = "embedder_lora"
LLM_ADAPTER = "llm_lora"


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """One LoRA adapter of the recipe (NOTES.md: BERT r=4 a=32 p=0.01 q,v; Llama r=8 a=16 p=0.1 q,v)."""

    r: int
    alpha: int
    dropout: float
    targets: tuple[str, ...]

    def config(self, task_type: str | None) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets), bias="none", task_type=task_type)


EMBEDDER_LORA = LoraSpec(r=4, alpha=32, dropout=0.01, targets=("query", "value"))
LLM_LORA = LoraSpec(r=8, alpha=16, dropout=0.1, targets=("q_proj", "v_proj"))



MessageView = Literal["lines", "runs", "counts"]
MESSAGE_VIEWS: tuple[str, ...] = get_args(MessageView)
_COUNT_SEPARATOR = " x "  # "3 x PacketResponder <*> for block <*> terminating": the count first, never truncated


def model_view(messages: Sequence[str], max_messages: int, view: MessageView) -> list[str]:
    """The messages the LLM sees of a window (module docstring), the latest `max_messages` of them.

    One function for training, scoring, the verdict cache key and the trainer's distinct windows.
    Raises ValueError for an unknown view."""
    if view == "lines":
        sequence = list(messages)
    elif view == "runs":
        sequence = [m for m, _ in itertools.groupby(messages)]
    elif view == "counts":
        counts = Counter(messages)
        sequence = [f"{counts[m]}{_COUNT_SEPARATOR}{m}" for m in counts]  # Counter keeps first-appearance order
    else:
        raise _unknown_view(view)
    return sequence[-max_messages:]


def view_template(element: str, view: MessageView) -> str:
    """The masked message behind one element of `model_view` (the count taken off in the counts view)."""
    if view != "counts":
        return element
    count, separator, template = element.partition(_COUNT_SEPARATOR)
    if not separator or not count.isdecimal():
        raise ValueError(f"{element!r} is not an element of the counts view")
    return template


def check_view(view: str) -> MessageView:
    """A message view name, checked (ValueError names the choices)."""
    if view not in MESSAGE_VIEWS:
        raise _unknown_view(view)
    return view  # type: ignore[return-value]


def _unknown_view(view: str) -> ValueError:
    return ValueError(f"unknown message view {view!r}; choose one of {', '.join(MESSAGE_VIEWS)}")


def check_threshold(threshold: float) -> float:
    """A decision threshold on P(anomalous): strictly between 0 and 1 (ValueError otherwise)."""
    value = float(threshold)
    if not 0.0 < value < 1.0:
        raise ValueError(f"decision threshold must be strictly between 0 and 1, got {threshold!r}")
    return value


def calibrated_score(p: float, threshold: float) -> float:
    """P(anomalous) -> the alert's 0-100 score, with the decision threshold at exactly 50.

    A shift in log-odds: score = 100 * sigmoid(logit(p) - logit(threshold)). Monotone in p, so it
    ranks windows as p does; p = threshold gives 50, and with the default threshold 0.5 it is 100 p.
    """
    eps = 1e-7
    p = min(max(float(p), eps), 1.0 - eps)
    shift = math.log(p / (1.0 - p)) - math.log(threshold / (1.0 - threshold))
    return 100.0 / (1.0 + math.exp(-shift)) if shift > -700 else 0.0


class ArtifactError(ValueError):
    """A model artifact directory is missing, incomplete or of another kind; the message says which."""


class BaseModelMismatch(ArtifactError):
    """The base models given differ from those the artifact was trained on (content hashes differ)."""


# --- devices and base models ----------------------------------------------------------------------


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (half the memory, tensor cores), float32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load_embedder(base: BaseModel, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A BERT-family encoder whose *trained* pooler gives the message vector."""
    tokenizer = AutoTokenizer.from_pretrained(base.load_dir)
    model, info = AutoModel.from_pretrained(base.load_dir, dtype=compute_dtype(device), output_loading_info=True)
    if getattr(model, "pooler", None) is None:
        raise BaseModelError(f"encoder {base.ref} has no pooler; LogLLM needs a BERT-family model with one")
    if any(key.startswith("pooler") or ".pooler." in key for key in info.get("missing_keys", ())):
        raise BaseModelError(f"encoder {base.ref} has no trained pooler weights (they would be random)")
    return model.to(device).eval(), tokenizer


def _load_llm(base: BaseModel, device: torch.device, load_in_4bit: bool,
              layers: int | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Llama-architecture causal LM; 4-bit NF4 with bf16 compute through bitsandbytes on CUDA.

    `layers` keeps only the first N decoder layers (`truncate_layers`); None keeps them all.
    """
    tokenizer = AutoTokenizer.from_pretrained(base.load_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": compute_dtype(device)}
    if load_in_4bit:
        if device.type != "cuda":
            raise ValueError("load_in_4bit needs a CUDA device (bitsandbytes NF4); on CPU the LLM runs in float32")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(base.load_dir, **kwargs)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not set(LLM_LORA.targets) <= names:
        raise BaseModelError(f"LLM {base.ref} ({model.config.model_type}) has no {'/'.join(LLM_LORA.targets)} "
                             "projections; LogLLM needs a Llama-architecture model")
    if layers is not None:
        truncate_layers(model, layers)
    if not load_in_4bit:
        model = model.to(device)
    return model.eval(), tokenizer


def truncate_layers(model: PreTrainedModel, layers: int) -> None:
    """Keep the first `layers` decoder layers of a Llama-architecture LM (still a Llama: embeddings, the
    first N blocks, final norm, LM head). On CPU the decoder is most of LogLLM's cost and scales with N;
    the LoRA adapters and the projector learn to use the shallower model. ValueError outside 1..all."""
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ValueError(f"llm layers {layers}: the LLM has {total} decoder layers (choose 1..{total})")
    if layers == total:
        return
    decoder = model.get_decoder()
    decoder.layers = nn.ModuleList(list(decoder.layers)[:layers])
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]


# --- the fixed pieces of the prompt, as token ids -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompt:
    """Token ids of the prompt's text pieces for one LLM tokenizer (each piece tokenized on its own)."""

    head: tuple[int, ...]  # BOS + PROMPT_HEAD
    tail: tuple[int, ...]  # PROMPT_TAIL
    normal: tuple[int, ...]  # ANSWER_NORMAL + EOS
    anomalous: tuple[int, ...]  # ANSWER_ANOMALOUS + EOS
    common: tuple[int, ...]  # the answers' shared prefix ("The sequence is")
    decision: tuple[int, int]  # the first tokens where the answers differ: (normal, anomalous)

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> Prompt:
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise BaseModelError("the LLM tokenizer needs a BOS and an EOS token")

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        normal = ids(ANSWER_NORMAL) + (tokenizer.eos_token_id,)
        anomalous = ids(ANSWER_ANOMALOUS) + (tokenizer.eos_token_id,)
        split = next((i for i, (a, b) in enumerate(zip(normal, anomalous)) if a != b), None)
        if split is None:
            raise BaseModelError("the tokenizer gives the two answers no differing token")
        return cls(head=(tokenizer.bos_token_id, *ids(PROMPT_HEAD)), tail=ids(PROMPT_TAIL), normal=normal,
                   anomalous=anomalous, common=normal[:split], decision=(normal[split], anomalous[split]))

    def answer(self, anomalous: bool) -> tuple[int, ...]:
        return self.anomalous if anomalous else self.normal


@dataclass(slots=True)
class Batch:
    """Left-padded model inputs for B windows."""

    inputs_embeds: Tensor  # [B, L, H] (pad rows are zeros, masked out)
    attention_mask: Tensor  # [B, L] 1 = real position
    position_ids: Tensor  # [B, L] 0.. over the real positions of each row
    labels: Tensor | None  # [B, L] token id at answer positions, -100 elsewhere (training only)
    answer_lengths: list[int]  # tokens appended after the prompt, per row


@dataclass(slots=True)
class LogLLMOutput:
    loss: Tensor | None  # mean cross-entropy over answer tokens (None without labels)
    p_anomalous: Tensor  # [B] P(anomalous | the two answers), float32


@dataclass(frozen=True, slots=True)
class ReferenceAnswer:
    text: str  # what greedy decoding produced (special tokens removed)
    anomalous: bool | None  # first normal|anomalous in the text; None when the text names neither


# --- the model ------------------------------------------------------------------------------------


class LogLLM(nn.Module):
    """BERT encoder (+ LoRA) -> Linear projector -> Llama decoder (+ LoRA), built once and shared."""

    def __init__(
        self,
        embedder: nn.Module,
        embedder_tokenizer: PreTrainedTokenizerBase,
        projector: nn.Linear,
        llm: nn.Module,
        llm_tokenizer: PreTrainedTokenizerBase,
        *,
        embedder_base: BaseModel,
        llm_base: BaseModel,
        device: torch.device,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_message_tokens: int = MAX_MESSAGE_TOKENS,
        threshold: float = DEFAULT_THRESHOLD,
        view: MessageView = "lines",
    ) -> None:
        super().__init__()
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        self.embedder = embedder
        self.projector = projector
        self.llm = llm
        self.embedder_tokenizer = embedder_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.embedder_base, self.llm_base = embedder_base, llm_base
        self.device = device
        self.max_messages = max_messages
        self.max_message_tokens = max_message_tokens
        self.prompt = Prompt.for_tokenizer(llm_tokenizer)
        self.llm_layers = int(llm.config.num_hidden_layers)  # decoder layers in use (may be the first N)
        self.view = check_view(view)  # what the LLM is given of a window (`model_view`)
        self.threshold = check_threshold(threshold)  # P(anomalous) at which a window is called anomalous
        self.decision: dict[str, Any] = {"threshold": self.threshold, "source": "default"}  # how it was chosen
        self.merged = False  # adapters folded into the base weights (inference only; cannot be saved)
        self.coverage: TrainingCoverage | None = None  # templates it was trained on (logstream.coverage)
        self.eval()

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        embedder: str | Path | None = None,
        llm: str | Path | None = None,
        cache_dir: Path,
        device: str | torch.device | None = None,
        load_in_4bit: bool = False,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        seed: int | None = None,
        llm_layers: int | None = None,
        view: MessageView = "lines",
    ) -> LogLLM:
        """A fresh model from the base models (None: the embedded defaults), new projector, no adapters yet.

        `llm_layers` keeps the LLM's first N decoder layers (None: all of them); `view` is what the LLM
        is given of a window (`model_view`; ValueError if unknown).
        """
        embedder_base, llm_base = resolve_embedder(embedder, cache_dir), resolve_llm(llm, cache_dir)
        model = cls._from_bases(embedder_base, llm_base, device, load_in_4bit, max_messages, seed, llm_layers)
        model.view = check_view(view)
        return model

    @classmethod
    def _from_bases(cls, embedder_base: BaseModel, llm_base: BaseModel, device: str | torch.device | None,
                    load_in_4bit: bool, max_messages: int, seed: int | None = None,
                    llm_layers: int | None = None) -> LogLLM:
        hf_logging.disable_progress_bar()  # one JSON log line per event, not progress bars on stderr
        target = device if isinstance(device, torch.device) else pick_device(device)
        started = time.perf_counter()
        embedder, embedder_tokenizer = _load_embedder(embedder_base, target)
        llm, llm_tokenizer = _load_llm(llm_base, target, load_in_4bit, llm_layers)
        if seed is not None:
            torch.manual_seed(seed)
        # The projector stays float32 (trainable, small); its output is cast to the LLM's dtype.
        projector = nn.Linear(embedder.config.hidden_size, llm.config.hidden_size, bias=True).to(target)
        log.info("logllm_base_models_loaded", embedder=embedder_base.ref, llm=llm_base.ref, device=str(target),
                 load_in_4bit=load_in_4bit, llm_layers=llm.config.num_hidden_layers,
                 seconds=round(time.perf_counter() - started, 1))
        return cls(embedder, embedder_tokenizer, projector, llm, llm_tokenizer, embedder_base=embedder_base,
                   llm_base=llm_base, device=target, max_messages=max_messages)

    @property
    def has_lora(self) -> bool:
        return isinstance(self.embedder, PeftModel) and isinstance(self.llm, PeftModel)

    @property
    def quantized(self) -> bool:
        return bool(getattr(self.llm, "is_loaded_in_4bit", False))

    def attach_lora(self) -> None:
        """Add fresh adapters to both models (B = 0: the model computes exactly what it did before)."""
        if self.has_lora or self.merged:
            raise RuntimeError("adapters are attached already")
        if self.quantized:
            self.llm = prepare_model_for_kbit_training(self.llm, use_gradient_checkpointing=False)
        with _quiet_peft():
            self.embedder = get_peft_model(self.embedder, EMBEDDER_LORA.config(task_type=None))
            self.llm = get_peft_model(self.llm, LLM_LORA.config(task_type="CAUSAL_LM"))
        self.set_trainable(projector=True, embedder_lora=True, llm_lora=True)

    def set_trainable(self, *, projector: bool, embedder_lora: bool, llm_lora: bool) -> None:
        """Choose what the optimizer updates; base weights always stay frozen (each training stage's choice:
        trainer.fit_logllm.STAGE_TABLE)."""
        if not self.has_lora:
            raise RuntimeError("no adapters: call attach_lora() on a built model (a loaded artifact has them)")
        for parameter in self.projector.parameters():
            parameter.requires_grad_(projector)
        for part, enabled in ((self.embedder, embedder_lora), (self.llm, llm_lora)):
            for name, parameter in part.named_parameters():
                parameter.requires_grad_(enabled and "lora_" in name)

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.named_parameters() if p.requires_grad)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (CUDA memory); non-reentrant, so frozen inputs still work."""
        for part in (self.embedder, self.llm):
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights: same function, fewer matmuls. Inference only."""
        if not self.has_lora:
            raise RuntimeError("no adapters to merge")
        if self.quantized:
            log.info("lora_merge_skipped", reason="4-bit weights would be re-quantized")
            return
        self.embedder = self.embedder.merge_and_unload()
        self.llm = self.llm.merge_and_unload()
        self.merged = True

    # --- messages -> vectors ------------------------------------------------------------------

    def cap(self, messages: Sequence[str]) -> list[str]:
        """The messages the model sees of a window: the latest `max_messages` of its view (`model_view`)."""
        return model_view(messages, self.max_messages, self.view)

    def template_of(self, element: str) -> str:
        """The masked message behind an element of `cap`'s result (`view_template`)."""
        return view_template(element, self.view)

    def encode_batch(self, messages: Sequence[str]) -> Tensor:
        """BERT pooler output of each message, in one padded batch, no deduplication. [n] -> [n, He]."""
        tokens = self.embedder_tokenizer(list(messages), padding=True, truncation=True,
                                         max_length=self.max_message_tokens, return_tensors="pt").to(self.device)
        embedder_frozen = not any(p.requires_grad for p in self.embedder.parameters())
        with torch.no_grad() if embedder_frozen else contextlib.nullcontext():
            return self.embedder(**tokens).pooler_output  # [n, T] -> [n, He]

    def encode_messages(self, messages: Sequence[str], chunk: int = 256) -> Tensor:
        """Pooler outputs with each distinct message encoded once, in length-sorted chunks. [n] -> [n, He]."""
        distinct = sorted(dict.fromkeys(messages), key=len)
        rows = [self.encode_batch(distinct[i:i + chunk]) for i in range(0, len(distinct), chunk)]
        vectors = torch.cat(rows)  # [distinct, He]
        where = {text: i for i, text in enumerate(distinct)}
        return vectors[torch.tensor([where[m] for m in messages], device=vectors.device)]

    def project(self, vectors: Tensor) -> Tensor:
        """Encoder space -> LLM input-embedding space. [n, He] -> [n, H] in the LLM's dtype."""
        llm_dtype = self.llm.get_input_embeddings().weight.dtype
        return self.projector(vectors.to(self.projector.weight.dtype)).to(llm_dtype)

    # --- prompt assembly ----------------------------------------------------------------------

    def _embed_ids(self, ids: Sequence[int]) -> Tensor:
        return self.llm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.device))  # [t, H]

    def assemble(self, projected: Sequence[Tensor], endings: Sequence[Sequence[int]],
                 labels: Sequence[bool] | None = None) -> Batch:
        """Rows `head + messages + tail + ending`, left-padded; `labels` marks the endings as answer tokens."""
        head, tail = self._embed_ids(self.prompt.head), self._embed_ids(self.prompt.tail)  # [h, H], [t, H]
        rows = [torch.cat([head, vectors, tail, self._embed_ids(ending)]) if ending else
                torch.cat([head, vectors, tail]) for vectors, ending in zip(projected, endings)]  # [L_i, H]
        lengths = [row.shape[0] for row in rows]
        embeds = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_side="left")  # [B, L, H]
        width = embeds.shape[1]
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, length in enumerate(lengths):
            mask[i, width - length:] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, L]: as if each row started at position 0
        target = None
        if labels is not None:
            target = torch.full((len(rows), width), -100, dtype=torch.long, device=self.device)
            for i, ending in enumerate(endings):
                target[i, width - len(ending):] = torch.tensor(ending, device=self.device)
        return Batch(embeds, mask, positions, target, [len(e) for e in endings])

    def _llm_logits(self, batch: Batch, keep: int) -> Tensor:
        """Logits of the last `keep` positions only (the vocabulary projection is the costly part). [B, K, V]"""
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep)
        return out.logits

    # --- the forward: loss for training, probability for scoring ------------------------------

    def forward(self, windows: Sequence[Sequence[str]], labels: Sequence[bool] | None = None, *,
                vectors: Mapping[str, Tensor] | None = None,
                weights: Sequence[float] | None = None, focal_gamma: float = 0.0) -> LogLLMOutput:
        """B windows of masked messages -> answer-token loss (with labels) and P(anomalous) per window.

        With labels the rows carry the full answers and the loss is the mean cross-entropy over the
        answer tokens (prompt and padding masked with -100); with `weights` too (one per window, > 0,
        e.g. how often a distinct window occurs), it is the weighted mean of each row's mean token
        loss. Without labels the rows stop at the answers' common prefix, as in scoring.
        `vectors` maps every message to its encoder vector [He], computed once while the encoder is
        frozen (`encode_distinct`); without it the messages are encoded now (gradients flow into the
        encoder's LoRA when it is trainable). `focal_gamma` > 0 scales each answer token's
        cross-entropy by (1 - p)^gamma, p its probability: the focal loss (Lin et al., "Focal Loss for
        Dense Object Detection", ICCV 2017), so windows the model already answers right weigh little
        and the ones it gets wrong lead the gradient; 0 is the paper's plain cross-entropy.
        """
        capped = [self.cap(w) for w in windows]
        if any(not w for w in capped):
            raise ValueError("every window needs at least one message")
        flat = [m for w in capped for m in w]
        encoded = self.encode_messages(flat) if vectors is None else torch.stack([vectors[m] for m in flat])
        projected = list(torch.split(self.project(encoded), [len(w) for w in capped]))  # B x [n, H]
        if labels is None:
            return LogLLMOutput(None, self.anomaly_probability_projected(projected))
        if len(labels) != len(windows):
            raise ValueError(f"{len(labels)} labels for {len(windows)} windows")
        endings = [self.prompt.answer(bool(label)) for label in labels]
        batch = self.assemble(projected, endings, labels)
        keep = max(batch.answer_lengths) + 1
        logits = self._llm_logits(batch, keep).float()  # [B, K, V]
        assert batch.labels is not None
        targets = batch.labels[:, -keep + 1:]  # [B, K-1]: the token each kept position (but the last) predicts
        if weights is None:
            tokens = self._token_losses(logits[:, :-1], targets, focal_gamma)
            loss = tokens.sum() / (targets != -100).sum().clamp_min(1)
        else:
            loss = self._weighted_loss(logits[:, :-1], targets, weights, focal_gamma)
        # The decision logit of row i sits just before its first differing answer token.
        split = len(self.prompt.common)
        at = torch.tensor([keep - n + split - 1 for n in batch.answer_lengths], device=logits.device)
        pair = logits[torch.arange(len(endings), device=logits.device), at][:, list(self.prompt.decision)]
        return LogLLMOutput(loss, pair.softmax(-1)[:, 1])

    @staticmethod
    def _token_losses(logits: Tensor, targets: Tensor, focal_gamma: float) -> Tensor:
        """Each answer token's (focal) cross-entropy, 0 where ignored. [B, K-1, V], [B, K-1] -> [B, K-1]"""
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be 0 or more, got {focal_gamma}")
        tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                 reduction="none").view(targets.shape)
        if focal_gamma:
            tokens = (1.0 - torch.exp(-tokens)).pow(focal_gamma) * tokens  # (1 - p)^gamma * -log p
        return tokens

    @classmethod
    def _weighted_loss(cls, logits: Tensor, targets: Tensor, weights: Sequence[float],
                       focal_gamma: float = 0.0) -> Tensor:
        """Weighted mean over rows of each row's mean answer-token (focal) cross-entropy.
        [B, K-1, V], [B, K-1] -> []"""
        if len(weights) != targets.shape[0] or any(w <= 0 for w in weights):
            raise ValueError(f"need one positive weight per window ({targets.shape[0]}), got {list(weights)}")
        tokens = cls._token_losses(logits, targets, focal_gamma)  # [B, K-1], 0 where ignored
        counted = (targets != -100).sum(-1).clamp_min(1)  # [B]
        w = torch.tensor(list(weights), dtype=tokens.dtype, device=tokens.device)
        return ((tokens.sum(-1) / counted) * w).sum() / w.sum()

    def encode_distinct(self, messages: Sequence[str]) -> dict[str, Tensor]:
        """Encoder vectors of distinct messages, computed once without gradients: message -> [He].

        For training stages whose encoder is frozen: each distinct masked message is encoded once per
        run instead of once per window it appears in.
        """
        distinct = list(dict.fromkeys(messages))
        if not distinct:
            return {}
        with torch.no_grad():
            encoded = self.encode_messages(distinct, chunk=32)  # [m, He]; small length-sorted chunks pad little
        return {message: row.clone() for message, row in zip(distinct, encoded)}

    def loss(self, windows: Sequence[Sequence[str]], labels: Sequence[bool], *,
             vectors: Mapping[str, Tensor] | None = None, weights: Sequence[float] | None = None,
             focal_gamma: float = 0.0) -> Tensor:
        output = self(windows, labels, vectors=vectors, weights=weights, focal_gamma=focal_gamma)
        assert output.loss is not None
        return output.loss

    def anomaly_probability_projected(self, projected: Sequence[Tensor]) -> Tensor:
        """One forward over B rows ending in the answers' common prefix. B x [n, H] -> [B] float32."""
        batch = self.assemble(projected, [self.prompt.common] * len(projected))
        logits = self._llm_logits(batch, keep=1)[:, -1]  # [B, V]
        pair = logits[:, list(self.prompt.decision)].float()  # [B, 2]: (normal, anomalous)
        return pair.softmax(-1)[:, 1]

    def anomaly_probability(self, vectors: Sequence[Tensor]) -> Tensor:
        """From encoder vectors (e.g. cached ones): B x [n, He] -> [B] P(anomalous | the two answers)."""
        return self.anomaly_probability_projected([self.project(v) for v in vectors])

    # --- the reference-style path (oracle and benchmark baseline) -----------------------------

    def reference_answer(self, messages: Sequence[str]) -> ReferenceAnswer:
        """The paper's way, one window at a time: encode every message, decode greedily, search the text."""
        capped = self.cap(messages)
        if not capped:
            raise ValueError("a window needs at least one message")
        projected = self.project(self.encode_batch(capped))  # [n, H]: every message re-encoded
        batch = self.assemble([projected], [()])  # the prompt ends with PROMPT_TAIL
        generated = self.llm.generate(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
            max_new_tokens=REFERENCE_MAX_NEW_TOKENS, do_sample=False, num_beams=1,
            eos_token_id=self.llm_tokenizer.eos_token_id, pad_token_id=self.llm_tokenizer.pad_token_id,
        )  # [1, <= 6] new tokens only (decoder-only with inputs_embeds)
        text = self.llm_tokenizer.decode(generated[0], skip_special_tokens=True)
        match = _REFERENCE_ANSWER.search(text)
        return ReferenceAnswer(text=text, anomalous=None if match is None else match.group(0) == "anomalous")

    # --- the artifact -------------------------------------------------------------------------

    def save_pretrained(self, directory: Path) -> None:
        """Write the artifact: logllm.json, projector.safetensors, embedder_lora/ and llm_lora/ (PEFT).

        Written beside the target and swapped in, so a reader never sees a half-written artifact.
        """
        if self.merged or not self.has_lora:
            raise RuntimeError("only a model with (unmerged) adapters can be saved; call attach_lora() first")
        directory = Path(directory)
        partial = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file({"weight": self.projector.weight.detach().float().cpu().contiguous(),
                   "bias": self.projector.bias.detach().float().cpu().contiguous()},
                  str(partial / PROJECTOR_FILE), metadata={"format": "pt"})
        self.embedder.save_pretrained(partial / EMBEDDER_ADAPTER)
        self.llm.save_pretrained(partial / LLM_ADAPTER)
        config = {
            "kind": ARTIFACT_KIND,
            "format_version": ARTIFACT_FORMAT,
            "prompt_version": PROMPT_VERSION,
            "prompt": {"head": PROMPT_HEAD, "tail": PROMPT_TAIL, "answers": [ANSWER_NORMAL, ANSWER_ANOMALOUS]},
            "embedder": {"ref": self.embedder_base.ref, "sha256": self.embedder_base.sha256,
                         "hidden_size": self.projector.in_features},
            "llm": {"ref": self.llm_base.ref, "sha256": self.llm_base.sha256,
                    "hidden_size": self.projector.out_features, "layers": self.llm_layers},
            "decision": {**self.decision, "threshold": self.threshold},
            "max_message_tokens": self.max_message_tokens,
            "max_messages": self.max_messages,
            "view": self.view,
            "lora": {"embedder": asdict(EMBEDDER_LORA), "llm": asdict(LLM_LORA)},
            "coverage": self.coverage.to_json() if self.coverage is not None else None,
            "created_at": time.time(),
        }
        (partial / ARTIFACT_CONFIG).write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
        old = directory.with_name(f".{directory.name}.{os.getpid()}.old")
        if directory.exists():
            directory.rename(old)
        partial.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        log.info("logllm_artifact_saved", path=str(directory), fingerprint=artifact_fingerprint(directory)[:12])

    @classmethod
    def from_pretrained(
        cls,
        directory: Path,
        *,
        cache_dir: Path,
        embedder: str | Path | None = None,
        llm: str | Path | None = None,
        device: str | torch.device | None = None,
        load_in_4bit: bool = False,
        max_messages: int | None = None,
        trainable: bool = False,
    ) -> LogLLM:
        """Load an artifact onto its base models (given, else those it records); hashes must match."""
        config = read_artifact_config(directory)
        embedder_base = resolve_embedder(embedder if embedder is not None else config["embedder"]["ref"], cache_dir)
        llm_base = resolve_llm(llm if llm is not None else config["llm"]["ref"], cache_dir)
        for role, base, flag in (("encoder", embedder_base, "--embedder"), ("LLM", llm_base, "--llm")):
            recorded = config["embedder" if role == "encoder" else "llm"]
            if base.sha256 != recorded["sha256"]:
                raise BaseModelMismatch(
                    f"model artifact {directory} was trained on the {role} {recorded['ref']} "
                    f"(sha256 {recorded['sha256'][:16]}), but {base.ref} has sha256 {base.sha256[:16]}; "
                    f"pass {flag} pointing at the {role} the artifact was trained on"
                )
        model = cls._from_bases(embedder_base, llm_base, device, load_in_4bit,
                                max_messages if max_messages is not None else int(config["max_messages"]),
                                llm_layers=config["llm"].get("layers"))
        model.view = artifact_view(config)
        model.coverage = TrainingCoverage.from_json(config.get("coverage"))
        decision = config.get("decision") or {}
        model.threshold = check_threshold(decision.get("threshold", DEFAULT_THRESHOLD))
        model.decision = {**decision, "threshold": model.threshold} if decision else model.decision
        if max_messages is not None and max_messages != config["max_messages"]:
            log.warning("logllm_max_messages_differs", trained=config["max_messages"], serving=max_messages)
        weights = load_file(str(directory / PROJECTOR_FILE))
        expected = (model.projector.out_features, model.projector.in_features)
        if tuple(weights["weight"].shape) != expected:
            raise ArtifactError(f"{directory / PROJECTOR_FILE} has shape {tuple(weights['weight'].shape)}, "
                                f"the base models need {expected}")
        model.projector.load_state_dict(weights)
        if model.quantized and trainable:
            model.llm = prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=False)
        with _quiet_peft():
            model.embedder = PeftModel.from_pretrained(model.embedder, directory / EMBEDDER_ADAPTER,
                                                       is_trainable=trainable)
            model.llm = PeftModel.from_pretrained(model.llm, directory / LLM_ADAPTER, is_trainable=trainable)
        if not model.quantized:
            model.to(model.device)
        model.set_trainable(projector=trainable, embedder_lora=trainable, llm_lora=trainable)
        model.eval()
        return model


def read_artifact_config(directory: Path) -> dict[str, Any]:
    """The artifact's logllm.json, checked for kind, format and prompt version, and its files present."""
    directory = Path(directory)
    path = directory / ARTIFACT_CONFIG
    if not directory.is_dir():
        raise ArtifactError(f"model artifact {directory} is not a directory")
    try:
        config = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not a LogLLM artifact (no {ARTIFACT_CONFIG})") from None
    except orjson.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("kind") != ARTIFACT_KIND:
        raise ArtifactError(f"{path} is not a LogLLM artifact (kind {config.get('kind')!r})")
    if config.get("format_version") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path} has format version {config.get('format_version')}; this logstream reads "
                            f"{ARTIFACT_FORMAT}")
    if config.get("prompt_version") != PROMPT_VERSION:
        raise ArtifactError(f"{path} was trained with prompt version {config.get('prompt_version')}; this "
                            f"logstream uses {PROMPT_VERSION}: retrain")
    for name in (PROJECTOR_FILE, f"{EMBEDDER_ADAPTER}/adapter_config.json", f"{LLM_ADAPTER}/adapter_config.json"):
        if not (directory / name).is_file():
            raise ArtifactError(f"model artifact {directory} is incomplete: {name} is missing")
    return config


def artifact_view(config: Mapping[str, Any]) -> MessageView:
    """The message view an artifact config records: `view`, or (artifacts written before it existed)
    `collapse_repeats` true -> runs, else lines. ArtifactError for an unknown view."""
    if "view" in config:
        try:
            return check_view(str(config["view"]))
        except ValueError as exc:
            raise ArtifactError(f"{ARTIFACT_CONFIG}: {exc}") from None
    return "runs" if config.get("collapse_repeats") else "lines"


def artifact_fingerprint(directory: Path) -> str:
    """sha256 over the artifact's own files (small: config, projector, adapters) — names this exact model."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()
