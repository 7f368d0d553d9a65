"""Stage 2 of LogLLaMA: reinforcement tuning with the top-K reward (REINFORCE or PPO), KL-tied to stage 1.

Each scored position of a normal window is a one-step decision (a contextual bandit): the state is
the keys so far, the action is a set of K candidate next keys, the reward is +1 when the true next
key is in the set and -1 otherwise. At test time the action is the model's top K and a miss flags
the window, so this reward is exactly the detector's decision on normal data: it teaches the model
to keep every *normal* continuation inside its top K (fewer false alarms at that K), and it does
not care how probability is spread inside the top K — unlike stage 1's cross-entropy, which keeps
sharpening keys that are already ranked first.

Policy gradient needs a stochastic action, so training samples the set: K keys without replacement
(Gumbel top-K, i.e. Plackett-Luce sampling) from the policy, with its exact log-probability. The
baseline is self-critical: the reward the model's *greedy* top K gets at that position, so the
advantage is +2 when sampling found a set that covers a key the top K misses, -2 when the sample
dropped a key the top K had, and 0 otherwise (most positions: signal concentrates on the hard ones).

Two regularisers: an entropy bonus (keeps the policy from collapsing onto single keys, which would
make sampled sets identical to the greedy one and the gradient vanish), and a KL penalty to the
frozen stage-1 model, KL(policy || stage 1) computed exactly over the key vocabulary, which keeps
the sequence model it learned (RL on normal data alone could otherwise flatten everything into the
top K and stop flagging anything).

PPO (`ppo_loss`) reuses one sampled batch for several updates with the clipped ratio of set
probabilities; REINFORCE (`reinforce_loss`) takes one update per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from logstream.logllama import ranks_of_targets


def topk_reward(candidates: Tensor, targets: Tensor) -> Tensor:
    """+1 where the target is among the row's candidate keys, -1 otherwise. [N, K], [N] -> [N]."""
    hit = (candidates == targets.unsqueeze(-1)).any(-1)
    return hit.float() * 2.0 - 1.0


def greedy_reward(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """The top-K reward of the model's own top K, by the detector's rank rule (rank <= K). [N, V], [N] -> [N]."""
    return (ranks_of_targets(logits, targets) <= k).float() * 2.0 - 1.0


def sample_sets(logits: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """K distinct keys per row drawn without replacement from softmax(logits) (Gumbel top-K), in draw order.

    Keys with logit -inf (reserved ids) are never drawn while at least K keys are finite.
    """
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(uniform))
    return (logits.detach() + gumbel).topk(k, dim=-1).indices


def set_log_prob(logits: Tensor, candidates: Tensor) -> Tensor:
    """Plackett-Luce log-probability of drawing `candidates` in that order without replacement. -> [N]

    log P = sum_j [ logit(a_j) - logsumexp(logits without a_1..a_{j-1}) ]; differentiable in `logits`.
    """
    taken = torch.zeros_like(logits, dtype=torch.bool)
    total = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    for j in range(candidates.shape[-1]):
        pick = candidates[:, j : j + 1]
        total = total + logits.gather(-1, pick).squeeze(-1) - logits.masked_fill(taken, float("-inf")).logsumexp(-1)
        taken = taken.scatter(-1, pick, True)
    return total


def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) per row; -inf logits contribute nothing. -> [N]"""
    logp = logits.log_softmax(-1)
    finite = torch.isfinite(logp)
    return -(logp.exp() * logp.where(finite, torch.zeros_like(logp))).sum(-1)


def kl_divergence(logits: Tensor, reference: Tensor) -> Tensor:
    """KL(softmax(logits) || softmax(reference)) per row, exactly over the vocabulary. -> [N]"""
    logp, logq = logits.log_softmax(-1), reference.log_softmax(-1)
    finite = torch.isfinite(logp) & torch.isfinite(logq)
    diff = (logp - logq).where(finite, torch.zeros_like(logp))
    return (logp.exp() * diff).sum(-1)


@dataclass(frozen=True, slots=True)
class RLTerms:
    """What one update optimises and what it logs."""

    loss: Tensor
    policy: float  # the policy-gradient term (before regularisers)
    entropy: float
    kl: float


def reinforce_loss(log_prob: Tensor, advantage: Tensor, ent: Tensor, kl: Tensor, *, entropy_coef: float,
                   kl_coef: float) -> RLTerms:
    """-E[A log pi(set)] - c_H H + c_KL KL (means over positions)."""
    policy = -(advantage.detach() * log_prob).mean()
    loss = policy - entropy_coef * ent.mean() + kl_coef * kl.mean()
    return RLTerms(loss, policy.item(), ent.mean().item(), kl.mean().item())


def ppo_loss(log_prob: Tensor, old_log_prob: Tensor, advantage: Tensor, ent: Tensor, kl: Tensor, *, clip: float,
             entropy_coef: float, kl_coef: float) -> RLTerms:
    """PPO's clipped surrogate on the set probabilities: -E[min(r A, clip(r, 1-e, 1+e) A)] - c_H H + c_KL KL."""
    ratio = (log_prob - old_log_prob.detach()).exp()
    advantage = advantage.detach()
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1.0 - clip, 1.0 + clip) * advantage)
    policy = -surrogate.mean()
    loss = policy - entropy_coef * ent.mean() + kl_coef * kl.mean()
    return RLTerms(loss, policy.item(), ent.mean().item(), kl.mean().item())
