"""GRPO's maths as small pure functions over tensors (shapes in each docstring).

Group-normalised advantages, PPO's clipped surrogate, the k3 KL to the frozen reference, and
the per-token log-probs they are computed from; unit-tested on the CPU.
"""

from __future__ import annotations


def group_advantages(rewards, groups, eps: float = 1e-6):
    """Rewards normalised within their group: (r - mean) / (std + eps).

    rewards: (N,) float; groups: (N,) int, the problem each rollout belongs to. A group whose
    rollouts all got the same reward carries no signal: its advantages are 0.
    """
    import torch

    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    for g in torch.unique(groups):
        members = groups == g
        r = rewards[members]
        std = r.std(unbiased=False)
        advantages[members] = (r - r.mean()) / (std + eps) if std > 0 else 0.0
    return advantages


def clipped_policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2, weights=None):
    """PPO's clipped surrogate over the masked tokens.

    logp, old_logp, mask: (B, T) per-token log-probs of the sampled tokens under the current
    policy and the one that sampled, and 1 on generated tokens. advantages: (B,) one per row
    (a row is one thread; every thread of a rollout gets the rollout's advantage). weights:
    (B,) each row's weight per token (`Rows.token_weights`); by default the loss is the mean
    over the masked tokens. Returns (loss, the share of that weight on tokens whose ratio was
    clipped: the fraction of clipped tokens when every token weighs the same).
    """
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv
    per_token = -unclipped.minimum(clipped)
    w = _weights(mask, weights)
    was_clipped = ((ratio - 1).abs() > clip).float()
    return (per_token * w).sum(), (was_clipped * w).sum()


def kl_to_reference(logp, ref_logp, mask, weights=None):
    """Per-token KL(policy || reference), the k3 estimator exp(d) - d - 1 with d = ref - logp:
    non-negative, zero when the two agree; weighted over the masked tokens as the policy loss."""
    d = ref_logp - logp
    return ((d.exp() - d - 1) * _weights(mask, weights)).sum()


def _weights(mask, weights):
    """Per-token loss weights: the mean over the masked tokens, or per-row weights."""
    return mask / mask.sum().clamp(min=1) if weights is None else mask * weights[:, None]


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip: float, kl_beta: float,
              weights=None):
    """The step's loss: clipped policy loss plus kl_beta times the KL to the reference."""
    policy, clipped = clipped_policy_loss(logp, old_logp, advantages, mask, clip, weights)
    kl = kl_to_reference(logp, ref_logp, mask, weights)
    return policy + kl_beta * kl, {"policy_loss": policy.item(), "kl": kl.item(),
                                   "clipped_fraction": clipped.item()}


def token_logprobs(model, ids, temperature: float):
    """Log-probs of ids[:, 1:] under `model` with logits / temperature (SGLang's convention
    for the log-probs it reports), (B, L-1) in float32."""
    from apr.model import sampled_logprobs

    return sampled_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:], temperature)
