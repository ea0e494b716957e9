"""The rewarder: (sources, hypotheses, references, the policy's token ids) -> spans, scores, token rewards.

The one reward pipeline. ``mtrl score``, ``mtrl label``, every trainer and the
bench call it, so whatever a recipe trains on, ``mtrl score`` can compute and
write. Per hypothesis:

1. token intervals from the token ids (:func:`hypothesis_intervals`): training
   passes the sampled ids, ``score``/``label`` encode the hypothesis once;
2. the detector's spans and score (``detect``, cached by (source, hypothesis,
   reference), at most ``reward.cache_size`` entries, least recently used dropped first;
   a batch the detector runs out of memory on is retried in halves, down to one row,
   before :class:`~mtrl.errors.DetectorOutOfMemory` gives up);
3. the guards (:mod:`mtrl.rewards.guards`): always checked, so that their trip rates can be logged;
   applied when ``reward.guards.enabled`` (by default when the detector scores without references):
   a critical span over what a tripped guard covers (the critical penalty on the final token when it
   covers nothing) and the sentence score floored at the detector's worst;
4. the reward mode (:class:`~mtrl.rewards.config.RewardConfig`): span penalties
   on the tokens (:mod:`mtrl.rewards.token`), a sentence score on the last token
   or spread over the tokens by R3HF (:mod:`mtrl.rewards.redistribution`), or both;
5. ``scale`` times all of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtrl.detectors import Detection, Detector
from mtrl.detectors.spans import ErrorSpan
from mtrl.errors import DetectorOutOfMemory, MtrlError
from mtrl.rewards.alignment import batch_token_offsets
from mtrl.rewards.cache import LRUCache
from mtrl.rewards.config import RewardConfig
from mtrl.rewards.guards import Guards, Trip, language_code
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
    # the guards each row trips (applied or, with ``log_guards``, only counted); empty lists when not checked
    guards: list[list[str]] = field(default_factory=list)
    # with ``span_rewards=True``: the span penalties alone on the tokens (``reward.mode`` token's rewards, ``scale``
    # applied), whatever the mode: GRPO's span advantages
    span_rewards: list[list[float]] | None = None


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


def _cached(cache: LRUCache, keys: list[Key], compute: Callable[..., Sequence]) -> list:
    """Values for ``keys`` from ``cache``; the missing ones computed once, in one batch."""
    def rows(todo: list[Key]) -> Sequence:
        srcs, hyps, refs = (list(x) for x in zip(*todo))
        return compute(srcs, hyps, None if all(r is None for r in refs) else refs)

    return cache.get_many(keys, rows)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator's out-of-memory: torch's CUDA one, or a ``RuntimeError`` saying so
    (CUDA "out of memory", the CPU allocator's "can't allocate memory")."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in ("out of memory", "can't allocate memory"))


def _free_cuda() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Rewarder:
    """Detector + reward mode + caches; call it on a batch to get a :class:`RewardOutput`.

    ``tokenizer``: the policy's; without one there are spans and scores but no token rewards.
    ``use_reference``: whether the detector sees references (xCOMET's QE mode when False; a
    detector that needs references always gets them). ``language``: the target language (a name or an
    ISO 639-1 code) for the language guard, unless ``reward.guards.language`` names it. ``log_guards``: check the
    guards even when they are off, so that training can log their trip rates (``mtrl score`` does not).
    """

    def __init__(self, config: RewardConfig, detector: Detector | None, tokenizer: Any = None,
                 use_reference: bool = True, language: str | None = None, log_guards: bool = False):
        self.config, self.detector, self.tokenizer = config, detector, tokenizer
        if detector is None and config.uses_scorer and config.scorer == "detector":
            raise MtrlError(f"reward.scorer 'detector' with mode {config.mode!r} needs a detector")
        self.use_reference = use_reference or (detector is not None and detector.needs_reference)
        self.scorer = self.redistributor = None
        self._split_warned = False  # the one warning the first time a batch is retried in halves
        if config.uses_scorer:
            self.scorer = load_scorer(config.scorer, detector, config.scorer_model)
            if config.redistributes:
                self.redistributor = Redistributor(self.scorer, config.r3hf_level, config.cache_size,
                                                   score=self._score)
        self.detections = LRUCache(config.cache_size)  # Key -> Detection
        g = config.guards
        # auto: on when a score comes without references (the detector's, or a QE scorer's: COMET-Kiwi)
        scores_qe = not self.use_reference and any(x is not None and not x.needs_reference
                                                   for x in (detector, self.scorer))
        self.guards_on = g.enabled if g.enabled is not None else scores_qe
        self.check_guards = self.guards_on or log_guards
        self.guards = Guards(g, self._guard_language(language))
        # the floors of a tripped hypothesis: the detector's score, and the scorer's (r3hf, hybrid)
        self.floor = g.floor if g.floor is not None else (detector.worst_score if detector is not None else 0.0)
        self.scorer_floor = g.floor if g.floor is not None else getattr(self.scorer, "worst_score", 0.0)
        self.critical = config.severity().value(ErrorSpan(0, 1, "critical"))
        self.sentence = LRUCache(config.cache_size)  # Key -> the scorer's sentence score

    def _guard_language(self, language: str | None) -> str | None:
        """The language guard's ISO code; None (no language check) when no language is known and the guards
        only count trips. With the guards on, a language they cannot have is an error."""
        g = self.config.guards
        if "language" not in g.checks:
            return None
        name, where = (g.language, "reward.guards.language") if g.language else (language, "the target language")
        if name is None:
            if self.guards_on:
                raise MtrlError("the reward guards are on and the language guard needs the target language: give "
                                "--tgt-lang LANG (mtrl score/label) or reward.guards.language, or leave 'language' "
                                "out of reward.guards.checks")
            return None
        try:
            return language_code(name, where)
        except MtrlError as e:
            if self.guards_on:
                raise
            print(f"mtrl: warning: {e}; the language guard's trip rate is not logged", file=sys.stderr, flush=True)
            return None

    @property
    def hits(self) -> int:
        """Rows whose detection came from the cache (or repeated a row of their batch)."""
        return self.detections.hits

    @property
    def misses(self) -> int:
        """Rows the detector was run on."""
        return self.detections.misses

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
        return _cached(self.detections, list(zip(sources, hypotheses, refs)),
                       lambda s, h, r: self._in_halves(self.detector.detect, s, h, r))

    def _score(self, sources: list[str], hypotheses: list[str], references: list[str | None] | None) -> list[float]:
        """The scorer's sentence scores; retried in halves on out-of-memory when the scorer is the detector's."""
        if self.detector is not None and getattr(self.scorer, "detector", None) is self.detector:
            return self._in_halves(self.scorer.score, sources, hypotheses, references)
        return list(self.scorer.score(sources, hypotheses, references))

    def _in_halves(self, run: Callable[..., Sequence], sources: list[str], hypotheses: list[str],
                   references: list[str | None] | None, total: int | None = None) -> list:
        """``run`` on the rows; when the detector runs out of memory, on each half of them (recursively), the
        results concatenated in order. A single row out of memory raises :class:`DetectorOutOfMemory`."""
        n, total = len(hypotheses), total or len(hypotheses)
        try:
            return list(run(sources, hypotheses, references))
        except Exception as e:  # only out-of-memory is retried; anything else propagates as it is
            if not out_of_memory(e):
                raise
        # Retried out here, not in the except block: the error's traceback holds the failed pass's tensors.
        _free_cuda()
        if n <= 1:
            chars = sum(len(x or "") for x in (sources[0], hypotheses[0], references[0] if references else None))
            where = f"even on a single row, after retrying a batch of {total} rows in halves" if total > 1 \
                else "on a single row"
            raise DetectorOutOfMemory(
                f"the {self.detector.name} detector ran out of memory {where} (the row has {chars} characters of "
                "source, hypothesis and reference); lower detector.batch_size or detector.max_tokens, "
                "or give the detector a device with more free memory")
        if not self._split_warned:
            self._split_warned = True
            print(f"mtrl: warning: the detector ran out of memory on a batch of {n} rows; retrying in halves",
                  file=sys.stderr, flush=True)
        h = n // 2
        refs = (None, None) if references is None else (references[:h], references[h:])
        return (self._in_halves(run, sources[:h], hypotheses[:h], refs[0], total)
                + self._in_halves(run, sources[h:], hypotheses[h:], refs[1], total))

    def _scorer_refs(self, references: Sequence[str | None] | None, n: int) -> list[str | None]:
        refs = list(references) if references is not None else [None] * n
        if self.scorer.needs_reference and any(not r for r in refs):
            raise MtrlError(f"the {self.config.scorer} scorer needs a reference for every row")
        return refs if (self.use_reference or self.scorer.needs_reference) else [None] * n

    # ------------------------------------------------------------------ rewards
    def __call__(self, sources: Sequence[str], hypotheses: Sequence[str] | None,
                 references: Sequence[str | None] | None, token_ids: Sequence[Sequence[int]] | None = None,
                 detections: Sequence[Detection] | None = None, span_rewards: bool = False) -> RewardOutput:
        """Rewards of a batch. ``hypotheses`` None: decoded from ``token_ids`` (training);
        ``token_ids`` None: the hypotheses encoded with the tokenizer (score, label).
        ``detections``: given spans and scores (human annotations) instead of the detector's.
        ``span_rewards``: also the span penalties alone per token (:attr:`RewardOutput.span_rewards`)."""
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
                                   self._score)
        trips = self.guards.check_batch(sources, texts) if self.check_guards else [[] for _ in texts]
        if self.guards_on:
            dets = [self._guarded(d, t) for d, t in zip(dets, trips)]
        scores = [float(s) for s in (full if cfg.mode == "r3hf" else [d.score for d in dets])]
        if self.guards_on and dense is not None:  # an R3HF-spread score: its floor's difference on the final token
            lift = [min(s, self.scorer_floor) - s if t else 0.0 for s, t in zip(full, trips)]
            dense = [list(r[:-1]) + [r[-1] + d] if r and d else r for r, d in zip(dense, lift)]
            if cfg.mode == "r3hf":
                scores = [s + d for s, d in zip(scores, lift)]
        elif self.guards_on and cfg.mode == "hybrid" and self.scorer is not None:  # another scorer's, on the last
            sentence = [min(s, self.scorer_floor) if t else s for s, t in zip(sentence, trips)]
        tripped = [sorted({t.guard for t in row}) for row in trips]
        if offsets is None:
            return RewardOutput(texts, dets, scores, None, None, tripped)

        rewards, spans = [], []
        as_token = dataclasses.replace(cfg, mode="token") if span_rewards else cfg
        for i, (det, text, offs, sent) in enumerate(zip(dets, texts, offsets, sentence)):
            if not offs:
                rewards.append([])
                spans.append([])
                continue
            r = list(dense[i]) if cfg.mode == "r3hf" else token_rewards(det, text, offs, cfg, sentence_score=sent)
            if dense is not None and cfg.mode == "hybrid":
                r = [a + cfg.hybrid_weight * b for a, b in zip(r, dense[i])]
            # a guard that covers nothing (empty, too short): the critical penalty on the final token
            final = self.critical if self.guards_on and any(t.end <= t.start for t in trips[i]) else 0.0
            if final and cfg.mode in ("token", "hybrid"):
                r[-1] += final
            rewards.append(self._scaled(r))
            if span_rewards:
                s = r if cfg.mode == "token" else token_rewards(det, text, offs, as_token)
                if final and cfg.mode != "token":
                    s[-1] += final
                spans.append(self._scaled(s))
        return RewardOutput(texts, dets, scores, token_ids, rewards, tripped, spans if span_rewards else None)

    def _scaled(self, rewards: list[float]) -> list[float]:
        return (np.asarray(rewards, dtype=np.float32) * np.float32(self.config.scale)).tolist()  # float32, as trained

    def _guarded(self, det: Detection, trips: list[Trip]) -> Detection:
        """``det`` with the tripped guards applied: a critical span over what each covers, and the score floored
        (a guard that covers nothing puts its penalty on the final token: ``__call__``)."""
        if not trips:
            return det
        spans = det.spans + [ErrorSpan(t.start, t.end, "critical", f"guard/{t.guard}") for t in trips if t.end > t.start]
        return dataclasses.replace(det, spans=sorted(spans, key=lambda s: (s.start, s.end)),
                                   score=min(det.score, self.floor))
