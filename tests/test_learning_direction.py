"""The updates move the policy the right way: up on tokens with positive advantage, down on negative ones."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from mtrl.algorithms.grpo import GRPO, GRPOConfig
from mtrl.algorithms.ppo import PPO, PPOConfig
from mtrl.algorithms.reinforce import Reinforce, ReinforceConfig
from mtrl.detectors import Detection
from mtrl.policy import GenerationConfig, PolicyConfig, build_policy
from mtrl.rewards import RewardConfig, Rewarder, RewardOutput, hypothesis_intervals
from mtrl.rollout import collect_rollout

SOURCES = ["A man rides a bike.", "Two dogs play.", "A cat sleeps.", "Kids run."]


class SignRewarder(Rewarder):
    """+1 on every token of even rows, -1 on odd rows (no detector needed)."""

    def __init__(self, tokenizer):
        super().__init__(RewardConfig(mode="sentence"), None, tokenizer)

    def __call__(self, sources, hypotheses, references, token_ids=None, detections=None, span_rewards=False):
        texts, _ = hypothesis_intervals(self.tokenizer, token_ids)
        rewards = [[1.0 if i % 2 == 0 else -1.0] * len(ids) for i, ids in enumerate(token_ids)]
        n = len(sources)
        return RewardOutput(texts, [Detection([], 0.0)] * n, [0.0] * n, [list(x) for x in token_ids], rewards)


def build(name: str, path, **cfg):
    policy = build_policy(PolicyConfig(model=str(path)), str(path), "English", "German")
    config = PPOConfig(**cfg) if name == "ppo" else GRPOConfig(**cfg) if name == "grpo" \
        else ReinforceConfig(name=name, **cfg)
    cls = {"ppo": PPO, "grpo": GRPO}.get(name, Reinforce)
    algo = cls(config, policy, SignRewarder(policy.tokenizer), GenerationConfig(max_new_tokens=6),
               Accelerator(cpu=True), total_steps=3)
    return policy, algo


@pytest.mark.parametrize("name", ["ppo", "reinforce", "grpo"])
@pytest.mark.parametrize("model", ["tiny_seq2seq", "tiny_causal"])
def test_update_raises_good_and_lowers_bad_sequences(name, model, request):
    path = request.getfixturevalue(model)
    torch.manual_seed(0)
    extra = {"epochs": 4, "lam": 1.0} if name == "ppo" else {"samples_per_prompt": 2} if name == "grpo" else {}
    policy, algo = build(name, path, lr=3e-3, minibatch_size=4, whiten_advantages=False, **extra)
    sources = SOURCES[:2] if name == "grpo" else SOURCES  # GRPO: two samples of each (rows 0, 2 good; 1, 3 bad)
    ro = collect_rollout(policy, algo.reference, algo.rewarder, sources, None, algo.gen, with_values=name == "ppo",
                         samples_per_prompt=2 if name == "grpo" else 1)
    m = ro.response_mask.float()
    assert torch.equal(ro.rewards, torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1) * m)
    assert (ro.values is not None) == (name == "ppo")
    for _ in range(3):
        stats = algo.update(ro, ro.rewards)
    assert ("value_loss" in stats) == (name == "ppo")
    with torch.no_grad():
        after = policy.forward(ro.queries, ro.query_mask, ro.responses, ro.response_mask, with_values=False).logprobs
    change = ((after - ro.logprobs) * m).sum(1)
    assert (change[0::2] > 0).all() and (change[1::2] < 0).all(), change


def test_reinforce_builds_no_value_head_but_ppo_does(tiny_seq2seq):
    for name in ("reinforce", "rloo"):
        policy, algo = build(name, tiny_seq2seq)
        assert policy.value_head is None
        assert not any(n.startswith("value_head.") for n, _ in policy.named_parameters())
        assert len(algo.optimizer.param_groups) == 1
        assert policy.forward(*policy.encode_sources(["A dog."]), *[torch.ones(1, 2, dtype=torch.long)] * 2
                              ).values is None  # no head: no values computed
    policy, algo = build("ppo", tiny_seq2seq, value_lr=2e-3)
    assert isinstance(policy.value_head, torch.nn.Linear)
    head = {id(p) for p in policy.value_head.parameters()}
    groups = algo.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-5, 2e-3] and {id(p) for p in groups[1]["params"]} == head
