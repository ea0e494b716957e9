"""Rollouts: sample translations with the policy and reward every token with the rewarder.

``collect_rollout`` is the data side of every on-policy algorithm: sample a batch with the
KV cache (``samples_per_prompt`` per source; a seq2seq policy's encoder runs once per source
for all of them), hand the sampled token ids to the :class:`~mtrl.rewards.Rewarder` (which
decodes them, scores the hypotheses through its cache and maps spans and scores to those
same tokens), and add the reference model's log-probs for the KL penalty. The policy's own
log-probs (and values) come from the sampling pass itself (:meth:`~mtrl.policy.Policy.sample`:
O(B x T) memory, no second forward).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mtrl.detectors import Detection
from mtrl.policy import GenerationConfig, Policy, PolicyOutput, ReferencePolicy
from mtrl.rewards import Rewarder
from mtrl.rewards.guards import guard_metrics


@dataclass
class Rollout:
    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # old policy, (B, T)
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    rewards: torch.Tensor  # the rewarder's per-token rewards (before the KL penalty), (B, T)
    scores: list[float]  # each hypothesis' sentence score
    texts: list[str]
    detections: list[Detection]
    group: torch.Tensor  # index of the prompt each sample came from (RLOO groups)
    stats: dict[str, float] = field(default_factory=dict)
    # generation.engine vllm with generation.vllm.importance_sampling_cap: min(pi_trainer / pi_engine, cap) per
    # token, which the update multiplies into the advantages (the samples came from the engine's numerics)
    is_weights: torch.Tensor | None = None
    # the span penalties alone per token (B, T), whatever reward.mode is (GRPO's span advantages)
    span_rewards: torch.Tensor | None = None
    # each guard's trip rate, the length ratio to the source, the share in the target language (mtrl.rewards.guards)
    guard_stats: dict[str, float] = field(default_factory=dict)


def response_ids(responses: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's token ids up to its last unmasked token (EOS included): what the rewarder scores."""
    lengths = [max((i + 1 for i, v in enumerate(m) if v), default=0) for m in mask.tolist()]
    return [ids[:n] for ids, n in zip(responses.tolist(), lengths)]


def reward_tensor(token_rewards: Sequence[Sequence[float]], shape: torch.Size, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 rewards from the rewarder's per-row lists, zero on padding."""
    out = torch.zeros(shape, dtype=torch.float32)
    for i, r in enumerate(token_rewards):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
    return out * mask.float().cpu()


def clock() -> float:
    """Wall time once the GPU's queued work is done (each phase of the step's time split is its own)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def chunks(n: int, size: int | None) -> list[slice]:
    """``n`` rows in slices of at most ``size`` (None: one slice)."""
    size = size or max(n, 1)
    return [slice(i, i + size) for i in range(0, n, size)] or [slice(0, 0)]


def pad_cat(parts: Sequence[torch.Tensor], value: float) -> torch.Tensor:
    """(B_i, T_i) tensors stacked into one (sum B_i, max T_i), padded on the right with ``value``."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=value) for p in parts])


def sample_batch(policy: Policy, prompts: torch.Tensor, prompt_mask: torch.Tensor, gen: GenerationConfig,
                 samples_per_prompt: int, with_values: bool) -> tuple[torch.Tensor, torch.Tensor, PolicyOutput]:
    """The rollout's samples: ``samples_per_prompt`` per prompt row (row ``i * samples_per_prompt + j``:
    sample ``j`` of prompt ``i``), their mask and the sampling pass's log-probs (and values).

    ``generation.rollout_batch_size`` sequences per ``generate`` call, in whole prompts (all samples of a
    prompt in one call, so a seq2seq encoder runs once per prompt); None: the whole batch in one call. The
    calls' responses are padded to the longest (mask, log-probs and values 0 there)."""
    per_call = None if gen.rollout_batch_size is None else max(1, gen.rollout_batch_size // samples_per_prompt)
    parts = [policy.sample(prompts[rows], prompt_mask[rows], gen, with_values=with_values,
                           samples_per_prompt=samples_per_prompt) for rows in chunks(len(prompts), per_call)]
    if len(parts) == 1:
        return parts[0]
    pad = policy.tokenizer.pad_token_id
    values = pad_cat([p[2].values for p in parts], 0.0) if with_values else None
    return (pad_cat([p[0] for p in parts], pad), pad_cat([p[1] for p in parts], 0),
            PolicyOutput(pad_cat([p[2].logprobs for p in parts], 0.0), None, values))


@torch.no_grad()
def collect_rollout(policy: Policy, reference: ReferencePolicy, rewarder: Rewarder, sources: Sequence[str],
                    references: Sequence[str | None] | None, gen: GenerationConfig, samples_per_prompt: int = 1,
                    with_values: bool = False, recompute: Any = None, engine: Any = None,
                    span_rewards: bool = False) -> Rollout:
    """Sample, reward and reference-score one batch. ``recompute``: a module called like
    :meth:`Policy.forward` (the algorithm's prepared policy) that recomputes the old log-probs and values
    by a teacher-forced pass; given where the sampling pass (KV cache) and the update's pass would round
    differently (half or mixed precision), so that PPO's ratio starts at exactly 1.

    The sources are tokenised once; everything after sampling holds one row per sample (``queries``: each
    source's row repeated ``samples_per_prompt`` times). The teacher-forced passes (reference, recompute)
    take ``generation.rollout_batch_size`` rows at a time, as sampling does.

    ``engine`` (:class:`mtrl.vllm_engine.VLLMEngine`, ``generation.engine: vllm``) samples instead of the
    policy, one seed per request from the process's torch RNG; the old log-probs (and values) then come from
    the trainer's own teacher-forced pass, and the step logs the engine-vs-trainer gap over the sampled tokens
    (``engine_logprob_gap_mean``, ``engine_logprob_gap_max``). ``span_rewards``: also the span penalties alone
    per token (:attr:`Rollout.span_rewards`, GRPO's span advantages)."""
    t0 = clock()
    k = samples_per_prompt
    prompts, prompt_mask = policy.encode_sources(sources)  # one row per source
    queries, qmask = prompts.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)  # one row per sample
    # the samples: row i * k + j is sample j of source i
    engine_logprobs = None
    if engine is not None:
        seeds = torch.randint(0, 2**31 - 1, (len(queries),)).tolist()
        responses, rmask, engine_logprobs = engine.sample(queries, qmask, gen, seeds)
        recompute = recompute if recompute is not None else policy
    else:
        responses, rmask, out = sample_batch(policy, prompts, prompt_mask, gen, k, with_values)
    t_gen = clock() - t0
    sources = [s for s in sources for _ in range(k)]
    if references is not None:
        references = [r for r in references for _ in range(k)]
    group = torch.arange(len(sources)) // k
    scored = rewarder(sources, None, references, response_ids(responses, rmask), span_rewards=span_rewards)
    rewards = reward_tensor(scored.token_rewards, responses.shape, rmask)
    span_rewards = None if scored.span_rewards is None else reward_tensor(scored.span_rewards, responses.shape, rmask)
    guard_stats = guard_metrics(rewarder.guards, sources, scored.hypotheses, scored.guards) \
        if rewarder.check_guards else {}
    t_score = clock() - t0 - t_gen
    rows = chunks(len(sources), gen.rollout_batch_size)
    ref_logprobs = torch.cat([reference.logprobs(queries[r], qmask[r], responses[r], rmask[r], gen.temperature)
                              for r in rows])
    if recompute is not None:
        parts = [recompute(queries[r], qmask[r], responses[r], rmask[r], gen.temperature, with_values=with_values,
                           with_entropy=False) for r in rows]
        out = PolicyOutput(torch.cat([p.logprobs for p in parts]), None,
                           torch.cat([p.values for p in parts]) if with_values else None)
    t_forward = clock() - t0 - t_gen - t_score
    m = rmask.float()
    stats = {"generate_s": t_gen, "score_s": t_score, "forward_s": t_forward, "response_tokens": float(m.sum()),
             "response_length_mean": float(m.sum(1).mean())}
    is_weights = None
    if engine_logprobs is not None:
        delta = (out.logprobs - engine_logprobs.to(m.device)) * m
        stats.update(engine_logprob_gap_mean=float(delta.abs().sum() / m.sum().clamp(min=1)),
                     engine_logprob_gap_max=float(delta.abs().max()))
        cap = gen.vllm.importance_sampling_cap
        if cap is not None:
            is_weights = delta.exp().clamp(max=cap) * m
    return Rollout(queries, qmask, responses, rmask, out.logprobs * m, ref_logprobs * m,
                   None if out.values is None else out.values * m, rewards.to(m.device), scored.scores,
                   scored.hypotheses, scored.detections, group, stats, is_weights,
                   None if span_rewards is None else span_rewards.to(m.device),
                   guard_stats)
