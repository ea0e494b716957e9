"""The updates move the policy the right way: up on tokens with positive advantage, down on negative ones."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from mtrl.algorithms import ppo, reinforce
from mtrl.policy import ReferencePolicy, build_policy
from mtrl.recipe import AlgorithmConfig, GenerationConfig, PolicyConfig
from mtrl.rollout import collect_rollout


class SignRewarder:
    """+1 on every token of even rows, -1 on odd rows (no detector needed)."""

    def __call__(self, tokenizer, sources, references, responses, mask):
        sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(sources))]).unsqueeze(1)
        return sign * mask.float(), ["x"] * len(sources), [type("D", (), {"score": 0.0, "spans": []})()] * len(sources)


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
@pytest.mark.parametrize("model", ["tiny_seq2seq", "tiny_causal"])
def test_update_raises_good_and_lowers_bad_sequences(name, model, request):
    path = request.getfixturevalue(model)
    torch.manual_seed(0)
    policy = build_policy(PolicyConfig(model=str(path)), str(path), "English", "German")
    reference = ReferencePolicy(policy)
    sources = ["A man rides a bike.", "Two dogs play.", "A cat sleeps.", "Kids run."]
    ro = collect_rollout(policy, reference, SignRewarder(), sources, None, GenerationConfig(max_new_tokens=6),
                         with_values=name == "ppo")
    cfg = AlgorithmConfig(name=name, lr=3e-3, epochs=4, minibatch_size=4, whiten_advantages=False, lam=1.0)
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    wrapped, opt = accelerator.prepare(policy, opt)
    algo = ppo if name == "ppo" else reinforce
    for _ in range(3):
        algo.update(wrapped, opt, accelerator, ro, ro.scores, cfg, 1.0)
    with torch.no_grad():
        after = policy.forward(ro.queries, ro.query_mask, ro.responses, ro.response_mask, with_values=False).logprobs
    m = ro.response_mask.float()
    change = ((after - ro.logprobs) * m).sum(1)
    assert (change[0::2] > 0).all() and (change[1::2] < 0).all(), change
