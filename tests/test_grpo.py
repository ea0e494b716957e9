"""GRPO: group-normalised sequence advantages (with and without the std, Dr. GRPO), span advantages normalised
over the batch (TranslateGemma), the KL as a loss term or in the reward, and a run on both kinds of policy."""

from __future__ import annotations

import pytest
import torch

from mtrl.algorithms.grpo import GRPOConfig, advantages, group_advantages
from mtrl.recipe import recipe_from_dict
from mtrl.runner import run as train
from tests.fixtures.runs import read_metrics, tiny_recipe


def test_group_advantages_by_hand():
    returns = torch.tensor([1.0, 3.0, 10.0, 10.0, 4.0, 0.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    centred = group_advantages(returns, group, scale=False)
    assert centred.tolist() == [-1.0, 1.0, 0.0, 0.0, 2.0, -2.0]
    scaled = group_advantages(returns, group, scale=True)
    # each group's sample std: sqrt(2) for group 0, 0 for group 1, sqrt(8) for group 2
    assert scaled.tolist() == pytest.approx([-1 / 2**0.5, 1 / 2**0.5, 0.0, 0.0, 2 / 8**0.5, -2 / 8**0.5], rel=1e-3)


def test_sequence_advantage_is_on_every_token_and_masked():
    rewards = torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])  # sums 2 and 1, one group
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = advantages(rewards, None, mask, torch.tensor([0, 0]), GRPOConfig(scale_rewards=False))
    assert adv.tolist() == [[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0]]


def test_span_advantages_mark_the_error_tokens_and_are_batch_normalised():
    rewards = torch.tensor([[0.0, 0.0, -5.0], [0.0, 0.0, -5.0]])  # the same sequence reward: no group signal
    spans = torch.tensor([[0.0, -5.0, 0.0], [0.0, 0.0, 0.0]])  # one error token in the first sample
    mask = torch.ones(2, 3)
    group = torch.tensor([0, 0])
    plain = advantages(rewards, spans, mask, group, GRPOConfig())
    assert torch.count_nonzero(plain) == 0  # without span advantages GRPO has nothing to learn here
    adv = advantages(rewards, spans, mask, group, GRPOConfig(span_advantages=True))
    assert adv[0, 1] == adv.min() and adv[0, 1] < 0  # the error token, and only it, is pushed down
    others = adv[mask.bool()].tolist()
    others.remove(float(adv[0, 1]))
    assert max(others) - min(others) < 1e-6
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(adv.std()) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_the_kl_term_is_in_the_loss_or_in_the_reward(kl_in, tiny_seq2seq):
    from tests.test_learning_direction import SOURCES, build

    torch.manual_seed(0)
    # k1 in the reward: the penalty is then exactly kl_coef x the logged (k1) KL
    policy, algo = build("grpo", tiny_seq2seq, lr=1e-3, samples_per_prompt=2, kl_in=kl_in, kl_coef=0.5,
                         kl_estimator="k3" if kl_in == "loss" else "k1")
    with torch.no_grad():  # the policy moves away from its frozen reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stats = algo.step(SOURCES[:2], None)
    assert stats["kl"] != 0.0
    if kl_in == "loss":  # the k3 estimate, >= 0, and > 0 once the policy differs from the reference
        assert stats["kl_loss"] > 0.0 and stats["total_reward_mean"] == stats["reward_mean"]
    else:  # the penalty is in the sequence reward and out of the loss
        assert stats["kl_loss"] == 0.0
        assert stats["total_reward_mean"] == pytest.approx(stats["reward_mean"] - 0.5 * stats["kl"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("kind,span,kl_in", [("seq2seq", True, "loss"), ("causal", False, "reward")])
def test_grpo_trains_both_kinds_of_policy(kind, span, kl_in, tiny_seq2seq, tiny_causal, small_data, tmp_path):
    run = tmp_path / "run"
    model = tiny_seq2seq if kind == "seq2seq" else tiny_causal
    recipe = tiny_recipe(model, small_data, run, reward={"mode": "sentence"},
                         algorithm={"name": "grpo", "samples_per_prompt": 2, "batch_size": 2,
                                    "span_advantages": span, "kl_in": kl_in, "scale_rewards": not span})
    results = train(recipe_from_dict(recipe), quiet=True)
    assert {"before", "after"} <= set(results)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert {"groups_without_signal", "advantage_std", "kl_loss", "guard_length", "length_ratio_mean"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in rows)
    assert all((r["kl_loss"] >= 0.0) if kl_in == "loss" else (r["kl_loss"] == 0.0) for r in rows)  # k3 >= 0
    assert (run / "final" / "config.json").exists()


def test_grpo_needs_a_group_and_spans(tiny_seq2seq, small_data, tmp_path):
    from mtrl.errors import MtrlError

    recipe = tiny_recipe(tiny_seq2seq, small_data, tmp_path / "r", algorithm={"name": "grpo", "samples_per_prompt": 1})
    with pytest.raises(MtrlError, match="algorithm.samples_per_prompt: must be >= 2, got 1"):
        recipe_from_dict(recipe)
    recipe = tiny_recipe(tiny_seq2seq, small_data, tmp_path / "r", reward={"mode": "r3hf", "scorer": "chrf"},
                         algorithm={"name": "grpo", "span_advantages": True})
    with pytest.raises(MtrlError, match="span_advantages needs the detector's spans"):
        recipe_from_dict(recipe)


def test_the_kl_loss_ignores_padding_whatever_its_log_probs():
    from mtrl.algorithms.common import kl_penalty, masked_mean

    logprobs, ref = torch.tensor([[-1.0, -95.0]]), torch.tensor([[-1.2, 0.0]])  # the second position is padding
    m = torch.tensor([[1.0, 0.0]])
    assert not torch.isfinite(masked_mean(kl_penalty(logprobs, ref, "k3"), m))  # what masking after k3 gives
    assert torch.isfinite(masked_mean(kl_penalty(logprobs * m, ref, "k3"), m))  # what grpo.py does
