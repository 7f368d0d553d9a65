"""`logstream-train fit`: LogLLM's three-stage fine-tuning, from a log dump to the artifact the consumer serves.

The stages (../shared/papers/NOTES.md; their table, with what each one updates, is `STAGE_TABLE`):

  1    LLM LoRA only, lr 5e-4, on at most `--stage1-samples` (1,000) distinct training windows per
       epoch, `--epochs-stage1` (1) epochs.
       The LLM learns to answer in the template ("The sequence is normal." / "... anomalous.") and
       the class prior. As in the authors' reference code the prompt already holds the window's
       projected message vectors, made by the frozen, seeded-random projector: they carry little
       yet, but the LLM learns to read a prompt of the served shape (vectors where the messages go)
       and to answer with one of the two sentences. Text-only prompts would teach it on inputs it
       never sees afterwards.
  2-1  projector only, lr 5e-4, 1 epoch: message vectors move to where the tuned LLM reads them.
  2-2  projector + BERT LoRA, lr 5e-5, 1 epoch.
  3    everything, lr 5e-5, `--epochs-stage3` (2) epochs (BGL is known to need more).

An epoch is one visit of every DISTINCT training window (`trainer.distinct`): windows with the same
masked message sequence and label are one example with a weight (its count; the minority class's
weights raised so it holds β = `--beta` (0.3) of the total: the paper's oversampling, on weights).
While BERT is frozen (stages 1 and 2-1) each distinct message is encoded once per run and the
vectors are reused; while its LoRA trains, once per micro-batch. So a stage costs what the distinct
data costs, and the time saved buys epochs.

Every stage: AdamW (weight decay 0.01); micro-batches of `--micro-batch` (4) windows with gradients
accumulated over `--grad-accum` (4) of them per optimizer step; the learning rate multiplied by γ =
`--lr-gamma` (0.7) every `--lr-decay-every` optimizer steps (default: a tenth of the stage's steps,
rounded up, so at most ten decays per stage, as the reference code does); loss = the weighted
mean over a step's windows of their cross-entropy over the answer tokens only (`LogLLM.loss`);
`--focal-gamma G` > 0 makes it the focal loss, each token's cross-entropy scaled by (1 - p)^G, so
the windows answered right weigh little and the rare ones the model gets wrong lead the gradient.
Frozen parts run in eval mode (no dropout noise on what is not learning).

Validation (`trainer.validation`): `--validation-fraction` (0.2) of the train split is held out
before anything is learned (the last windows in time for BGL/Thunderbird/Liberty, a stratified
random share of blocks for HDFS). After every stage the model scores it; the stage with the best
validation average precision is the one shipped (ties: the later), and the decision threshold on
P(anomalous) with the best validation F1 is stored in logllm.json, where the consumer reads it (the
alert score maps it to 50). A validation share without an anomalous window falls back to 0.5 and
the last stage, with a warning and the reason in the summary. The test split is never looked at
before the final evaluation.

Data order: epoch e of a stage visits the distinct windows in an order that is a function of (seed,
stage, e) only; stage 1 takes the first samples of its order. So the optimizer step number is the
data position, and a resumed run sees the same batches in the same order.

CPU levers (bench/RESULTS.md has their measured effect): `--llm-layers N` keeps the LLM's first N
decoder layers (stored in the artifact; the consumer loads the same shallow model), `--bf16`
runs forward and backward under bfloat16 autocast on CPUs with native bf16 (AMX/AVX512-BF16),
`--view` says what the LLM is given of a window (`logstream.model.model_view`): `lines` (every
message), `runs` (a run of identical consecutive messages once: a shorter prompt that hides how
often a message repeats) or `counts` (each distinct message once, with its count as text: what HDFS
sessions are judged by, and the shortest prompt),
`--freeze-encoder` keeps BERT frozen in every stage, so stage 3 (projector + LLM LoRA) reads the
vectors encoded once per run (~1.5x cheaper an epoch; stage 2-2 left out), `--threads`. The paper's recipe stays:
all layers, BERT's LoRA trained in stages 2-2 and 3, and on CUDA 4-bit NF4 + bf16 + checkpointing.

Loss falls? Each stage measures the loss on a fixed set of `--probe-windows` (16) training windows,
in eval mode, before and after it (`probe_before`, `probe_after` in the summary), besides the mean
training loss of its first and last quarter of micro-batches.

On CUDA the LLM is loaded in 4-bit NF4 with bf16 compute (QLoRA; `--no-load-in-4bit` for bf16
weights) and gradient checkpointing is on; on CPU everything is float32 LoRA. Under `torchrun`
each step's micro-batches are dealt out over the processes and their gradients summed
(`trainer.distributed`): the same run, faster; rank 0 alone writes.

Files in `--output DIR`: the artifact (`logllm.json`, `projector.safetensors`, `embedder_lora/`,
`llm_lora/`), replaced after every finished stage (logllm.json last, so a reader never takes half
an artifact for a whole one); `checkpoints/` (run.json with the settings, `stage-<s>.pt` per stage:
trainable weights, optimizer, scheduler, RNG, step, losses, validation scores); `report/` (test-split
evaluation beside the baselines, validation figures beside it; `report/validation/` the same on the
validation share); `fit-summary.json` (also the last stdout line).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch

from logstream.basemodels import BaseModelError
from logstream.coverage import TrainingCoverage
from logstream.device import pick_device
from logstream.logs import configure_logging, get_logger
from logstream.model import (
    ARTIFACT_CONFIG,
    EMBEDDER_ADAPTER,
    LLM_ADAPTER,
    MESSAGE_VIEWS,
    PROJECTOR_FILE,
    ArtifactError,
    LogLLM,
    MessageView,
)
from logstream.settings import Settings
from trainer.data import DATASETS, HDFS_SESSION_GAP_S, LabeledWindow, Split, load_split, summarize
from trainer.distinct import DistinctWindow, weighted_distinct
from trainer.distributed import World, WorldError
from trainer.report import headline
from trainer.training import (
    CHECKPOINTS,
    RunError,
    RunStore,
    Stage,
    fit_skeleton,
    mean,
    progress_bar,
    recent_mean,
    torch_threads,
)
from trainer.validation import Decision, carve_validation, choose_threshold, validation_ap

log = get_logger(__name__)

# The paper's stages in order (a stage starts from the latest one done before it); see the docstring.
STAGE_TABLE = (
    Stage("1", {"projector": False, "embedder_lora": False, "llm_lora": True}, 5e-4, 1,
          "the LLM learns the answer template; at most --stage1-samples windows an epoch; BERT frozen"),
    Stage("2-1", {"projector": True, "embedder_lora": False, "llm_lora": False}, 5e-4, 1,
          "the projector alone; BERT frozen (each message encoded once per run)"),
    Stage("2-2", {"projector": True, "embedder_lora": True, "llm_lora": False}, 5e-5, 1,
          "projector and BERT LoRA; BERT encodes every micro-batch"),
    Stage("3", {"projector": True, "embedder_lora": True, "llm_lora": True}, 5e-5, 2,
          "everything together"),
)
STAGES = tuple(stage.name for stage in STAGE_TABLE)
TRAINS = {stage.name: dict(stage.trains) for stage in STAGE_TABLE}
_STAGING = ".artifact-staging"
SETTINGS_FLAGS = ("window_size", "window_stride", "session_gap", "session_grace", "session_max_lines",
                  "session_max_open", "device", "embedder", "llm", "cache_dir", "load_in_4bit", "max_messages",
                  "batch_size", "log_level")
DEFAULT_LR = {stage.name: stage.lr for stage in STAGE_TABLE}
DEFAULT_EPOCHS = {stage.name: stage.epochs for stage in STAGE_TABLE}
CHRONOLOGICAL = {"bgl", "thunderbird", "liberty"}  # validation = the latest train windows; HDFS: stratified


class FitError(RunError):
    """A LogLLM training run cannot start or continue as asked; the message says why (exit 2)."""


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides what a run computes: kept in run.json, compared on --resume."""

    dataset: str
    logs: str
    labels: str | None
    seed: int
    train_fraction: float
    max_windows: int | None
    window: dict[str, Any]
    embedder: str | None
    llm: str | None
    max_messages: int
    load_in_4bit: bool
    gradient_checkpointing: bool
    beta: float
    micro_batch: int
    grad_accum: int
    lr: dict[str, float]
    epochs: dict[str, int]
    stage1_samples: int
    lr_gamma: float
    lr_decay_every: int | None
    probe_windows: int
    validation_fraction: float = 0.2
    llm_layers: int | None = None
    bf16: bool = False
    view: MessageView = "lines"
    freeze_encoder: bool = False
    count_power: float = 1.0
    focal_gamma: float = 0.0

    def trains(self, stage: str) -> dict[str, bool]:
        """What `stage` updates in this run: the stage table, with BERT's LoRA kept frozen under --freeze-encoder."""
        opens = dict(TRAINS[stage])
        if self.freeze_encoder:
            opens["embedder_lora"] = False
        return opens


def upgrade_run_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A run.json config of an older logstream in today's terms (`RunStore.begin`): `collapse_repeats`
    (a flag before `--view`) true is the runs view, false the lines view."""
    upgraded = dict(saved)
    if "collapse_repeats" in upgraded:
        upgraded.setdefault("view", "runs" if upgraded.pop("collapse_repeats") else "lines")
    return upgraded


# --- the training stream --------------------------------------------------------------------------


def training_set(train: Sequence[LabeledWindow], beta: float, max_messages: int,
                 view: MessageView = "lines", count_power: float = 1.0) -> list[DistinctWindow]:
    """The distinct train windows, weighted (minority class at `beta` of the weight); both classes required."""
    counts = summarize(train)
    if counts["anomalous"] == 0 or counts["normal"] == 0:
        missing = "anomalous" if counts["anomalous"] == 0 else "normal"
        raise FitError(f"the train split has no {missing} window ({counts['windows']} windows): LogLLM is a "
                       "classifier and needs both classes (raise --max-windows, use more data, or train the "
                       "unsupervised detector with fit-logllama)")
    return weighted_distinct(train, max_messages, beta, view, count_power)


LENGTH_POOL = 16  # micro-batches per pool of similar-length windows (`epoch_order`)


def epoch_order(size: int, seed: int, stage: str, epoch: int, lengths: Sequence[int] | None = None,
                micro_batch: int = 1) -> list[int]:
    """Stream positions in the order stage `stage` visits them in epoch `epoch`: a function of its arguments only.

    With `lengths` (prompt messages per window), windows of similar length share a micro-batch, so
    little of a left-padded batch is padding: the shuffled order is cut into pools of
    `LENGTH_POOL` micro-batches, each pool sorted by length and cut into micro-batches, and those
    shuffled again within the pool. Every window is still visited once per epoch.
    """
    rng = random.Random(f"{seed}/{stage}/{epoch}")
    order = list(range(size))
    rng.shuffle(order)
    if lengths is None or micro_batch <= 1:
        return order
    pool = LENGTH_POOL * micro_batch
    result: list[int] = []
    for start in range(0, size, pool):
        ranked = sorted(order[start : start + pool], key=lambda i: lengths[i])
        chunks = [ranked[j : j + micro_batch] for j in range(0, len(ranked), micro_batch)]
        rng.shuffle(chunks)
        result.extend(i for chunk in chunks for i in chunk)
    return result


def probe_set(train: Sequence[DistinctWindow], size: int, beta: float, seed: int) -> list[DistinctWindow]:
    """A fixed set of distinct training windows (about `beta` of them anomalous) to measure each stage's loss on."""
    if size <= 0:
        return []
    rng = random.Random(f"{seed}/probe")
    anomalous = [w for w in train if w.label]
    normal = [w for w in train if not w.label]
    take_anomalous = min(len(anomalous), max(1, round(size * beta)))
    take_normal = min(len(normal), size - take_anomalous)
    return rng.sample(anomalous, take_anomalous) + rng.sample(normal, take_normal)


@dataclass(frozen=True, slots=True)
class Plan:
    """One stage's schedule: samples per epoch, micro-batches, optimizer steps, LR decay interval."""

    stage: str
    samples: int
    epochs: int
    micro_per_epoch: int
    steps_per_epoch: int
    decay_every: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @classmethod
    def make(cls, stage: str, config: FitConfig, stream_size: int) -> Plan:
        samples = min(config.stage1_samples, stream_size) if stage == "1" else stream_size
        epochs = config.epochs.get(stage, 1)
        micro = math.ceil(samples / config.micro_batch)
        steps = math.ceil(micro / config.grad_accum)
        decay = config.lr_decay_every or math.ceil(steps * epochs / 10)  # at most ten decays per stage
        return cls(stage, samples, epochs, micro, steps, decay)

    def micro_batches(self, step: int, stream_size: int, seed: int, micro_batch: int,
                      grad_accum: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
        """Stream positions of each micro-batch of optimizer step `step` (0-based, counted over all epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(stream_size, seed, self.stage, epoch, lengths, micro_batch)[: self.samples]
        first = within * grad_accum
        last = min(first + grad_accum, self.micro_per_epoch)
        return [order[m * micro_batch : (m + 1) * micro_batch] for m in range(first, last)]


# --- weights, RNG and the artifact ----------------------------------------------------------------


def trainable_state(model: LogLLM) -> dict[str, torch.Tensor]:
    """Everything any stage trains (projector and both LoRA adapters), whatever is trainable right now."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()
            if name.startswith("projector.") or "lora_" in name}


def load_trainable_state(model: LogLLM, state: dict[str, torch.Tensor]) -> None:
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise FitError("checkpoint weights do not fit this model (different base models or LoRA shapes): "
                       f"{len(expected ^ set(state))} tensors differ by name")
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, value in state.items():
            parameters[name].copy_(value.to(parameters[name].device, parameters[name].dtype))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def publish_artifact(model: LogLLM, output: Path) -> None:
    """Write the servable artifact into `output` beside checkpoints/ and report/, which stay.

    `LogLLM.save_pretrained` swaps a whole directory, so it writes a staging directory inside
    `output`; its entries replace the old ones with logllm.json removed first and put back last: a
    reader sees the old artifact, an incomplete one (refused), or the new one, never a mix.
    """
    output.mkdir(parents=True, exist_ok=True)
    staging = output / _STAGING
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    (output / ARTIFACT_CONFIG).unlink(missing_ok=True)
    for name in (PROJECTOR_FILE, EMBEDDER_ADAPTER, LLM_ADAPTER):
        target = output / name
        if target.is_dir():
            old = output / f".{name}.{os.getpid()}.old"
            target.rename(old)
            shutil.rmtree(old)
        (staging / name).replace(target)
    (staging / ARTIFACT_CONFIG).replace(output / ARTIFACT_CONFIG)
    shutil.rmtree(staging)


# --- one run --------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The split, the validation share carved from its train part, the distinct weighted training set, the probe."""

    split: Split
    fit_train: list[LabeledWindow]  # the train split minus the validation share: what the model learns from
    validation: list[LabeledWindow]
    stream: list[DistinctWindow]  # distinct fit_train windows, weighted; an epoch visits each once
    probe: list[DistinctWindow]
    stats: dict[str, Any] = field(default_factory=dict)

    def messages(self, view: Callable[[Sequence[str]], list[str]]) -> list[str]:
        """Every distinct message the run scores, as the model sees them (`view`: `LogLLM.cap`): training,
        probe and validation windows."""
        seen: dict[str, None] = {}
        for item in self.stream:
            seen.update(dict.fromkeys(item.templates))
        for labeled in self.validation:
            seen.update(dict.fromkeys(view(labeled.window.templates)))
        return list(seen)


class Trainer:
    """One `fit` run: data, the stages asked for (done ones skipped, an interrupted one resumed), the artifact."""

    def __init__(self, config: FitConfig, output: Path, settings: Settings, *, checkpoint_every: int,
                 resume: bool, world: World | None = None) -> None:
        self.config = config
        self.output = output
        self.settings = settings
        self.checkpoint_every = checkpoint_every
        self.world = world if world is not None else World()
        self.store = RunStore(output / CHECKPOINTS, FitError)
        self.run_id = self.world.on_main(lambda: self.store.begin(config, resume=resume,
                                                                            upgrade=upgrade_run_config))
        self.summary: dict[str, Any] = {"output": str(output), "run_id": self.run_id, "stages": {}}
        self.model: LogLLM | None = None
        self.coverage: TrainingCoverage | None = None  # set by prepare(), written into the artifact
        self.weights_of: str | None = None  # the done stage whose weights the model holds (None: fresh)
        self.vectors: dict[str, torch.Tensor] | None = None  # frozen-encoder vectors; None once the encoder moves

    # --- data -------------------------------------------------------------------------------------

    def prepare(self) -> Prepared:
        c = self.config
        split = load_split(c.dataset, Path(c.logs), Path(c.labels) if c.labels else None, seed=c.seed,
                           train_fraction=c.train_fraction, max_windows=c.max_windows, **c.window)
        fit_train, validation = carve_validation(split.train, c.validation_fraction,
                                                 chronological=c.dataset in CHRONOLOGICAL, seed=c.seed)
        stream = training_set(fit_train, c.beta, c.max_messages, c.view, c.count_power)
        probe = probe_set(stream, c.probe_windows, c.beta, c.seed)
        weight = sum(w.weight for w in stream)
        stats = {
            "train": summarize(split.train), "fit_train": summarize(fit_train), "validation": summarize(validation),
            "validation_rule": ("chronological (latest train windows)" if c.dataset in CHRONOLOGICAL else
                                "stratified random share of blocks"),
            "test": summarize(split.test), "distinct": len(stream),
            "distinct_anomalous": sum(1 for w in stream if w.label),
            "anomalous_weight_share": round(sum(w.weight for w in stream if w.label) / weight, 4),
            "stage1_samples": min(c.stage1_samples, len(stream)), "probe_windows": len(probe),
            "test_windows_in_train": split.stats.get("overlap", {}).get("test_windows_in_train"),
        }
        log.info("logllm_fit_data", **stats)
        self.summary["data"] = stats
        # the templates the model learns from, and how many test lines bring others (logstream.coverage)
        self.coverage = TrainingCoverage.measure(
            f"{c.dataset} {c.logs}", (t for w in split.train for t in w.window.templates),
            (t for w in split.test for t in w.window.templates))
        return Prepared(split, fit_train, validation, stream, probe, stats)

    # --- the model --------------------------------------------------------------------------------

    def build_model(self) -> LogLLM:
        """Base models, a seeded projector and fresh adapters (the same in every process of this run)."""
        c = self.config
        torch.manual_seed(c.seed)
        model = LogLLM.build(embedder=c.embedder, llm=c.llm, cache_dir=self.settings.cache_dir,
                             device=self.settings.device, load_in_4bit=c.load_in_4bit,
                             max_messages=c.max_messages, seed=c.seed, llm_layers=c.llm_layers,
                             view=c.view)
        model.attach_lora()
        if c.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        trainable = sum(p.numel() for _, p in trainable_state(model).items())
        log.info("logllm_fit_model", device=str(model.device), load_in_4bit=c.load_in_4bit,
                 gradient_checkpointing=c.gradient_checkpointing, trainable_parameters=trainable)
        return model

    def done_stages(self) -> dict[str, dict[str, Any]]:
        """Finished stages of this run, by name, from their checkpoints."""
        done = {}
        for stage in STAGES:
            saved = self.store.load(stage)
            if saved is not None and saved.get("run_id") == self.run_id and saved.get("done"):
                done[stage] = saved
        return done

    def start_weights(self, stage: str, done: dict[str, dict[str, Any]]) -> str | None:
        """Put the weights a stage starts from into the model: the latest stage done before it, else fresh."""
        assert self.model is not None
        before = [s for s in STAGES[: STAGES.index(stage)] if s in done]
        source = before[-1] if before else None
        if source != self.weights_of:
            if source is None:
                self.model = self.build_model()  # fresh adapters (only after another stage's weights were loaded)
            else:
                load_trainable_state(self.model, done[source]["weights"])
            self.weights_of = source
            self.vectors = None
        return source

    # --- stages -----------------------------------------------------------------------------------

    def run(self, stages: Sequence[str], data: Prepared) -> None:
        done = self.done_stages()
        for stage in stages:
            later = [s for s in STAGES[STAGES.index(stage) + 1 :] if s in done]
            if stage in done:
                log.info("stage_already_done", stage=stage)
                self.summary["stages"][stage] = done[stage]["info"]
                continue
            if later:
                raise FitError(f"stage {stage} cannot run after stage {later[0]} of this run is done "
                               f"(it would overwrite later training); use another --output")
            if self.model is None:
                self.model = self.build_model()
            self.stage(stage, data, done)
            done = self.done_stages()

    def stage(self, stage: str, data: Prepared, done: dict[str, dict[str, Any]]) -> None:
        """Train one stage from its checkpoint (or its start), then publish the artifact and mark it done."""
        c = self.config
        plan = Plan.make(stage, c, len(data.stream))
        saved = self.store.load(stage)
        if saved is not None and saved.get("run_id") != self.run_id:
            raise FitError(f"checkpoint {self.store.path(stage)} belongs to another run")
        source = self.start_weights(stage, done) if saved is None else None
        model = self.model
        assert model is not None
        model.set_trainable(**c.trains(stage))
        parameters = [p for _, p in model.trainable_parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=c.lr[stage], weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=plan.decay_every, gamma=c.lr_gamma)
        if saved is None:
            torch.manual_seed(self._dropout_seed(stage))  # the same with or without --resume
            previous = done[source]["info"].get("probe_after") if source is not None else None
            state: dict[str, Any] = {"step": 0, "seconds": 0.0, "losses": [],
                                     "probe_before": previous if previous is not None else self.probe(data)}
            log.info("stage_started", stage=stage, starts_from=source or "fresh weights", steps=plan.total_steps,
                     samples_per_epoch=plan.samples, epochs=plan.epochs, lr=c.lr[stage])
        else:
            load_trainable_state(model, saved["weights"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            self._restore_rng(saved, stage)
            state = {key: saved[key] for key in ("step", "seconds", "losses", "probe_before")}
            self.weights_of = None  # mid-stage weights belong to no done stage
            self.vectors = None
            log.info("checkpoint_restored", stage=stage, step=state["step"], total=plan.total_steps)
        self.train_steps(plan, data, optimizer, scheduler, state)
        if c.trains(stage)["embedder_lora"]:
            self.vectors = None  # the encoder moved: its cached vectors are stale
        probe_after = self.probe(data)
        validation_p = self.validation_probabilities(data)
        labels = [w.label for w in data.validation]
        losses = state["losses"]
        quarter = max(1, len(losses) // 4)
        info = {
            "seconds": round(state["seconds"], 1), "steps": plan.total_steps, "epochs": plan.epochs,
            "samples_per_epoch": plan.samples, "micro_batches": len(losses), "lr": c.lr[stage],
            "lr_decay_every": plan.decay_every, "loss_first": mean(losses[:quarter]),
            "loss_last": mean(losses[-quarter:]), "probe_before": state["probe_before"], "probe_after": probe_after,
            "validation": {"windows": len(labels), "anomalous": sum(labels),
                           "average_precision": validation_ap(labels, validation_p)},
        }
        payload = {**self._payload(stage, state, optimizer, scheduler), "done": True, "info": info,
                   "validation_p": validation_p}

        def publish() -> None:
            model.coverage = self.coverage
            publish_artifact(model, self.output)
            self.store.save(stage, payload)

        self.world.on_main(publish)
        self.weights_of = stage
        self.summary["stages"][stage] = info
        log.info("stage_done", stage=stage, **info)

    def train_steps(self, plan: Plan, data: Prepared, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any]) -> None:
        """Optimizer steps from `state['step']` to the end of the plan; checkpoints every N steps and at the end."""
        c = self.config
        model = self.model
        assert model is not None
        self._train_mode(plan.stage)
        began = time.perf_counter() - state["seconds"]
        world = self.world
        vectors = None if c.trains(plan.stage)["embedder_lora"] else self.frozen_vectors(data)
        lengths = [len(w.templates) for w in data.stream]
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        bar = progress_bar(plan.total_steps, state["step"], f"stage {plan.stage}", shown=world.main)
        windows_seen, window_began = 0, time.perf_counter()
        try:
            while state["step"] < plan.total_steps:
                step = state["step"]
                micro_batches = [[data.stream[i] for i in m] for m in
                                 plan.micro_batches(step, len(data.stream), c.seed, c.micro_batch, c.grad_accum,
                                                    lengths)]
                in_step = sum(len(m) for m in micro_batches)
                step_weight = sum(w.weight for m in micro_batches for w in m)
                mine: list[tuple[int, float]] = []  # (micro-batch index, loss): this rank's share of the step
                for index in range(world.rank, len(micro_batches), world.size):
                    batch = micro_batches[index]
                    weights = [w.weight for w in batch]
                    with self._autocast():
                        loss = model.loss([w.example.window.templates for w in batch], [w.label for w in batch],
                                          vectors=vectors, weights=weights, focal_gamma=c.focal_gamma)
                    (loss * (sum(weights) / step_weight)).backward()
                    mine.append((index, round(loss.item(), 5)))
                world.sum_gradients(parameters)
                state["losses"].extend(value for _, value in sorted(x for part in world.gather(mine) for x in part))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] = step + 1
                state["seconds"] = time.perf_counter() - began
                windows_seen += in_step
                rate = windows_seen / max(1e-9, time.perf_counter() - window_began)
                shown = {"loss": round(recent_mean(state["losses"], 4 * c.grad_accum), 4),
                         "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
                bar.set_postfix(**shown, windows_s=f"{rate:.2f}", epoch=step // plan.steps_per_epoch + 1,
                                refresh=False)
                bar.update(1)
                if state["step"] % self.checkpoint_every == 0 or state["step"] == plan.total_steps:
                    payload = self._payload(plan.stage, state, optimizer, scheduler)
                    self.world.on_main(functools.partial(self.store.save, plan.stage, payload))
                    log.info("stage_progress", stage=plan.stage, step=state["step"], total=plan.total_steps,
                             epoch=step // plan.steps_per_epoch + 1, **shown, windows_per_s=round(rate, 3),
                             seconds=round(state["seconds"], 1))
        finally:
            bar.close()
        model.eval()

    def _train_mode(self, stage: str) -> None:
        """Dropout where something learns; frozen parts in eval mode (deterministic features)."""
        model = self.model
        assert model is not None
        opens = self.config.trains(stage)
        model.train()
        if not opens["embedder_lora"]:
            model.embedder.eval()
        if not opens["llm_lora"]:
            model.llm.eval()

    def _autocast(self) -> Any:
        """bfloat16 autocast on CPU with `--bf16` (weights and optimizer stay float32); otherwise nothing."""
        assert self.model is not None
        enabled = self.config.bf16 and self.model.device.type == "cpu"
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=enabled)

    def frozen_vectors(self, data: Prepared) -> dict[str, torch.Tensor]:
        """Encoder vectors of every distinct message of the run, for the encoder's current weights.

        Computed once (eval mode, no gradients) and reused until the encoder's weights change.
        """
        model = self.model
        assert model is not None
        if self.vectors is None:
            began = time.perf_counter()
            was_training = model.embedder.training
            model.embedder.eval()
            self.vectors = model.encode_distinct(data.messages(model.cap))
            model.embedder.train(was_training)
            log.info("messages_encoded", distinct=len(self.vectors), seconds=round(time.perf_counter() - began, 2))
        return self.vectors

    def probe(self, data: Prepared) -> float | None:
        """Mean answer-token loss on the fixed probe windows, in eval mode, no gradients."""
        model = self.model
        assert model is not None
        if not data.probe:
            return None
        vectors = self.frozen_vectors(data)
        was_training = model.training
        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(data.probe), self.config.micro_batch):
                batch = data.probe[start : start + self.config.micro_batch]
                loss = model.loss([w.example.window.templates for w in batch], [w.label for w in batch],
                                  vectors=vectors)
                total += loss.item() * len(batch)
        model.train(was_training)
        return round(total / len(data.probe), 5)

    def validation_probabilities(self, data: Prepared) -> list[float]:
        """P(anomalous) of each validation window as served (eval mode, float32), distinct sequences scored once."""
        model = self.model
        assert model is not None
        if not data.validation:
            return []
        vectors = self.frozen_vectors(data)
        sequences = [tuple(model.cap(w.window.templates)) for w in data.validation]
        distinct = sorted(dict.fromkeys(sequences), key=len)
        was_training = model.training
        model.eval()
        found: dict[tuple[str, ...], float] = {}
        with torch.no_grad():
            for start in range(0, len(distinct), 16):
                chunk = distinct[start : start + 16]
                p = model.anomaly_probability([torch.stack([vectors[m] for m in seq]) for seq in chunk])
                found.update(zip(chunk, p.tolist()))
        model.train(was_training)
        return [round(found[seq], 7) for seq in sequences]

    def finish(self, data: Prepared) -> None:
        """Publish the best stage's model, then free it: the evaluation loads the artifact as the consumer does."""
        self._publish_best(data)
        self.model = None

    def _publish_best(self, data: Prepared) -> None:
        """Ship the stage with the best validation AP, with the validation-chosen threshold in logllm.json."""
        done = self.done_stages()
        if not done:
            return
        order = [s for s in STAGES if s in done]
        scored = [s for s in order if done[s]["info"].get("validation", {}).get("average_precision") is not None]
        best = max(scored, key=lambda s: (done[s]["info"]["validation"]["average_precision"], STAGES.index(s))) \
            if scored else order[-1]
        labels = [w.label for w in data.validation]
        decision: Decision = choose_threshold(labels, done[best].get("validation_p", []))
        if decision.source == "fallback":
            log.warning("threshold_fallback", reason=decision.reason, stage=best)
        if self.model is None:
            self.model = self.build_model()
        if self.weights_of != best:
            load_trainable_state(self.model, done[best]["weights"])
            self.weights_of = best
            self.vectors = None
        model = self.model
        model.coverage = self.coverage
        model.threshold = decision.threshold
        model.decision = {**decision.as_dict(), "stage": best,
                          "validation_average_precision": done[best]["info"]["validation"]["average_precision"]
                          if best in scored else None}
        self.world.on_main(lambda: publish_artifact(model, self.output))
        self.summary["selected"] = {"stage": best, "by": "validation average precision" if scored else
                                    "last stage (no validation average precision: no anomalous validation window)",
                                    "validation_ap": {s: done[s]["info"]["validation"]["average_precision"]
                                                      for s in order},
                                    "decision": model.decision}
        log.info("stage_selected", **self.summary["selected"])

    def _payload(self, stage: str, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                 scheduler: Any) -> dict[str, Any]:
        """A checkpoint; every rank calls it (its RNG state is gathered), rank 0 writes it."""
        assert self.model is not None
        rngs = self.world.gather(rng_state())
        return {"run_id": self.run_id, "stage": stage, "done": False, "step": state["step"],
                "seconds": state["seconds"], "losses": state["losses"], "probe_before": state["probe_before"],
                "weights": trainable_state(self.model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rngs[0], "rng_by_rank": rngs}

    def _restore_rng(self, saved: dict[str, Any], stage: str) -> None:
        """This rank's RNG from the checkpoint; a rank the saving run did not have draws a fresh stream."""
        by_rank = saved.get("rng_by_rank") or [saved["rng"]]
        if self.world.rank < len(by_rank):
            set_rng_state(by_rank[self.world.rank])
        else:
            torch.manual_seed(self._dropout_seed(stage) + saved["step"])

    def _dropout_seed(self, stage: str) -> int:
        """Seed of a stage's dropout noise: a function of the run's seed, the stage and the rank (each draws
        its own)."""
        return self.config.seed * 1_000_003 + STAGES.index(stage) + 7919 * self.world.rank


# --- command --------------------------------------------------------------------------------------


def parse_stages(text: str) -> list[str]:
    """`1,2,3` -> the four stages; `2` is 2-1 and 2-2; any subset, run in the paper's order."""
    chosen: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if part == "2":
            chosen |= {"2-1", "2-2"}
        elif part in STAGES:
            chosen.add(part)
        elif part:
            raise FitError(f"--stages {text!r}: unknown stage {part!r}; choose from 1, 2 (= 2-1,2-2), 2-1, 2-2, 3")
    if not chosen:
        raise FitError("--stages names no stage")
    return [s for s in STAGES if s in chosen]


def add_parser(subparsers: Any) -> None:
    """Register `fit` and its flags."""
    from logstream.argparsing import DefaultsHelpFormatter
    from logstream.cliargs import add_settings_arguments

    parser = subparsers.add_parser(
        "fit", help="three-stage LogLLM fine-tuning on a log dump; writes the artifact `logstream run` serves",
        description=__doc__.split("\n\n")[0] if __doc__ else None, formatter_class=DefaultsHelpFormatter,
        epilog=f"HDFS: unless --session-gap is given, sessions use a {HDFS_SESSION_GAP_S:g} s gap (see README). "
               "On a shared CPU, --threads 1 is often fastest.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=DATASETS,
                      help="which dump format and split rule (see README: Data and splits)")
    data.add_argument("--logs", type=Path, required=True, help="log dump (plain or .gz; Liberty also LogLLM CSV)")
    data.add_argument("--labels", type=Path, default=None, help="HDFS block labels (anomaly_label.csv)")
    data.add_argument("--output", type=Path, required=True, help="artifact directory (also checkpoints/, report/)")
    data.add_argument("--max-windows", type=int, default=None,
                      help="at most N windows per split (seeded stratified sample, anomalies kept)")
    data.add_argument("--seed", type=int, default=42,
                      help="seed of the split, oversampling, projector and LoRA initialisation, data order")
    data.add_argument("--train-fraction", type=float, default=0.8, help="share of the dump used for training")
    data.add_argument("--beta", type=float, default=0.3,
                      help="minority class share of the training weight (oversampling on weights)")
    data.add_argument("--count-power", type=float, default=1.0,
                      help="a distinct training window weighs count**P (1: as often as it occurs, the stream's "
                           "objective; 0.5: a normal pattern seen twice is not drowned by one seen a thousand "
                           "times; 0: all distinct windows alike)")
    data.add_argument("--validation-fraction", type=float, default=0.2,
                      help="share of the train split held out to pick the stage and the threshold (0: none; "
                           "the threshold then falls back to 0.5)")
    train = parser.add_argument_group("training")
    train.add_argument("--stages", default=None,
                       help="stages to run: 1, 2 (= 2-1,2-2), 2-1, 2-2, 3, comma-separated (default 1,2,3; "
                            "1,2-1,3 with --freeze-encoder)")
    train.add_argument("--stage1-samples", type=int, default=1000,
                       help="distinct training windows per stage-1 epoch (at most)")
    for stage, epochs in DEFAULT_EPOCHS.items():
        train.add_argument(f"--epochs-stage{stage}", dest=f"epochs_stage{stage.replace('-', '_')}", type=int,
                           default=epochs, help=f"epochs of stage {stage} (default %(default)s)")
    for stage, lr in DEFAULT_LR.items():
        train.add_argument(f"--lr-stage{stage}", dest=f"lr_stage{stage.replace('-', '_')}", type=float, default=lr,
                           help=f"learning rate of stage {stage} (default %(default)s)")
    train.add_argument("--focal-gamma", type=float, default=0.0,
                       help="focal loss: scale each answer token's cross-entropy by (1 - p)^gamma, so the windows "
                            "the model gets wrong lead the gradient (Lin et al. 2017 use 2); 0, the default, is the "
                            "paper's cross-entropy")
    train.add_argument("--micro-batch", type=int, default=4, help="windows per forward/backward pass")
    train.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    train.add_argument("--lr-gamma", type=float, default=0.7, help="exponential learning-rate decay factor")
    train.add_argument("--lr-decay-every", type=int, default=None,
                       help="optimizer steps between decays (default: a tenth of each stage's steps)")
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in backward (default: on with CUDA)")
    train.add_argument("--probe-windows", type=int, default=16,
                       help="fixed training windows whose loss is measured before and after each stage (0: none)")
    train.add_argument("--checkpoint-every", type=int, default=10, help="optimizer steps between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoints")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice; on a shared CPU 1 is often fastest)")
    train.add_argument("--llm-layers", type=int, default=None,
                       help="keep the LLM's first N decoder layers (default: all, the paper's recipe); stored in "
                            "the artifact, so the consumer serves the same model")
    train.add_argument("--view", choices=MESSAGE_VIEWS, default="lines",
                       help="what the LLM is given of a window: lines (every masked message, the paper's), runs "
                            "(a run of identical consecutive messages once: ~4x shorter BGL prompts) or counts "
                            "(each distinct message once as '<k> x <message>': how often, not in what order); "
                            "stored in the artifact, the consumer does the same")
    train.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=False,
                       help="keep BERT frozen in every stage (stage 3 trains the projector and the LLM's LoRA on "
                            "message vectors encoded once per run: a stage-3 epoch ~1.5x cheaper on CPU); stage 2-2, "
                            "which trains only the projector and BERT, is left out (refused if named in --stages)")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                       help="bfloat16 autocast for training on CPU (needs native bf16: AMX or AVX512-BF16); "
                            "on CUDA the LLM computes in bf16 anyway")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--report", type=Path, default=None,
                            help="evaluation report directory (default DIR/report)")
    evaluation.add_argument("--no-evaluate", action="store_true", help="skip the test-split evaluation")
    add_settings_arguments(parser, only=SETTINGS_FLAGS)
    parser.set_defaults(func=run)


def config_from(args: argparse.Namespace, settings: Settings) -> FitConfig:
    """The run's FitConfig from the flags; contradictions are FitErrors."""
    from trainer.evaluate import session_options

    for name in ("micro_batch", "grad_accum", "stage1_samples", "epochs_stage1", "epochs_stage2_1",
                 "epochs_stage2_2", "epochs_stage3", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise FitError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr_decay_every is not None and args.lr_decay_every < 1:
        raise FitError("--lr-decay-every must be at least 1")
    if not 0.0 < args.lr_gamma <= 1.0:
        raise FitError("--lr-gamma must be in (0, 1]")
    for name in ("probe_windows", "focal_gamma"):
        if getattr(args, name) < 0:
            raise FitError(f"--{name.replace('_', '-')} must be 0 or more")
    if not 0.0 <= args.count_power <= 1.0:
        raise FitError("--count-power must be between 0 and 1")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise FitError("--validation-fraction must be at least 0 and below 1")
    if args.llm_layers is not None and args.llm_layers < 1:
        raise FitError("--llm-layers must be at least 1")
    if args.dataset == "hdfs" and args.labels is None:
        raise FitError("HDFS needs --labels (anomaly_label.csv): LogLLM learns from labelled windows")
    device = pick_device(settings.device)
    load_in_4bit = settings.load_in_4bit if "load_in_4bit" in settings.model_fields_set else device.type == "cuda"
    checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else device.type == "cuda"
    lrs = {stage: getattr(args, f"lr_stage{stage.replace('-', '_')}") for stage in STAGES}
    if any(lr <= 0 for lr in lrs.values()):
        raise FitError("learning rates must be positive")
    window = (session_options(settings) if args.dataset == "hdfs" else
              {"window_size": settings.window_size, "window_stride": settings.window_stride})
    return FitConfig(
        dataset=args.dataset, logs=str(Path(args.logs).resolve()),
        labels=str(Path(args.labels).resolve()) if args.labels else None, seed=args.seed,
        train_fraction=args.train_fraction, max_windows=args.max_windows, window=window,
        embedder=str(settings.embedder) if settings.embedder else None, llm=str(settings.llm) if settings.llm else None,
        max_messages=settings.max_messages, load_in_4bit=load_in_4bit, gradient_checkpointing=checkpointing,
        beta=args.beta, micro_batch=args.micro_batch, grad_accum=args.grad_accum, lr=lrs,
        epochs={"1": args.epochs_stage1, "2-1": args.epochs_stage2_1, "2-2": args.epochs_stage2_2,
                "3": args.epochs_stage3},
        stage1_samples=args.stage1_samples, lr_gamma=args.lr_gamma, lr_decay_every=args.lr_decay_every,
        probe_windows=args.probe_windows, validation_fraction=args.validation_fraction, llm_layers=args.llm_layers,
        bf16=bool(args.bf16) and device.type == "cpu", view=args.view,
        freeze_encoder=bool(args.freeze_encoder), count_power=args.count_power,
        focal_gamma=args.focal_gamma,
    )


def fit(args: argparse.Namespace, settings: Settings, world: World | None = None) -> dict[str, Any]:
    """Run the stages asked for (skipping those already done in a resumed run), then evaluate (rank 0)."""
    world = world if world is not None else World.from_env()
    stages = parse_stages(args.stages or ("1,2-1,3" if args.freeze_encoder else "1,2,3"))
    if world.distributed:  # one GPU per process; every process trains the same run
        settings = settings.model_copy(update={"device": world.device(settings.device)})
    config = config_from(args, settings)
    if config.freeze_encoder and "2-2" in stages:
        raise FitError("--freeze-encoder keeps BERT frozen, and stage 2-2 trains only the projector and BERT: "
                       "leave it out of --stages (e.g. 1,2-1,3, the default with --freeze-encoder)")
    world.start(pick_device(settings.device))
    try:
        with torch_threads(args.threads):
            trainer = Trainer(config, args.output, settings, checkpoint_every=args.checkpoint_every,
                              resume=args.resume, world=world)
            trainer.summary["processes"] = world.size
            evaluate = functools.partial(evaluate_run, args, settings, trainer) if world.main else None
            return fit_skeleton(trainer, stages, args.output, evaluate)
    finally:
        world.close()


def evaluate_run(args: argparse.Namespace, settings: Settings, trainer: Trainer,
                 data: Prepared) -> dict[str, Any] | None:
    """The test split scored by the artifact as `logstream run` loads it, beside the baselines; the
    validation share the same way, side by side in the report.

    The baselines are fitted on the windows the model learned from (the train split minus the
    validation share), so every detector has seen the same data.
    """
    from logstream.detectors.logllm import LogLLMDetector
    from trainer.evaluate import evaluate

    if args.no_evaluate or not any(w.label for w in data.split.test):
        log.info("evaluation_skipped",
                 reason="--no-evaluate" if args.no_evaluate else "no anomalous window in the test split")
        return None
    if not (args.output / ARTIFACT_CONFIG).is_file():
        log.info("evaluation_skipped", reason="no stage has finished: no artifact")
        return None
    serving = settings.model_copy(update={"detector": "logllm", "model": args.output, "load_in_4bit": False})
    detector = LogLLMDetector.from_settings(serving)
    report = args.report or args.output / "report"
    context = {"argv": sys.argv[1:], "fit": trainer.summary["stages"], "selected": trainer.summary.get("selected"),
               "baselines_fitted_on": "the train split minus the validation share"}
    try:
        validation = None
        if any(w.label for w in data.validation):
            stats = {**data.split.stats, "test": summarize(data.validation)}
            validation = evaluate(Split(data.fit_train, data.validation, stats), report / "validation",
                                  detector=detector, model=str(args.output), part="test",
                                  batch_size=settings.batch_size, seed=trainer.config.seed, progress=False,
                                  context={**context, "evaluated": "validation share"})
        test = evaluate(Split(data.fit_train, data.split.test, data.split.stats), report, detector=detector,
                        model=str(args.output), batch_size=settings.batch_size, seed=trainer.config.seed,
                        context={**context, "validation": validation})
    finally:
        detector.close()
    test["validation"] = None if validation is None else {
        key: validation[key] for key in ("precision", "recall", "f1", "average_precision", "windows",
                                         "anomalous_windows", "baselines")}
    return test


def run(args: argparse.Namespace) -> int:
    from logstream.cliargs import command_settings, start_logging
    from logstream.detectors.base import DetectorNotReady

    started = time.perf_counter()
    settings = command_settings(args, SETTINGS_FLAGS, "fit")
    if settings is None:
        return 2
    try:
        world = World.from_env()
    except WorldError as exc:
        print(f"logstream-train fit: {exc}", file=sys.stderr)
        return 2
    if world.main:  # rank 0 tells the story
        start_logging(settings.log_level)
    else:
        configure_logging("WARNING")
    try:
        summary = fit(args, settings, world)
    except (RunError, ArtifactError, BaseModelError, DetectorNotReady, ValueError, OSError, WorldError) as exc:
        where = f" (rank {world.rank})" if world.distributed else ""
        print(f"logstream-train fit{where}: {exc}", file=sys.stderr)
        return 2
    if world.main:
        summary["total_seconds"] = round(time.perf_counter() - started, 1)
        if isinstance(summary.get("evaluation"), dict):  # for the terminal; stdout stays one JSON line
            print(headline(summary["evaluation"]), file=sys.stderr, flush=True)
        print(orjson.dumps(summary).decode(), flush=True)
    return 0
