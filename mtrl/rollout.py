"""Rollouts: sample translations with the policy and reward every token with the rewarder.

``collect_rollout`` is the data side of every on-policy algorithm: sample a batch
with the KV cache, hand the sampled token ids to the :class:`~mtrl.rewards.Rewarder`
(which decodes them, scores the hypotheses through its cache and maps spans and
scores to those same tokens), and add the reference model's log-probs for the KL
penalty. The policy's own log-probs (and values) come from the sampling pass itself
(:meth:`~mtrl.policy.Policy.sample`: O(B x T) memory, no second forward).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtrl.detectors import Detection
from mtrl.policy import GenerationConfig, Policy, ReferencePolicy
from mtrl.rewards import Rewarder


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


@torch.no_grad()
def collect_rollout(policy: Policy, reference: ReferencePolicy, rewarder: Rewarder, sources: Sequence[str],
                    references: Sequence[str | None] | None, gen: GenerationConfig, samples_per_prompt: int = 1,
                    with_values: bool = False, recompute: Any = None) -> Rollout:
    """Sample, reward and reference-score one batch. ``recompute``: a module called like
    :meth:`Policy.forward` (the algorithm's prepared policy) that recomputes the old log-probs and values
    by a teacher-forced pass; given where the sampling pass (KV cache) and the update's pass would round
    differently (half or mixed precision), so that PPO's ratio starts at exactly 1."""
    t0 = clock()
    sources = [s for s in sources for _ in range(samples_per_prompt)]
    if references is not None:
        references = [r for r in references for _ in range(samples_per_prompt)]
    group = torch.arange(len(sources)) // samples_per_prompt
    queries, qmask = policy.encode_sources(sources)
    responses, rmask, out = policy.sample(queries, qmask, gen, with_values=with_values)
    t_gen = clock() - t0
    scored = rewarder(sources, None, references, response_ids(responses, rmask))
    rewards = reward_tensor(scored.token_rewards, responses.shape, rmask)
    t_score = clock() - t0 - t_gen
    ref_logprobs = reference.logprobs(queries, qmask, responses, rmask, gen.temperature)
    if recompute is not None:
        out = recompute(queries, qmask, responses, rmask, gen.temperature, with_values=with_values,
                        with_entropy=False)
    t_forward = clock() - t0 - t_gen - t_score
    m = rmask.float()
    stats = {"generate_s": t_gen, "score_s": t_score, "forward_s": t_forward, "response_tokens": float(m.sum()),
             "response_length_mean": float(m.sum(1).mean())}
    return Rollout(queries, qmask, responses, rmask, out.logprobs * m, ref_logprobs * m,
                   None if out.values is None else out.values * m, rewards.to(m.device), scored.scores,
                   scored.hypotheses, scored.detections, group, stats)
