"""GRPO maths on hand-made numbers: advantages, the clipped loss's gradient, the KL."""

from __future__ import annotations

import pytest
import torch

from apr.config import ConfigError, load
from apr.rl.losses import (
    clipped_policy_loss,
    group_advantages,
    grpo_loss,
    kl_to_reference,
)
from apr.stages.grpo import GRPOConfig


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    adv = group_advantages(rewards, groups)
    # group 0: mean 0.25, std sqrt(0.1875) = 0.4330
    assert adv[0].item() == pytest.approx(0.75 / 0.4330127, rel=1e-4)
    assert adv[1].item() == pytest.approx(-0.25 / 0.4330127, rel=1e-4)
    assert adv[:4].sum().item() == pytest.approx(0.0, abs=1e-5)
    # groups where every rollout got the same reward carry no signal
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_clipped_loss_pushes_good_tokens_up_and_bad_tokens_down():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, torch.ones(2, 2))
    loss.backward()
    assert clipped.item() == 0.0
    assert (logp.grad[0] < 0).all()  # descending the loss raises log-probs of the good rollout
    assert (logp.grad[1] > 0).all()  # and lowers those of the bad one


def test_ratios_beyond_the_clip_get_no_gradient_in_the_clipped_direction():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5]])).requires_grad_(True)  # ratios 1.5, 1.1, 0.5
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), 0.2)
    loss.backward()
    assert clipped.item() == pytest.approx(2 / 3)
    assert logp.grad[0, 0].item() == 0.0  # already 1.5 > 1.2 with a positive advantage: clipped
    assert logp.grad[0, 1].item() < 0  # inside the clip: still pushed up
    assert logp.grad[0, 2].item() < 0  # 0.5 < 0.8 but min() keeps the unclipped, larger loss


def test_masked_tokens_count_for_nothing():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.1, 0.2, 5.0, -5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask)
    loss.backward()
    assert logp.grad[0, 2:].tolist() == [0.0, 0.0]


def test_row_weights_replace_the_token_mean():
    logp = torch.tensor([[-0.1, -0.2, -0.3], [-1.0, -2.0, 0.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    mean, _ = clipped_policy_loss(logp, old, adv, mask)
    uniform, _ = clipped_policy_loss(logp, old, adv, mask, weights=torch.full((2,), 1 / 5))
    assert uniform.item() == pytest.approx(mean.item(), rel=1e-6)
    # each row's tokens share half of the loss: the short row weighs more per token
    halves, _ = clipped_policy_loss(logp, old, adv, mask, weights=torch.tensor([1 / 6, 1 / 4]))
    ratio = logp.exp()
    expected = -(ratio[0].clamp(0.8, 1.2).minimum(ratio[0]).sum() / 6) \
        + (ratio[1, :2].clamp(0.8, 1.2).maximum(ratio[1, :2]).sum() / 4)
    assert halves.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_is_zero_for_identical_policies_and_positive_otherwise():
    logp = torch.log(torch.tensor([[0.2, 0.7, 0.1]]))
    mask = torch.ones(1, 3)
    assert kl_to_reference(logp, logp, mask).item() == 0.0
    assert kl_to_reference(logp, logp - 0.3, mask).item() > 0.0


def test_grpo_loss_adds_the_weighted_kl():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[-0.1, -0.2]])
    ref = torch.tensor([[-0.5, -0.5]])
    total, parts = grpo_loss(logp, old, ref, torch.tensor([1.0]), torch.ones(1, 2), clip=0.2,
                             kl_beta=0.5)
    assert total.item() == pytest.approx(parts["policy_loss"] + 0.5 * parts["kl"], rel=1e-6)


def test_defaults_are_the_paper_recipe_and_bad_values_name_the_key():
    c = GRPOConfig()
    assert (c.group_size, c.prompts_per_step, c.steps, c.lr, c.clip, c.kl_beta, c.inner_steps,
            c.temperature) == (5, 64, 150, 1e-5, 0.2, 0.001, 2, 1.0)
    with pytest.raises(ConfigError, match="grpo.group_size"):
        load(GRPOConfig, None, "grpo", ["group_size=1"])
