"""Rollouts: sample translations, score them, and give every token its reward.

``collect_rollout`` is the data side of every on-policy algorithm: it samples a
batch with the KV cache, decodes the hypotheses exactly as the detector will
see them, scores them through a cache (repeated (source, hypothesis) pairs are
not scored twice), maps spans to the policy's tokens and adds the reference
model's log-probs for the KL penalty. The policy's own log-probs and values
come from the sampling pass (``generation.rollout_logprobs: generate``) or from
a second, teacher-forced pass (``forward``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mtrl.alignment import batch_token_offsets
from mtrl.detectors import Detection, Detector
from mtrl.errors import MtrlError
from mtrl.policy import Policy, ReferencePolicy
from mtrl.recipe import GenerationConfig
from mtrl.rewards import RewardConfig, token_rewards


@dataclass
class Rollout:
    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # old policy, (B, T)
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor  # task rewards per token (before the KL penalty)
    texts: list[str]
    detections: list[Detection]
    group: torch.Tensor  # index of the prompt each sample came from (RLOO groups)
    stats: dict[str, float] = field(default_factory=dict)


def decode_responses(tokenizer, responses: torch.Tensor, mask: torch.Tensor):
    """Hypothesis strings (edge spaces stripped), per-token intervals in them, and response lengths.

    A response runs to its last unmasked token (EOS included); the strings are
    exactly what the detector scores and what evaluation reports.
    """
    lengths = [max((i + 1 for i, v in enumerate(m) if v), default=0) for m in mask.tolist()]
    decoded = batch_token_offsets(tokenizer, [ids[:n] for ids, n in zip(responses.tolist(), lengths)])
    texts, offsets = [], []
    for text, offs in zip(*decoded):
        lead = len(text) - len(text.lstrip())
        text = text.strip()
        texts.append(text)
        offsets.append([(min(max(a - lead, 0), len(text)), min(max(b - lead, 0), len(text))) for a, b in offs])
    return texts, offsets, lengths


class CachedRewarder:
    """Detector + reward mapping, with a cache of detections keyed by (source, hypothesis, reference)."""

    def __init__(self, detector: Detector, config: RewardConfig, scale: float = 1.0, use_reference: bool = True):
        self.detector, self.config, self.scale = detector, config, scale
        self.use_reference = use_reference or detector.needs_reference
        self.cache: dict[tuple[str, str, str | None], Detection] = {}
        self.hits = self.misses = 0
        # the sentence scorer of r3hf, and of hybrid when it adds another scorer's score (chrF, ...) to the spans
        self.scorer = self.redistributor = None
        self.scores: dict[tuple[str, str, str | None], float] = {}
        if config.mode == "r3hf" or (config.mode == "hybrid" and
                                     (config.scorer != "detector" or config.hybrid_sentence == "r3hf")):
            from mtrl.redistribution import Redistributor, load_scorer

            self.scorer = load_scorer(config.scorer, detector, config.scorer_model)
            if config.mode == "r3hf" or config.hybrid_sentence == "r3hf":
                self.redistributor = Redistributor(self.scorer, config.r3hf_level)

    def detect(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str | None] | None) -> list[Detection]:
        refs = list(references) if (references is not None and self.use_reference) else [None] * len(sources)
        if self.detector.needs_reference and any(r is None for r in refs):
            raise MtrlError(f"the {self.detector.name} detector needs references; the data has none")
        keys = list(zip(sources, hypotheses, refs))
        n_new = len({k for k in keys if k not in self.cache})  # repeats within the batch are detected once
        self.hits, self.misses = self.hits + len(keys) - n_new, self.misses + n_new
        return _cached(self.cache, keys, lambda s, h, r: self.detector.detect(
            s, h, None if all(x is None for x in r) else r))

    def sentence_scores(self, sources: Sequence[str], hypotheses: Sequence[str],
                        references: Sequence[str | None] | None) -> list[float]:
        """Hybrid mode: ``reward.scorer``'s sentence scores (cached like detections)."""
        refs = list(references) if references is not None else [None] * len(sources)
        if self.scorer.needs_reference and any(r is None for r in refs):
            raise MtrlError(f"the {self.config.scorer} scorer needs references; the data has none")
        return _cached(self.scores, list(zip(sources, hypotheses, refs)), self.scorer.score)

    def __call__(self, tokenizer, sources, references, responses: torch.Tensor, mask: torch.Tensor):
        """Per-token rewards (B, T) for the responses, plus their texts and detections."""
        texts, offsets, lengths = decode_responses(tokenizer, responses, mask)
        rewards = torch.zeros(responses.shape, dtype=torch.float32)
        # the scorer sees references when the recipe uses them or it cannot do without
        scorer_refs = references if (self.scorer is not None and
                                     (self.use_reference or self.scorer.needs_reference)) else None
        if self.config.mode == "r3hf":  # prefix-score differences; the full score stands in for spans
            per_token, full = self.redistributor(sources, texts, offsets, scorer_refs)
            for i, (r, n) in enumerate(zip(per_token, lengths)):
                rewards[i, :n] = torch.tensor(r[:n], dtype=torch.float32)
            detections = [Detection([], s) for s in full]
            return rewards * self.scale * mask.float().cpu(), texts, detections
        detections = self.detect(sources, texts, references)
        sentence: list[float | None] = [None] * len(texts)  # None: hybrid adds the detector's own score
        dense = None
        if self.redistributor is not None:  # hybrid, the scorer's score spread over the tokens (R3HF)
            dense, _ = self.redistributor(sources, texts, offsets, scorer_refs)
            sentence = [0.0] * len(texts)  # nothing more on the last token
        elif self.scorer is not None:  # hybrid, the scorer's score on the last token
            sentence = self.sentence_scores(sources, texts, references)
        for i, (det, text, offs, n, sent) in enumerate(zip(detections, texts, offsets, lengths, sentence)):
            if n:
                r = token_rewards(det, text, offs, self.config, sentence_score=sent)
                if dense is not None:
                    r = [a + self.config.hybrid_weight * b for a, b in zip(r, dense[i][:n])]
                rewards[i, :n] = torch.tensor(r, dtype=torch.float32)
        return rewards * self.scale * mask.float().cpu(), texts, detections


def _cached(cache: dict, keys: list, compute) -> list:
    """Values for ``keys`` (tuples of columns) from ``cache``; the missing ones computed once, in one batch."""
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if todo:
        cache.update(zip(todo, compute(*map(list, zip(*todo)))))
    return [cache[k] for k in keys]


@torch.no_grad()
def collect_rollout(policy: Policy, reference: ReferencePolicy, rewarder: CachedRewarder,
                    sources: Sequence[str], references: Sequence[str | None] | None, gen: GenerationConfig,
                    samples_per_prompt: int = 1, with_values: bool = True) -> Rollout:
    t0 = time.perf_counter()
    sources = [s for s in sources for _ in range(samples_per_prompt)]
    if references is not None:
        references = [r for r in references for _ in range(samples_per_prompt)]
    group = torch.arange(len(sources)) // samples_per_prompt
    queries, qmask = policy.encode_sources(sources)
    if gen.rollout_logprobs == "generate":  # old log-probs and values from the sampling pass itself
        responses, rmask, out = policy.sample(queries, qmask, gen, with_values=with_values)
    else:
        responses, rmask = policy.generate(queries, qmask, gen, sample=True)
    t_gen = time.perf_counter() - t0
    scores, texts, detections = rewarder(policy.tokenizer, sources, references, responses, rmask)
    t_score = time.perf_counter() - t0 - t_gen
    ref_logprobs = reference.logprobs(queries, qmask, responses, rmask, gen.temperature)
    if gen.rollout_logprobs == "forward":  # a teacher-forced pass instead: no B x T x V logits kept
        out = policy.forward(queries, qmask, responses, rmask, gen.temperature, with_values=with_values,
                             with_entropy=False)
    m = rmask.float()
    stats = {"generate_s": t_gen, "score_s": t_score, "response_tokens": float(m.sum()),
             "response_length_mean": float(m.sum(1).mean())}
    return Rollout(queries, qmask, responses, rmask, out.logprobs * m, ref_logprobs * m,
                   None if out.values is None else out.values * m, scores.to(m.device), texts, detections,
                   group, stats)
