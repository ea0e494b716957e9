"""R3HF / RED reward redistribution (Li et al., arXiv 2411.08302): dense rewards from a sentence scorer.

Token t of a hypothesis y gets the change in a sentence-level score S when it is
appended:

    r_t = S(x, y_{<=t}) - S(x, y_{<t}),   so   sum_t r_t = S(x, y) - S(x, "")

(the rewards telescope). Prefixes follow the policy's own tokens: the prefix
after token t is ``text[:b_t]`` with b_t the end of the furthest token interval
so far (:mod:`mtrl.alignment`); tokens that add no character (special tokens,
partial UTF-8 bytes before the byte that completes a character) get 0, and the
last token's prefix is the whole text, so the identity above is exact. With
``level="word"`` S is evaluated only at word ends (a word = a run of
non-whitespace) and each word's difference is spread over the tokens that
overlap it in proportion to overlapped characters: T calls per hypothesis
become (number of words) calls.

All prefixes of a batch are scored in one call to the scorer, through a cache
keyed by (source, prefix, reference), so the empty prefix and repeated prefixes
are scored once.

Scorers (higher is better, each in its own scale): ``chrf`` and ``bleu``
(sacrebleu's sentence-level chrF / BLEU, 0-100, identical to ``sentence_chrf`` /
``sentence_bleu``), ``detector`` (a detector's sentence score), ``comet`` (any
COMET model's score through ``unbabel-comet``).
"""

from __future__ import annotations

from collections.abc import Sequence

from mtrl.detectors.base import Detector
from mtrl.errors import MtrlError

SCORERS = ("detector", "chrf", "bleu", "comet")
LEVELS = ("token", "word")


class SentenceScorer:
    """Scores (source, hypothesis, reference) rows; higher is better."""

    name = "scorer"
    needs_reference = False

    def score(self, sources: Sequence[str], hypotheses: Sequence[str],
              references: Sequence[str | None] | None) -> list[float]:
        raise NotImplementedError


class SacrebleuScorer(SentenceScorer):
    """Sentence chrF or BLEU with sacrebleu's defaults (the numbers of ``sentence_chrf``/``sentence_bleu``)."""

    needs_reference = True

    def __init__(self, metric: str):
        from sacrebleu.metrics import BLEU, CHRF

        self.name = metric
        self.metric = CHRF() if metric == "chrf" else BLEU(effective_order=True)

    def score(self, sources, hypotheses, references) -> list[float]:
        return [self.metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]


class DetectorScorer(SentenceScorer):
    def __init__(self, detector: Detector):
        self.detector, self.name = detector, detector.name
        self.needs_reference = detector.needs_reference

    def score(self, sources, hypotheses, references) -> list[float]:
        return [d.score for d in self.detector.detect(sources, hypotheses, references)]


class CometScorer(SentenceScorer):
    """A COMET model's segment scores (e.g. Unbabel/wmt22-comet-da, a CometKiwi or xCOMET checkpoint)."""

    def __init__(self, model: str, batch_size: int = 16, gpus: int | None = None):
        from mtrl.detectors.xcomet import _quiet, load_comet_checkpoint, resolve_checkpoint

        self.name, self.batch_size, self._quiet = "comet", batch_size, _quiet
        with _quiet():
            self.model = load_comet_checkpoint(resolve_checkpoint(model))
        if gpus is None:
            import torch

            gpus = 1 if torch.cuda.is_available() else 0
        self.gpus = gpus

    def score(self, sources, hypotheses, references) -> list[float]:
        rows = [{"src": s, "mt": h, **({"ref": r} if r else {})}
                for s, h, r in zip(sources, hypotheses, references or [None] * len(sources))]
        with self._quiet():
            out = self.model.predict(rows, batch_size=self.batch_size, gpus=self.gpus, progress_bar=False)
        return [float(x) for x in out.scores]


def load_scorer(name: str, detector: Detector | None = None, model: str | None = None,
                batch_size: int = 16) -> SentenceScorer:
    if name in ("chrf", "bleu"):
        return SacrebleuScorer(name)
    if name == "detector":
        if detector is None:
            raise MtrlError("the detector scorer needs a detector")
        return DetectorScorer(detector)
    if name == "comet":
        if not model:
            raise MtrlError("the comet scorer needs a model (hub id or local checkpoint)")
        return CometScorer(model, batch_size)
    raise MtrlError(f"unknown scorer {name!r}; allowed: {', '.join(SCORERS)}")


def prefix_boundaries(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the end of the prefix it completes (monotone; the last one is len(text))."""
    out, b = [], 0
    for _, end in offsets:
        b = max(b, end)
        out.append(b)
    if out:
        out[-1] = len(text)
    return out


def word_ends(text: str) -> list[int]:
    """End offsets of the whitespace-separated words of ``text``."""
    ends = [i + 1 for i, ch in enumerate(text) if not ch.isspace() and (i + 1 == len(text) or text[i + 1].isspace())]
    return ends


class Redistributor:
    """Turns sentence scores of prefixes into per-token rewards, with a prefix-score cache."""

    def __init__(self, scorer: SentenceScorer, level: str = "token"):
        if level not in LEVELS:
            raise MtrlError(f"r3hf level: unknown value {level!r}; allowed: {', '.join(LEVELS)}")
        self.scorer, self.level = scorer, level
        self.cache: dict[tuple[str, str, str | None], float] = {}

    def _score_all(self, keys: list[tuple[str, str, str | None]]) -> None:
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            srcs, hyps, refs = (list(x) for x in zip(*todo))
            refs_arg = None if all(r is None for r in refs) else refs
            if self.scorer.needs_reference and refs_arg is None:
                raise MtrlError(f"the {self.scorer.name} scorer needs references")
            self.cache.update(zip(todo, self.scorer.score(srcs, hyps, refs_arg)))

    def __call__(self, sources: Sequence[str], texts: Sequence[str], offsets: Sequence[Sequence[tuple[int, int]]],
                 references: Sequence[str | None] | None = None) -> tuple[list[list[float]], list[float]]:
        """Per-token rewards for each hypothesis, and each full hypothesis' score."""
        refs = list(references) if references is not None else [None] * len(texts)
        cuts = [prefix_boundaries(t, o) if self.level == "token" else word_ends(t) for t, o in zip(texts, offsets)]
        keys = [(s, t[:c], r) for s, t, r, cs in zip(sources, texts, refs, cuts) for c in [0, *cs, len(t)]]
        self._score_all(keys)
        rewards, full = [], []
        for s, t, r, o, cs in zip(sources, texts, refs, offsets, cuts):
            score = [self.cache[(s, t[:c], r)] for c in [0, *cs]]
            diffs = [b - a for a, b in zip(score, score[1:])]
            if self.level == "token":
                rewards.append(diffs)
            else:
                rewards.append(spread_words(t, o, cs, diffs))
            full.append(self.cache[(s, t, r)])
        return rewards, full


def spread_words(text: str, offsets: Sequence[tuple[int, int]], ends: list[int], diffs: list[float]) -> list[float]:
    """Give each word's score difference to the tokens overlapping it, in proportion to overlapped characters.

    A word runs from the previous word's end to its own end (leading whitespace included, so
    every character belongs to a word). A word no token overlaps goes to the last token.
    """
    out = [0.0] * len(offsets)
    prev = 0
    for end, value in zip(ends, diffs):
        overlaps = [(i, min(b, end) - max(a, prev)) for i, (a, b) in enumerate(offsets) if min(b, end) > max(a, prev)]
        total = sum(n for _, n in overlaps)
        if total:
            for i, n in overlaps:
                out[i] += value * n / total
        elif out:
            out[-1] += value
        prev = end
    return out


def r3hf_rewards(scorer: SentenceScorer, sources: Sequence[str], texts: Sequence[str],
                 offsets: Sequence[Sequence[tuple[int, int]]], references: Sequence[str | None] | None = None,
                 level: str = "token") -> tuple[list[list[float]], list[float]]:
    """One-shot :class:`Redistributor` call (no cache kept)."""
    return Redistributor(scorer, level)(sources, texts, offsets, references)


