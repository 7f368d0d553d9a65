"""Stage 2 of LogLLaMA: the top-K reward, set sampling and probabilities, and the REINFORCE / PPO objectives."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trainer import rl

NEG = float("-inf")


def test_topk_reward_is_plus_one_inside_the_set_and_minus_one_outside() -> None:
    candidates = torch.tensor([[4, 7, 5], [4, 7, 5], [9, 8, 6]])
    targets = torch.tensor([5, 6, 6])
    assert rl.topk_reward(candidates, targets).tolist() == [1.0, -1.0, 1.0]


def test_greedy_reward_follows_the_detectors_rank_rule() -> None:
    logits = torch.tensor([[NEG, NEG, NEG, 0.0, 3.0, 2.0, 1.0],
                           [NEG, NEG, NEG, 0.0, 3.0, 2.0, 1.0],
                           [NEG, NEG, NEG, 0.0, 3.0, 2.0, 1.0]])
    targets = torch.tensor([5, 6, 2])  # rank 2, rank 3, an unknown template (never a hit)
    assert rl.greedy_reward(logits, targets, k=2).tolist() == [1.0, -1.0, -1.0]
    assert rl.greedy_reward(logits, targets, k=3).tolist() == [1.0, 1.0, -1.0]


def test_set_log_prob_is_the_exact_probability_of_drawing_that_ordered_set() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 5)
    logits[0, 0] = NEG  # a reserved id: never drawn
    sets = [s for s in itertools.permutations(range(1, 5), 2)]
    probs = rl.set_log_prob(logits.expand(len(sets), -1), torch.tensor(sets)).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)  # a distribution over ordered 2-sets
    p = logits.softmax(-1)[0]
    first, second = sets[0]
    assert probs[0].item() == pytest.approx((p[first] * p[second] / (1 - p[first])).item(), rel=1e-5)


def test_sampled_sets_are_distinct_and_never_reserved_and_follow_the_policy() -> None:
    logits = torch.tensor([[NEG, NEG, NEG, 4.0, 0.0, 0.0, 0.0]]).repeat(4000, 1)
    sets = rl.sample_sets(logits, 2, torch.Generator().manual_seed(1))
    assert sets.shape == (4000, 2) and bool((sets >= 3).all()) and bool((sets[:, 0] != sets[:, 1]).all())
    share_first = (sets[:, 0] == 3).float().mean().item()
    expected = math.exp(4) / (math.exp(4) + 3)
    assert share_first == pytest.approx(expected, abs=0.03)


def test_entropy_and_kl_ignore_masked_ids() -> None:
    uniform = torch.tensor([[NEG, 0.0, 0.0, 0.0, 0.0]])
    assert rl.entropy(uniform).item() == pytest.approx(math.log(4))
    assert rl.kl_divergence(uniform, uniform).item() == pytest.approx(0.0, abs=1e-7)
    peaked = torch.tensor([[NEG, 5.0, 0.0, 0.0, 0.0]])
    assert rl.kl_divergence(peaked, uniform).item() > 0 and not math.isnan(rl.entropy(peaked).item())


def _one_step(loss_of: object, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    terms = loss_of(logits)  # type: ignore[operator]
    terms.loss.backward()
    with torch.no_grad():
        return logits - 0.5 * logits.grad


def test_reinforce_raises_a_rewarded_set_and_lowers_a_penalised_one() -> None:
    logits = torch.tensor([[NEG, NEG, NEG, 1.0, 1.0, 1.0, 1.0]]).repeat(2, 1)
    sets = torch.tensor([[4, 5], [4, 5]])
    advantage = torch.tensor([2.0, -2.0])
    reference = logits.detach()

    def loss(x: torch.Tensor) -> rl.RLTerms:
        return rl.reinforce_loss(rl.set_log_prob(x, sets), advantage, rl.entropy(x), rl.kl_divergence(x, reference),
                                 entropy_coef=0.0, kl_coef=0.0)

    updated = _one_step(loss, logits)
    before, after = rl.set_log_prob(logits, sets), rl.set_log_prob(updated, sets)
    assert after[0] > before[0] and after[1] < before[1]


def test_ppo_clips_the_ratio_so_a_policy_far_past_the_clip_gets_no_push() -> None:
    logits = torch.tensor([[NEG, NEG, NEG, 3.0, 0.0, 0.0]])
    sets = torch.tensor([[3]])
    old = rl.set_log_prob(torch.tensor([[NEG, NEG, NEG, 0.0, 0.0, 0.0]]), sets)  # the set was much less likely
    x = logits.clone().requires_grad_(True)
    terms = rl.ppo_loss(rl.set_log_prob(x, sets), old, torch.tensor([1.0]), rl.entropy(x),
                        rl.kl_divergence(x, x.detach()), clip=0.2, entropy_coef=0.0, kl_coef=0.0)
    terms.loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) == 0.0  # ratio > 1.2 with A > 0: clipped
    y = torch.tensor([[NEG, NEG, NEG, 0.0, 0.0, 0.0]], requires_grad=True)
    rl.ppo_loss(rl.set_log_prob(y, sets), old, torch.tensor([1.0]), rl.entropy(y), rl.kl_divergence(y, y.detach()),
                clip=0.2, entropy_coef=0.0, kl_coef=0.0).loss.backward()
    assert y.grad is not None and float(y.grad[0, 3]) < 0  # inside the clip: gradient descent raises the set


def test_kl_penalty_pulls_back_toward_the_reference() -> None:
    reference = torch.tensor([[NEG, 0.0, 0.0, 0.0]])
    drifted = torch.tensor([[NEG, 2.0, 0.0, 0.0]])

    def loss(x: torch.Tensor) -> rl.RLTerms:
        zero = torch.zeros(1)
        return rl.reinforce_loss(zero, zero, rl.entropy(x), rl.kl_divergence(x, reference), entropy_coef=0.0,
                                 kl_coef=1.0)

    updated = _one_step(loss, drifted)
    assert rl.kl_divergence(updated, reference).item() < rl.kl_divergence(drifted, reference).item()
