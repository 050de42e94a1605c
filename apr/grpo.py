"""GRPO over parent and child threads: the RL maths as small pure functions.

Every generated token of every thread of a rollout (parent segments and children; never the
prompts or the runtime's join text) carries that rollout's advantage: the reward (1 when the
verifier accepts the final answer, else 0) normalised within the group of rollouts of the same
problem. The loss is PPO's clipped ratio against the policy that sampled, plus a KL penalty to
a frozen reference, averaged over tokens. The trainer loop and the SGLang sidecar are not
written yet (the issue is open); these functions are what it will call.
"""

from __future__ import annotations

from dataclasses import dataclass

from apr.config import check_range


@dataclass
class GRPOConfig:
    """Defaults are the paper's public recipe (its tinyrl configs)."""

    group_size: int = 5  # rollouts per problem
    prompts_per_step: int = 64
    steps: int = 150
    lr: float = 1e-5
    clip: float = 0.2  # PPO ratio clip
    kl_beta: float = 0.001  # weight of the KL to the frozen reference
    inner_steps: int = 2  # optimizer passes over each batch of rollouts
    temperature: float = 1.0
    grad_clip: float = 1.0

    def validate(self) -> None:
        check_range("group_size", self.group_size, 2)
        check_range("prompts_per_step", self.prompts_per_step, 1)
        check_range("steps", self.steps, 1)
        check_range("lr", self.lr, 0.0)
        check_range("clip", self.clip, 0.0, 1.0)
        check_range("kl_beta", self.kl_beta, 0.0)
        check_range("inner_steps", self.inner_steps, 1)
        check_range("temperature", self.temperature, 0.0)


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


def clipped_policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2):
    """PPO's clipped surrogate, averaged over the masked tokens.

    logp, old_logp, mask: (B, T) per-token log-probs of the sampled tokens under the current
    policy and the one that sampled, and 1 on generated tokens. advantages: (B,) one per row
    (a row is one thread; every thread of a rollout gets the rollout's advantage).
    Returns (loss, fraction of tokens whose ratio was clipped).
    """
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv
    per_token = -unclipped.minimum(clipped)
    tokens = mask.sum().clamp(min=1)
    was_clipped = ((ratio - 1).abs() > clip).float()
    return (per_token * mask).sum() / tokens, (was_clipped * mask).sum() / tokens


def kl_to_reference(logp, ref_logp, mask):
    """Per-token KL(policy || reference), the k3 estimator exp(d) - d - 1 with d = ref - logp:
    non-negative, zero when the two agree; averaged over the masked tokens."""
    d = ref_logp - logp
    return (((d.exp() - d - 1) * mask).sum()) / mask.sum().clamp(min=1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, config: GRPOConfig):
    """The step's loss: clipped policy loss plus kl_beta times the KL to the reference."""
    policy, clipped = clipped_policy_loss(logp, old_logp, advantages, mask, config.clip)
    kl = kl_to_reference(logp, ref_logp, mask)
    return policy + config.kl_beta * kl, {"policy_loss": float(policy), "kl": float(kl),
                                          "clipped_fraction": float(clipped)}
