"""R3HF / RED reward redistribution (Li et al., arXiv 2411.08302): dense rewards from a sentence scorer.

Token t of a hypothesis y gets the change in a sentence-level score S when it is
appended:

    r_t = S(x, y_{<=t}) - S(x, y_{<t}),   so   sum_t r_t = S(x, y) - S(x, "")

(the rewards telescope). Prefixes follow the policy's own tokens: the prefix
after token t is ``text[:b_t]`` with b_t the end of the furthest token interval
so far (:mod:`mtrl.rewards.alignment`); tokens that add no character (special tokens,
partial UTF-8 bytes before the byte that completes a character) get 0, and the
last token's prefix is the whole text, so the identity above is exact. With
``level="word"`` S is evaluated only at word ends (a word = a run of
non-whitespace) and each word's difference is spread over the tokens that
overlap it in proportion to overlapped characters: T calls per hypothesis
become (number of words) calls.

All prefixes of a batch are scored in one call to the scorer
(:mod:`mtrl.rewards.scorers`), through a cache keyed by (source, prefix,
reference), so the empty prefix and repeated prefixes are scored once; the cache keeps
the ``cache_size`` most recently used prefixes (:class:`mtrl.rewards.cache.LRUCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mtrl.errors import MtrlError
from mtrl.rewards.cache import LRUCache
from mtrl.rewards.config import allowed
from mtrl.rewards.scorers import SentenceScorer

LEVELS = allowed("r3hf_level")


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
    """Turns sentence scores of prefixes into per-token rewards, with a prefix-score cache.

    ``cache_size``: the most prefix scores kept (least recently used dropped first; 0 keeps none).
    ``score``: what scores rows, ``scorer.score`` by default (the rewarder passes one that retries a
    batch the detector ran out of memory on in halves).
    """

    def __init__(self, scorer: SentenceScorer, level: str = "token", cache_size: int = 100_000,
                 score: Callable[..., Sequence[float]] | None = None):
        if level not in LEVELS:
            raise MtrlError(f"r3hf level: unknown value {level!r}; allowed: {', '.join(LEVELS)}")
        self.scorer, self.level = scorer, level
        self.score = score or scorer.score
        self.cache = LRUCache(cache_size)

    def _compute(self, todo: list[tuple[str, str, str | None]]) -> Sequence[float]:
        srcs, hyps, refs = (list(x) for x in zip(*todo))
        refs_arg = None if all(r is None for r in refs) else refs
        if self.scorer.needs_reference and refs_arg is None:
            raise MtrlError(f"the {self.scorer.name} scorer needs references")
        return self.score(srcs, hyps, refs_arg)

    def __call__(self, sources: Sequence[str], texts: Sequence[str], offsets: Sequence[Sequence[tuple[int, int]]],
                 references: Sequence[str | None] | None = None) -> tuple[list[list[float]], list[float]]:
        """Per-token rewards for each hypothesis, and each full hypothesis' score."""
        refs = list(references) if references is not None else [None] * len(texts)
        cuts = [prefix_boundaries(t, o) if self.level == "token" else word_ends(t) for t, o in zip(texts, offsets)]
        keys = [(s, t[:c], r) for s, t, r, cs in zip(sources, texts, refs, cuts) for c in [0, *cs, len(t)]]
        scored = dict(zip(keys, self.cache.get_many(keys, self._compute)))  # this batch's, whatever the cache keeps
        rewards, full = [], []
        for s, t, r, o, cs in zip(sources, texts, refs, offsets, cuts):
            score = [scored[(s, t[:c], r)] for c in [0, *cs]]
            diffs = [b - a for a, b in zip(score, score[1:])]
            if self.level == "token":
                rewards.append(diffs)
            else:
                rewards.append(spread_words(t, o, cs, diffs))
            full.append(scored[(s, t, r)])
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
