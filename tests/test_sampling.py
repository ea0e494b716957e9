"""Rollout sampling: the inverse-CDF sampler's distribution, and log-probs/values taken from the sampling pass."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mtrl.detectors import load_detector
from mtrl.policy import GenerationConfig, PolicyConfig, ReferencePolicy, build_policy
from mtrl.rewards import RewardConfig, Rewarder, hypothesis_intervals, spans_to_token_rewards
from mtrl.rollout import collect_rollout, response_ids
from mtrl.sampling import InverseCDFSampler

SOURCES = ["A man rides a bike.", "Two dogs run in the long green grass of the park today."]
REFERENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde laufen heute im langen grünen Gras des Parks."]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8)])
def test_inverse_cdf_sampler_draws_from_the_warped_softmax(temperature, top_k, top_p):
    torch.manual_seed(0)
    scores = torch.randn(1, 12) * 2
    # the distribution transformers' do_sample path draws from: its warpers, then softmax
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
        ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    expected = LogitsProcessorList(warpers)(None, scores.clone()).softmax(-1)[0]
    n = 40000
    out = InverseCDFSampler(temperature, top_k, top_p)(None, scores.expand(n, -1).clone())
    assert torch.isfinite(out).sum(1).eq(1).all()  # exactly one token left per row
    freq = torch.bincount(out.argmax(-1), minlength=12).float() / n
    assert (freq - expected).abs().max() < 0.012  # ~5 standard errors at n=40000
    assert freq[expected == 0].sum() == 0  # a token cut by top-k/top-p is never drawn


def test_inverse_cdf_sampler_follows_the_torch_seed():
    scores = torch.randn(8, 50)
    torch.manual_seed(3)
    a = InverseCDFSampler()(None, scores.clone()).argmax(-1)
    torch.manual_seed(3)
    b = InverseCDFSampler()(None, scores.clone()).argmax(-1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fixture", ["tiny_seq2seq", "tiny_causal", "tiny_nllb"])
def test_sampling_pass_logprobs_and_values_equal_a_forward_pass(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    cfg = PolicyConfig(model=str(model_dir), tgt_lang_code="deu_Latn" if fixture == "tiny_nllb" else None)
    policy = build_policy(cfg, str(model_dir), "English", "German")
    assert policy.value_head is None  # only PPO adds one
    policy.add_value_head()
    queries, qmask = policy.encode_sources(SOURCES)
    gen = GenerationConfig(max_new_tokens=10, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    responses, mask, out = policy.sample(queries, qmask, gen, with_values=True)
    full = policy.forward(queries, qmask, responses, mask, gen.temperature)  # values: the head exists
    m = mask.bool()
    assert m.any()
    torch.testing.assert_close(out.logprobs[m], full.logprobs[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.values[m], full.values[m], atol=1e-5, rtol=0)
    assert (out.logprobs[m] < 0).all()


def test_rollout_logprobs_equal_a_teacher_forced_pass(tiny_causal):
    """The rollout's log-probs and values come from the sampling pass (O(B x T) memory); they must equal
    what a second, teacher-forced pass over the same responses computes."""
    policy = build_policy(PolicyConfig(model=str(tiny_causal)), str(tiny_causal), "English", "German")
    policy.add_value_head()
    reference = ReferencePolicy(policy)
    rewarder = Rewarder(RewardConfig(mode="hybrid"), load_detector("reference"), policy.tokenizer)
    torch.manual_seed(1)
    a = collect_rollout(policy, reference, rewarder, SOURCES, REFERENCES, GenerationConfig(max_new_tokens=8),
                        with_values=True)
    full = policy.forward(a.queries, a.query_mask, a.responses, a.response_mask, 1.0, with_values=True)
    mf = a.response_mask.float()
    torch.testing.assert_close(a.logprobs, full.logprobs * mf, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.values, full.values * mf, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.ref_logprobs, full.logprobs * mf, atol=1e-5, rtol=0)  # reference = initial policy
    # the rewards sit on the sampled tokens: zero on padding; spans + the detector's score on the last token
    m = a.response_mask.bool()
    assert float(a.rewards[~m].abs().sum()) == 0.0
    ids = response_ids(a.responses, a.response_mask)
    texts, offsets = hypothesis_intervals(policy.tokenizer, ids)
    assert texts == a.texts
    for i, (row, text, offs, det) in enumerate(zip(ids, texts, offsets, a.detections)):
        assert len(row) == int(m[i].sum())
        expected = spans_to_token_rewards(text, offs, det.spans, rewarder.config.severity())
        expected[-1] += a.scores[i]
        torch.testing.assert_close(a.rewards[i, :len(row)], torch.tensor(expected), atol=1e-5, rtol=0)
    # a policy without a value head gives rollouts without values
    fresh = build_policy(PolicyConfig(model=str(tiny_causal)), str(tiny_causal), "English", "German")
    torch.manual_seed(1)
    plain = collect_rollout(fresh, ReferencePolicy(fresh), rewarder, SOURCES, REFERENCES,
                            GenerationConfig(max_new_tokens=8))
    assert plain.values is None and torch.equal(plain.responses, a.responses)
    torch.testing.assert_close(plain.logprobs, a.logprobs, atol=1e-5, rtol=0)


def test_causal_forward_keeps_only_the_completion_logits(tiny_causal):
    """logits_to_keep (the LM head on response positions only) gives the full forward's log-probs."""
    policy = build_policy(PolicyConfig(model=str(tiny_causal)), str(tiny_causal), "English", "German")
    queries, qmask = policy.encode_sources(SOURCES)
    torch.manual_seed(0)
    responses, mask = policy.generate(queries, qmask, GenerationConfig(max_new_tokens=6))
    out = policy.forward(queries, qmask, responses, mask)
    ids, am = torch.cat([queries, responses], 1), torch.cat([qmask, mask], 1)
    logits = policy.model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0)).logits
    manual = logits[:, queries.shape[1] - 1:-1].log_softmax(-1).gather(2, responses.unsqueeze(-1)).squeeze(-1)
    m = mask.bool()
    torch.testing.assert_close(out.logprobs[m], manual[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_seq2seq", "tiny_causal"])
def test_response_limit_next_to_a_generation_config_max_length(fixture, request):
    """Translation models' generation configs carry a ``max_length`` (opus-mt: 512): the policy's limit holds
    and transformers does not warn about two limits at every call."""
    model_dir = request.getfixturevalue(fixture)
    policy = build_policy(PolicyConfig(model=str(model_dir)), str(model_dir), "English", "German")
    policy.model.generation_config.max_length = 512
    policy.model.generation_config.min_new_tokens = 4  # no early EOS: the limit is what stops generation
    queries, mask = policy.encode_sources(["A man rides a bike.", "Two dogs play in the snow."])
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append  # transformers' logger does not propagate to pytest's
    logging.getLogger("transformers").addHandler(handler)
    try:
        for sample in (False, True):
            responses, _ = policy.generate(queries, mask, GenerationConfig(max_new_tokens=4), sample=sample)
            assert responses.shape[1] == 4
        responses, _, out = policy.sample(queries, mask, GenerationConfig(max_new_tokens=4))
        assert responses.shape[1] == 4 == out.logprobs.shape[1]
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [w.getMessage() for w in warnings if "max_length" in w.getMessage()]
