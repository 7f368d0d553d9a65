"""`logstream-train fit` without models: stage choice, schedules, data order, weighted distinct set, probe set."""

from __future__ import annotations

import math

import pytest
import torch

from logstream.records import LogLine, Window
from trainer.data import LabeledWindow
from trainer.fit_logllm import (
    STAGES,
    FitConfig,
    FitError,
    Plan,
    epoch_order,
    parse_stages,
    probe_set,
    training_set,
)


def windows(anomalous: int, normal: int) -> list[LabeledWindow]:
    """Distinct one-line windows: the first `anomalous` labelled anomalous."""
    result = []
    for i in range(anomalous + normal):
        line = LogLine("t", 0, i, raw=f"m{i}", template=f"m{i}", event_time=float(i))
        result.append(LabeledWindow(Window("count", "t/0", "t", 0, [line], "size"), i < anomalous))
    return result


def config(**overrides: object) -> FitConfig:
    base: dict[str, object] = {
        "dataset": "bgl", "logs": "x", "labels": None, "seed": 7, "train_fraction": 0.8, "max_windows": None,
        "window": {}, "embedder": None, "llm": None, "max_messages": 128, "load_in_4bit": False,
        "gradient_checkpointing": False, "beta": 0.3, "micro_batch": 4, "grad_accum": 4,
        "lr": {"1": 5e-4, "2-1": 5e-4, "2-2": 5e-5, "3": 5e-5}, "epochs": {"2-1": 1, "2-2": 1, "3": 2},
        "stage1_samples": 1000, "lr_gamma": 0.7, "lr_decay_every": None, "probe_windows": 16,
        "validation_fraction": 0.2, "llm_layers": None, "bf16": False,
    }
    base.update(overrides)
    return FitConfig(**base)  # type: ignore[arg-type]


def test_stages_are_named_as_in_the_paper_and_run_in_its_order() -> None:
    assert parse_stages("1,2,3") == list(STAGES) == ["1", "2-1", "2-2", "3"]
    assert parse_stages("3,1") == ["1", "3"]
    assert parse_stages("2") == ["2-1", "2-2"]
    assert parse_stages(" 2-2 ") == ["2-2"]
    for bad in ("4", "", "1,x"):
        with pytest.raises(FitError):
            parse_stages(bad)


@pytest.mark.parametrize(("anomalous", "normal"), [(3, 97), (1, 40), (90, 10), (30, 70), (45, 55)])
def test_the_training_set_weighs_the_minority_class_at_beta(anomalous: int, normal: int) -> None:
    """Anomalous or normal, the minority holds >= 30 % of the weight (exactly 30 % when raised); nothing dropped."""
    train = windows(anomalous, normal)
    distinct = training_set(train, beta=0.3, max_messages=128)
    weight = {label: sum(w.weight for w in distinct if w.label == label) for label in (True, False)}
    minority_label = anomalous <= normal
    assert weight[not minority_label] == max(anomalous, normal)  # the majority keeps weight 1 per window
    share = weight[minority_label] / (weight[True] + weight[False])
    assert share >= 0.3 - 1e-9
    if min(anomalous, normal) / (anomalous + normal) < 0.3:
        assert share == pytest.approx(0.3)
    assert {id(item.example.window) for item in distinct} == {id(item.window) for item in train}


def test_repeated_windows_are_one_example_with_their_count() -> None:
    """Windows with the same masked sequence and label collapse; the same sequence with the other label stays."""
    train = windows(2, 3) + windows(2, 3)[:3] + windows(2, 3)[2:3]  # m0 m1 (anomalous) x2, m2 x3 ...
    distinct = training_set(train, beta=0.3, max_messages=128)
    counts = {(item.templates, item.label): item.count for item in distinct}
    assert counts[(("m0",), True)] == 2 and counts[(("m2",), False)] == 3 and counts[(("m3",), False)] == 1
    assert sum(item.count for item in distinct) == len(train)
    assert [item.templates for item in distinct] == [("m0",), ("m1",), ("m2",), ("m3",), ("m4",)]  # first seen


def test_count_power_tempers_how_much_a_frequent_window_outweighs_a_rare_one() -> None:
    """count ** P per distinct window, the class weights on the tempered totals (minority still at beta)."""
    train = windows(2, 3) + windows(2, 3)[2:3] * 15  # anomalous m0, m1 once; normal m2 x16, m3 x1, m4 x1
    for power, ratio, share in ((1.0, 16.0, 0.3), (0.5, 4.0, 0.3), (0.0, 1.0, 0.4)):  # 2 of 5 alike: not raised
        distinct = {item.templates: item for item in training_set(train, 0.3, 128, count_power=power)}
        assert distinct[("m2",)].weight / distinct[("m3",)].weight == pytest.approx(ratio)
        total = sum(item.weight for item in distinct.values())
        assert sum(item.weight for item in distinct.values() if item.label) / total == pytest.approx(share)
    with pytest.raises(ValueError, match="count_power"):
        training_set(train, 0.3, 128, count_power=1.5)


def test_a_train_split_with_one_class_is_refused_with_a_reason() -> None:
    with pytest.raises(FitError, match="no anomalous window"):
        training_set(windows(0, 20), beta=0.3, max_messages=128)
    with pytest.raises(FitError, match="no normal window"):
        training_set(windows(5, 0), beta=0.3, max_messages=128)


def test_each_epoch_visits_every_sample_once_in_an_order_fixed_by_seed_stage_and_epoch() -> None:
    stream_size = 37
    plan = Plan.make("3", config(micro_batch=3, grad_accum=2), stream_size)
    assert (plan.micro_per_epoch, plan.steps_per_epoch, plan.total_steps) == (13, 7, 14)
    for epoch in range(plan.epochs):
        seen = [i for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
                for batch in plan.micro_batches(step, stream_size, 7, 3, 2) for i in batch]
        assert sorted(seen) == list(range(stream_size))
        assert seen == epoch_order(stream_size, 7, "3", epoch)  # a resumed run recomputes the same order
    assert epoch_order(stream_size, 7, "3", 0) != epoch_order(stream_size, 7, "3", 1)
    assert epoch_order(stream_size, 7, "3", 0) != epoch_order(stream_size, 7, "2-1", 0)
    assert [len(b) for b in plan.micro_batches(6, stream_size, 7, 3, 2)] == [1]  # the epoch's short tail


def test_freeze_encoder_keeps_bert_frozen_in_every_stage_and_nothing_else_changes() -> None:
    paper, frozen = config(), config(freeze_encoder=True)
    assert paper.trains("3") == {"projector": True, "embedder_lora": True, "llm_lora": True}
    assert frozen.trains("3") == {"projector": True, "embedder_lora": False, "llm_lora": True}
    for stage in STAGES:
        assert not frozen.trains(stage)["embedder_lora"]
        assert {k: v for k, v in frozen.trains(stage).items() if k != "embedder_lora"} == \
            {k: v for k, v in paper.trains(stage).items() if k != "embedder_lora"}


def test_stage_one_takes_at_most_its_sample_budget_per_epoch() -> None:
    plan = Plan.make("1", config(stage1_samples=1000, epochs={"1": 1, "2-1": 1, "2-2": 1, "3": 5}), 5000)
    assert (plan.samples, plan.epochs, plan.micro_per_epoch, plan.total_steps) == (1000, 1, 250, 63)
    assert Plan.make("1", config(epochs={"1": 3}), 5000).epochs == 3
    small = Plan.make("1", config(), 90)
    assert small.samples == 90  # never more than one pass over the stream (as the reference code)


def test_the_learning_rate_decays_at_most_ten_times_per_stage_by_default() -> None:
    plan = Plan.make("2-1", config(), 1000)  # 250 micro-batches, 63 optimizer steps
    assert plan.total_steps == 63 and plan.decay_every == 7
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=plan.decay_every, gamma=0.7)
    for _ in range(plan.total_steps):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(5e-4 * 0.7**9)  # 63 // 7 decays, never more than ten
    assert Plan.make("2-1", config(lr_decay_every=5), 1000).decay_every == 5
    assert Plan.make("2-1", config(), 8).decay_every == 1  # two steps: decays after each
    assert Plan.make("1", config(grad_accum=1), 70).decay_every == 2  # 18 steps: 9 decays, not 18


def test_probe_windows_are_distinct_fixed_and_hold_both_classes() -> None:
    train = training_set(windows(6, 60), 0.3, 128)
    probe = probe_set(train, 16, beta=0.3, seed=3)
    assert len(probe) == 16 and len({id(w) for w in probe}) == 16
    assert sum(w.label for w in probe) == math.floor(16 * 0.3 + 0.5)
    assert [w.templates for w in probe] == [w.templates for w in probe_set(train, 16, 0.3, 3)]
    assert probe_set(train, 0, 0.3, 3) == []
    assert len(probe_set(training_set(windows(1, 2), 0.3, 128), 16, 0.3, 3)) == 3


def test_length_pools_put_similar_windows_together_and_still_visit_each_once() -> None:
    lengths = [(i * 37) % 100 + 1 for i in range(200)]
    order = epoch_order(200, 7, "3", 0, lengths, micro_batch=4)
    assert sorted(order) == list(range(200))
    assert order == epoch_order(200, 7, "3", 0, lengths, micro_batch=4)  # resumable
    batches = [order[i : i + 4] for i in range(0, 200, 4)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    shuffled = epoch_order(200, 7, "3", 0)
    plain = sum(max(lengths[i] for i in shuffled[j : j + 4]) - min(lengths[i] for i in shuffled[j : j + 4])
                for j in range(0, 200, 4)) / 50
    assert spread < plain / 4  # padding within a micro-batch is a fraction of a random batch's


def fit_args(tmp_path, output: str, *extra: str):
    """`logstream-train fit` flags for BGL with a log that does not exist (nothing reaches the data)."""
    from trainer.cli import build_parser

    return build_parser().parse_args(["fit", "--dataset", "bgl", "--logs", str(tmp_path / "none.log"),
                                      "--output", str(tmp_path / output), *extra])


def test_freeze_encoder_leaves_stage_2_2_out_and_refuses_it_when_named(tmp_path) -> None:
    from logstream.settings import Settings
    from trainer.fit_logllm import fit

    def args(output: str, *extra: str):
        return fit_args(tmp_path, output, "--freeze-encoder", *extra)

    with pytest.raises(FitError, match="stage 2-2"):
        fit(args("named", "--stages", "1,2,3"), Settings())
    assert not (tmp_path / "named").exists()  # refused before anything is written
    with pytest.raises(FileNotFoundError, match="none.log"):  # the default stages pass: it goes on to the data
        fit(args("default"), Settings())


def test_focal_gamma_reaches_the_run_config_and_a_negative_one_is_refused(tmp_path) -> None:
    from logstream.settings import Settings
    from trainer.fit_logllm import config_from

    def args(*extra: str):
        return fit_args(tmp_path, "out", *extra)

    assert config_from(args(), Settings()).focal_gamma == 0.0  # the paper's cross-entropy by default
    assert config_from(args("--focal-gamma", "2"), Settings()).focal_gamma == 2.0
    with pytest.raises(FitError, match="--focal-gamma"):
        config_from(args("--focal-gamma", "-1"), Settings())
