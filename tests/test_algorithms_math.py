"""The RL math against hand computation (GAE, whitening, clipped losses, KL, baselines)."""

import math

import pytest
import torch

from mtrl.algorithms.ppo import AdaptiveKLController, gae, kl_penalty, masked_whiten, policy_loss, value_loss
from mtrl.algorithms.reinforce import ReinforceConfig, leave_one_out_baseline, returns_to_go
from mtrl.algorithms.reinforce import advantages as pg_advantages


def test_gae_gamma_one_lambda_half_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 0.2], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: d2 = 2 - .2 = 1.8; d1 = 0 + .2 - 1 = -.8 -> -.8 + .5*1.8 = .1; d0 = 1 + 1 - .5 = 1.5 -> 1.55
    # row 1 (last position is padding: its reward and value are ignored): d1 = 3 - 2 = 1; d0 = 0 + 2 - 1 + .5*1
    assert torch.allclose(adv, torch.tensor([[1.55, 0.1, 1.8], [1.5, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[2.05, 1.1, 2.0], [2.5, 3.0, 0.0]]))


def test_gae_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[1.0, -2.0, 4.0]])
    values = torch.tensor([[0.3, 0.1, -0.4]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[3.0, 2.0, 4.0]]))
    assert torch.allclose(adv, ret - values)


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = masked_whiten(x, mask)
    std = math.sqrt(5 / 3)  # unbiased variance of 1, 2, 3, 4
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    assert torch.allclose(out, expected, atol=1e-5)


def test_clipped_policy_loss_by_hand():
    logp, old = torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    loss, clipfrac = policy_loss(logp, old, torch.tensor([[1.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(-1.2) and clipfrac.item() == 1.0  # gain capped at 1 + eps
    loss, clipfrac = policy_loss(logp, old, torch.tensor([[-1.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(1.5) and clipfrac.item() == 0.0  # a loss is never clipped away


def test_policy_loss_masks_padding():
    logp = torch.tensor([[0.0, 5.0]])
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[2.0, 100.0]]), torch.tensor([[1, 0]]), 0.2)
    assert loss.item() == pytest.approx(-2.0)


def test_clipped_value_loss_by_hand():
    v = value_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1), 0.5)
    assert v.item() == pytest.approx(0.5 * 1.5**2)  # the clipped prediction (0.5) is the worse one


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k9")


def test_k3_is_unbiased_for_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    samples = torch.multinomial(p, 200_000, replacement=True)
    est = kl_penalty(p.log()[samples], q.log()[samples], "k3").mean().item()
    exact = (p * (p / q).log()).sum().item()
    assert est == pytest.approx(exact, rel=0.03)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(kl=2.0, n_samples=10)  # error clipped at +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    fixed = AdaptiveKLController(0.1, target=None, horizon=100)
    fixed.update(kl=5.0, n_samples=10)
    assert fixed.value == 0.1


def test_reinforce_batch_baseline_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    g = returns_to_go(rewards, mask.float())
    assert torch.allclose(g, torch.tensor([[3.0, 2.0, 2.0], [1.0, 1.0, 0.0]]))
    cfg = ReinforceConfig(name="reinforce", whiten_advantages=False)
    adv = pg_advantages(rewards, mask, torch.tensor([0, 1]), cfg)
    assert torch.allclose(adv, torch.tensor([[1.0, 0.5, 0.0], [-1.0, -0.5, 0.0]]))


def test_rloo_leave_one_out_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    group = torch.tensor([0, 0, 1])
    g = returns_to_go(rewards, mask.float())
    base = leave_one_out_baseline(g, mask, group)
    # row 0's baseline is row 1's returns (position 2: row 1 has no token -> 0); row 2 is alone -> 0
    assert torch.allclose(base, torch.tensor([[1.0, 1.0, 0.0], [3.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))
    cfg = ReinforceConfig(name="rloo", samples_per_prompt=2, whiten_advantages=False)
    adv = pg_advantages(rewards, mask, group, cfg)
    assert torch.allclose(adv, torch.tensor([[2.0, 1.0, 2.0], [-2.0, -1.0, 0.0], [5.0, 0.0, 0.0]]))


def test_shared_helpers_are_one_copy():
    """PPO re-exports the helpers it shares with REINFORCE from ``common``: one definition, not two."""
    from mtrl.algorithms import common, ppo, reinforce

    for name in ("AdaptiveKLController", "kl_penalty", "masked_whiten"):
        assert getattr(ppo, name) is getattr(common, name)
    assert reinforce.masked_mean is common.masked_mean is ppo.masked_mean
    assert issubclass(ppo.PPOConfig, common.OnPolicyConfig) and issubclass(ReinforceConfig, common.OnPolicyConfig)
    assert not hasattr(ReinforceConfig(), "value_lr")  # a PPO-only key
