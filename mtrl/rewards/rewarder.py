"""The rewarder: (sources, hypotheses, references, the policy's token ids) -> spans, scores, token rewards.

The one reward pipeline. ``mtrl score``, ``mtrl label``, every trainer and the
bench call it, so whatever a recipe trains on, ``mtrl score`` can compute and
write. Per hypothesis:

1. token intervals from the token ids (:func:`hypothesis_intervals`): training
   passes the sampled ids, ``score``/``label`` encode the hypothesis once;
2. the detector's spans and score (``detect``, cached by (source, hypothesis,
   reference));
3. the reward mode (:class:`~mtrl.rewards.config.RewardConfig`): span penalties
   on the tokens (:mod:`mtrl.rewards.token`), a sentence score on the last token
   or spread over the tokens by R3HF (:mod:`mtrl.rewards.redistribution`), or both;
4. ``scale`` times all of it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtrl.detectors import Detection, Detector
from mtrl.errors import MtrlError
from mtrl.rewards.alignment import batch_token_offsets
from mtrl.rewards.config import RewardConfig
from mtrl.rewards.redistribution import Redistributor
from mtrl.rewards.scorers import load_scorer
from mtrl.rewards.token import token_rewards

Key = tuple[str, str, str | None]
Offsets = list[tuple[int, int]]


@dataclass
class RewardOutput:
    """What the rewarder returns for a batch, one entry per hypothesis."""

    hypotheses: list[str]  # the scored strings (decoded from the token ids when none were given)
    detections: list[Detection]  # spans (offsets into the hypothesis) and the detector's score
    scores: list[float]  # the sentence score of each row (the detector's, or the r3hf scorer's)
    token_ids: list[list[int]] | None  # the tokens the rewards belong to (None without a tokenizer)
    token_rewards: list[list[float]] | None  # one reward per token id, ``scale`` applied


def hypothesis_intervals(tokenizer: Any, token_ids: Sequence[Sequence[int]],
                         hypotheses: Sequence[str] | None = None) -> tuple[list[str], list[Offsets]]:
    """Each token's character interval in its hypothesis, from the token ids.

    The ids are decoded (:func:`mtrl.rewards.alignment.batch_token_offsets`), edge whitespace is
    stripped. When ``hypotheses`` are given and a decoded text differs from its hypothesis
    (the tokenizer normalised it), the intervals are projected onto the hypothesis through a
    character alignment, so spans (offsets into the hypothesis) still find their tokens.
    """
    decoded, offsets = batch_token_offsets(tokenizer, [list(ids) for ids in token_ids])
    texts, out = [], []
    for i, (text, offs) in enumerate(zip(decoded, offsets)):
        lead = len(text) - len(text.lstrip())
        text = text.strip()
        offs = [(min(max(a - lead, 0), len(text)), min(max(b - lead, 0), len(text))) for a, b in offs]
        if hypotheses is not None and hypotheses[i] != text:
            offs = _project(text, hypotheses[i], offs)
            text = hypotheses[i]
        texts.append(text)
        out.append(offs)
    return texts, out


def _project(src: str, dst: str, offsets: Offsets) -> Offsets:
    """Map intervals in ``src`` onto ``dst`` through a character alignment (unmatched characters map forward)."""
    pos = [0] * (len(src) + 1)
    for a, b, size in difflib.SequenceMatcher(None, src, dst, autojunk=False).get_matching_blocks():
        for k in range(size + 1):
            if a + k <= len(src):
                pos[a + k] = b + k
    for i in range(1, len(pos)):
        pos[i] = max(pos[i], pos[i - 1])
    return [(pos[s], pos[e]) if e > s else (pos[s], pos[s]) for s, e in offsets]


def _cached(cache: dict, keys: list[Key], compute: Callable[..., list]) -> list:
    """Values for ``keys`` from ``cache``; the missing ones computed once, in one batch."""
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if todo:
        srcs, hyps, refs = (list(x) for x in zip(*todo))
        cache.update(zip(todo, compute(srcs, hyps, None if all(r is None for r in refs) else refs)))
    return [cache[k] for k in keys]


class Rewarder:
    """Detector + reward mode + cache; call it on a batch to get a :class:`RewardOutput`.

    ``tokenizer``: the policy's; without one there are spans and scores but no token rewards.
    ``use_reference``: whether the detector sees references (xCOMET's QE mode when False; a
    detector that needs references always gets them).
    """

    def __init__(self, config: RewardConfig, detector: Detector | None, tokenizer: Any = None,
                 use_reference: bool = True):
        self.config, self.detector, self.tokenizer = config, detector, tokenizer
        if detector is None and config.uses_scorer and config.scorer == "detector":
            raise MtrlError(f"reward.scorer 'detector' with mode {config.mode!r} needs a detector")
        self.use_reference = use_reference or (detector is not None and detector.needs_reference)
        self.scorer = self.redistributor = None
        if config.uses_scorer:
            self.scorer = load_scorer(config.scorer, detector, config.scorer_model)
            if config.redistributes:
                self.redistributor = Redistributor(self.scorer, config.r3hf_level)
        self.detections: dict[Key, Detection] = {}
        self.sentence: dict[Key, float] = {}
        self.hits = self.misses = 0

    @property
    def needs_reference(self) -> bool:
        return any(x is not None and x.needs_reference for x in (self.detector, self.scorer))

    # ------------------------------------------------------------------ scores
    def detect(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str | None] | None) -> list[Detection]:
        """The detector's spans and scores, through the cache."""
        if self.detector is None:
            raise MtrlError(f"reward mode {self.config.mode!r} needs a detector (or given spans)")
        refs = list(references) if (references is not None and self.use_reference) else [None] * len(sources)
        if self.detector.needs_reference and any(not r for r in refs):
            row = 1 + next(i for i, r in enumerate(refs) if not r)
            raise MtrlError(f"the {self.detector.name} detector needs a reference for every row (row {row} has none)")
        keys = list(zip(sources, hypotheses, refs))
        new = len({k for k in keys if k not in self.detections})
        self.hits, self.misses = self.hits + len(keys) - new, self.misses + new
        return _cached(self.detections, keys, self.detector.detect)

    def _scorer_refs(self, references: Sequence[str | None] | None, n: int) -> list[str | None]:
        refs = list(references) if references is not None else [None] * n
        if self.scorer.needs_reference and any(not r for r in refs):
            raise MtrlError(f"the {self.config.scorer} scorer needs a reference for every row")
        return refs if (self.use_reference or self.scorer.needs_reference) else [None] * n

    # ------------------------------------------------------------------ rewards
    def __call__(self, sources: Sequence[str], hypotheses: Sequence[str] | None,
                 references: Sequence[str | None] | None, token_ids: Sequence[Sequence[int]] | None = None,
                 detections: Sequence[Detection] | None = None) -> RewardOutput:
        """Rewards of a batch. ``hypotheses`` None: decoded from ``token_ids`` (training);
        ``token_ids`` None: the hypotheses encoded with the tokenizer (score, label).
        ``detections``: given spans and scores (human annotations) instead of the detector's."""
        cfg = self.config
        if hypotheses is None and token_ids is None:
            raise MtrlError("the rewarder needs hypotheses or token ids")
        n = len(sources) if hypotheses is None else len(hypotheses)
        if token_ids is None and self.tokenizer is not None:
            token_ids = [self.tokenizer(text_target=h)["input_ids"] for h in hypotheses]
        if token_ids is None:
            if cfg.redistributes:
                raise MtrlError("R3HF rewards are per token: give a tokenizer (--tokenizer)")
            texts, offsets = list(hypotheses), None
        else:
            token_ids = [list(ids) for ids in token_ids]
            texts, offsets = hypothesis_intervals(self.tokenizer, token_ids, hypotheses)
        if len(texts) != n or len(sources) != n or (references is not None and len(references) != n):
            raise MtrlError("sources, hypotheses, references and token ids must have one entry per row")

        dense = None
        if self.redistributor is not None:  # a sentence score spread over the tokens (R3HF)
            dense, full = self.redistributor(sources, texts, offsets, self._scorer_refs(references, n))
        if cfg.mode == "r3hf":  # the prefix-score differences are the rewards; no spans
            dets = [Detection([], s) for s in full]
            sentence: list[float | None] = [None] * n
        else:
            dets = list(detections) if detections is not None else self.detect(sources, texts, references)
            sentence = [None] * n  # None: hybrid adds the detector's own score
            if dense is not None:
                sentence = [0.0] * n  # the scorer's score is spread, nothing more on the last token
            elif self.scorer is not None:  # hybrid, another scorer's score on the last token
                sentence = _cached(self.sentence, list(zip(sources, texts, self._scorer_refs(references, n))),
                                   self.scorer.score)
        scores = [float(s) for s in (full if cfg.mode == "r3hf" else [d.score for d in dets])]
        if offsets is None:
            return RewardOutput(texts, dets, scores, None, None)

        rewards = []
        for i, (det, text, offs, sent) in enumerate(zip(dets, texts, offsets, sentence)):
            if not offs:
                rewards.append([])
                continue
            r = list(dense[i]) if cfg.mode == "r3hf" else token_rewards(det, text, offs, cfg, sentence_score=sent)
            if dense is not None and cfg.mode == "hybrid":
                r = [a + cfg.hybrid_weight * b for a, b in zip(r, dense[i])]
            rewards.append((np.asarray(r, dtype=np.float32) * np.float32(cfg.scale)).tolist())  # float32, as trained
        return RewardOutput(texts, dets, scores, token_ids, rewards)
