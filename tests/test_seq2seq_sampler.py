"""The seq2seq sampler: the encoder runs once per source for all its samples, with the samples, log-probs and
values of the old path (every source repeated, the encoder run on each copy); rollout batches apart from the
update's minibatches; the static cache with a compiled decoding step (``generation.compile``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from mtrl.algorithms.ppo import PPO, PPOConfig
from mtrl.errors import MtrlError
from mtrl.policy import GenerationConfig, PolicyConfig, PolicyOutput, ReferencePolicy, build_policy
from mtrl.policy import _StepRecorder as StepRecorder
from mtrl.recipe import load_recipe
from mtrl.rollout import collect_rollout
from tests.test_learning_direction import SignRewarder

SOURCES = ["A man rides a bike.", "Two dogs run in the long green grass of the park today.", "Hi."]
GEN = GenerationConfig(max_new_tokens=8, temperature=0.8, top_p=0.95)


def make_policy(path, nllb: bool = False):
    policy = build_policy(PolicyConfig(model=str(path), tgt_lang_code="deu_Latn" if nllb else None), str(path),
                          "English", "German")
    policy.add_value_head()
    return policy


def repeated_path(policy, sources, k, gen, with_values=True):
    """The sampler before this change: the sources repeated k times, ``generate`` running the encoder itself."""
    queries, qmask = policy.encode_sources([s for s in sources for _ in range(k)])
    recorder = StepRecorder(policy.model, gen.temperature, policy.value_head if with_values else None)
    with recorder:
        out = policy.model.generate(input_ids=queries, attention_mask=qmask,
                                    **policy._generate_kwargs(gen, queries, sample=True, on_token=recorder.take))
    responses = policy._responses(out, queries)
    n = responses.shape[1]
    values = torch.stack(recorder.values, 1)[:, :n] if with_values else None
    return queries, qmask, responses, policy.response_mask(responses), \
        PolicyOutput(torch.stack(recorder.logprobs, 1)[:, :n], None, values)


class EncoderCalls:
    """Rows the policy's encoder saw, one entry per call (a forward pre-hook)."""

    def __init__(self, policy):
        self.rows: list[int] = []
        self.handle = policy.model.get_encoder().register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        self.rows.append((args[0] if args else kwargs["input_ids"]).shape[0])


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("fixture", ["tiny_seq2seq", "tiny_nllb"])
def test_encoder_once_per_source_gives_the_repeated_path_bit_for_bit(fixture, k, request):
    """For one torch seed, the rollout's responses, log-probs and values equal the old path's exactly (on a
    CPU the encoder's rows do not depend on the batch around them), with one encoder call of one row per source;
    the rollout's queries stay one row per sample."""
    policy = make_policy(request.getfixturevalue(fixture), nllb=fixture == "tiny_nllb")
    calls = EncoderCalls(policy)
    torch.manual_seed(0)
    old_q, old_qm, old_r, old_rm, old = repeated_path(policy, SOURCES, k, GEN)
    assert calls.rows == [len(SOURCES) * k]  # the old path: the encoder on every copy
    calls.rows.clear()
    torch.manual_seed(0)
    ro = collect_rollout(policy, ReferencePolicy(policy), SignRewarder(policy.tokenizer), SOURCES, None, GEN,
                         samples_per_prompt=k, with_values=True)
    assert calls.rows == [len(SOURCES)]  # once, one row per source (the reference is a copy of its own)
    assert torch.equal(ro.queries, old_q) and torch.equal(ro.query_mask, old_qm)
    assert torch.equal(ro.responses, old_r) and torch.equal(ro.response_mask, old_rm)
    m = old_rm.float()
    assert torch.equal(ro.logprobs, old.logprobs * m) and torch.equal(ro.values, old.values * m)
    assert torch.equal(ro.group, torch.arange(len(SOURCES) * k) // k)
    assert ro.response_mask.sum() > 0
    calls.handle.remove()


def test_samples_of_one_source_differ(tiny_seq2seq):
    """Repeated encoder outputs, not repeated random numbers: the k samples of a source are k draws."""
    policy = make_policy(tiny_seq2seq)
    torch.manual_seed(0)
    responses, _, _ = policy.sample(*policy.encode_sources(SOURCES[:1]), GenerationConfig(max_new_tokens=8),
                                    samples_per_prompt=6)
    assert responses.shape[0] == 6 and len({tuple(r) for r in responses.tolist()}) > 1


def test_rollout_batch_size_splits_sampling_in_whole_sources(tiny_seq2seq):
    """``generation.rollout_batch_size``: at most that many sequences per generate call, all samples of a source
    in one call; the pieces are padded to one width and the log-probs, values and reference log-probs are
    those of a teacher-forced pass over the joined batch."""
    policy = make_policy(tiny_seq2seq)
    calls = EncoderCalls(policy)
    gen = GenerationConfig(max_new_tokens=8, rollout_batch_size=5)  # k=2: two sources (4 sequences) per call
    reference = ReferencePolicy(policy)
    torch.manual_seed(0)
    ro = collect_rollout(policy, reference, SignRewarder(policy.tokenizer), SOURCES, None, gen,
                         samples_per_prompt=2, with_values=True)
    assert calls.rows == [2, 1]
    assert ro.responses.shape[0] == 6 and ro.logprobs.shape == ro.responses.shape == ro.values.shape
    full = policy.forward(ro.queries, ro.query_mask, ro.responses, ro.response_mask, 1.0)
    m = ro.response_mask.float()
    torch.testing.assert_close(ro.logprobs, full.logprobs * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.values, full.values * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(ro.ref_logprobs, full.logprobs * m, atol=1e-5, rtol=0)
    # padding after the shorter call's responses: masked, pad token
    pad = ro.responses[ro.response_mask == 0]
    assert set(pad.tolist()) <= {policy.tokenizer.pad_token_id, policy.eos_token_id}
    calls.handle.remove()


@pytest.mark.parametrize("rollout_batch_size,generate_rows", [(None, [8]), (4, [4, 4])])
def test_ppo_samples_the_batch_apart_from_its_minibatches(tiny_seq2seq, rollout_batch_size, generate_rows):
    """The rollout samples batch_size x samples_per_prompt sequences per step whatever ``minibatch_size``
    (only the update is cut into minibatches); ``rollout_batch_size`` alone cuts the sampling."""
    policy = build_policy(PolicyConfig(model=str(tiny_seq2seq)), str(tiny_seq2seq), "English", "German")
    algo = PPO(PPOConfig(minibatch_size=2, samples_per_prompt=2, epochs=1), policy, SignRewarder(policy.tokenizer),
               GenerationConfig(max_new_tokens=6, rollout_batch_size=rollout_batch_size), Accelerator(cpu=True),
               total_steps=1)
    rows: list[int] = []
    generate = policy.model.generate

    def counting(**kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    policy.model.generate = counting
    torch.manual_seed(0)
    algo.step(SOURCES + ["A cat sleeps."], None)
    assert rows == generate_rows


def test_compiled_decoding_keeps_the_samples_and_the_hooks(tiny_seq2seq, monkeypatch):
    """``generation.compile``: a static cache and transformers' compiled decoding step (Dynamo's eager backend
    here: the same graphs without Inductor's minutes of C++ compilation). The recorder's hooks run inside the
    compiled step: with and without the value head's hook, in either order, the samples and log-probs are
    those of the uncompiled sampler."""
    compiled = []
    compile_ = torch.compile

    def eager_compile(fn, **kwargs):
        compiled.append(kwargs)
        return compile_(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    policy = make_policy(tiny_seq2seq)
    queries, qmask = policy.encode_sources(SOURCES)
    fast = GenerationConfig(max_new_tokens=8, compile=True)
    for with_values in (False, True, False):
        torch.manual_seed(1)
        r, rm, out = policy.sample(queries, qmask, fast, with_values=with_values, samples_per_prompt=2)
        torch.manual_seed(1)
        r0, rm0, out0 = policy.sample(queries, qmask, GenerationConfig(max_new_tokens=8), with_values=with_values,
                                      samples_per_prompt=2)
        assert torch.equal(r, r0) and torch.equal(rm, rm0)
        mb = rm.bool()
        torch.testing.assert_close(out.logprobs[mb], out0.logprobs[mb], atol=1e-5, rtol=0)
        if with_values:
            torch.testing.assert_close(out.values[mb], out0.values[mb], atol=1e-5, rtol=0)
    assert len(compiled) == 1 and compiled[0]["mode"] == "default"  # one compiled call (Dynamo guards the rest)


def test_generation_keys_in_a_recipe():
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    r = load_recipe(quickstart)
    assert r.generation.rollout_batch_size is None and r.generation.compile is False  # the defaults
    r = load_recipe(quickstart, ["generation.rollout_batch_size=256", "generation.compile=true"])
    assert r.generation.rollout_batch_size == 256 and r.generation.compile is True
    with pytest.raises(MtrlError, match="rollout_batch_size: must be >= 1"):
        load_recipe(quickstart, ["generation.rollout_batch_size=0"])
