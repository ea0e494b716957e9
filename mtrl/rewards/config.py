"""The ``reward:`` section of a recipe: one schema, one list of allowed values.

``mtrl train``, ``mtrl score``, ``mtrl label`` and every algorithm read the same
:class:`RewardConfig`; the allowed values below are the only copy (the recipe
validator, :func:`mtrl.schema.build`, reads the ``Literal`` types and ranges; the
command line reads :func:`allowed`). Build one from a mapping with
:meth:`RewardConfig.from_dict`, which checks it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from mtrl.detectors.spans import SeverityMap, get_severity_map
from mtrl.rewards.guards import GuardConfig
from mtrl.schema import Range, build

RewardMode = Literal["token", "sentence", "hybrid", "r3hf"]
TokenRewardMode = Literal["max", "spread"]
ScorerName = Literal["detector", "chrf", "bleu", "comet"]
R3HFLevel = Literal["token", "word"]
HybridSentence = Literal["last", "r3hf"]
SeverityPreset = Literal["xcomet", "wmt-mqm"]  # the names of mtrl.detectors.spans.SEVERITY_MAPS


@dataclass
class SeverityValues:
    """A custom ``reward.severity_map``: the reward of one span of each severity (penalties are negative)."""

    minor: Annotated[float, Range()]
    major: Annotated[float, Range()]
    critical: Annotated[float, Range()]


@dataclass
class RewardConfig:
    """How scores and spans become per-token rewards.

    ``mode``: ``token`` (span penalties on the tokens they cover, omissions on the last token),
    ``sentence`` (the detector's score on the last token), ``hybrid`` (span penalties +
    ``hybrid_weight`` x a sentence score: the detector's, or ``scorer``'s, on the last token or spread
    by R3HF with ``hybrid_sentence: r3hf``), ``r3hf`` (``scorer``'s score differences of successive
    prefixes). ``scale`` multiplies every reward (e.g. 0.1 brings -10 penalties near the KL scale).
    ``cache_size``: the most entries each of the rewarder's caches keeps (detections, sentence scores,
    R3HF prefix scores), the least recently used dropped first; 0 keeps none. It changes no reward.
    ``guards``: checks for output a reference-free reward overrates (:mod:`mtrl.rewards.guards`).
    """

    mode: RewardMode = "token"
    severity_map: SeverityPreset | SeverityValues = "xcomet"
    token_rewards: TokenRewardMode = "max"
    no_error: Annotated[float, Range()] = 0.0
    hybrid_weight: Annotated[float, Range(ge=0)] = 1.0
    scale: Annotated[float, Range(gt=0)] = 1.0
    scorer: ScorerName = "detector"  # r3hf: scored on every prefix; hybrid: the sentence score added
    scorer_model: str | None = None  # scorer comet: hub id or local checkpoint
    r3hf_level: R3HFLevel = "token"  # prefixes at every token, or only at word ends (cheaper)
    hybrid_sentence: HybridSentence = "last"
    cache_size: Annotated[int, Range(ge=0)] = 100_000  # entries per cache (detections, scores, prefix scores)
    guards: GuardConfig = field(default_factory=GuardConfig)

    def severity(self) -> SeverityMap:
        """The severity map with ``no_error`` applied."""
        smap = self.severity_map
        return get_severity_map(dataclasses.asdict(smap) if isinstance(smap, SeverityValues) else smap,
                                no_error=self.no_error)

    @property
    def uses_scorer(self) -> bool:
        """Whether a sentence scorer other than the detector's own score is needed."""
        return self.mode == "r3hf" or (self.mode == "hybrid" and
                                       (self.scorer != "detector" or self.hybrid_sentence == "r3hf"))

    @property
    def uses_detector(self) -> bool:
        """Whether a detector is needed: everything but R3HF of another scorer's score (chrF, BLEU, COMET)."""
        return not (self.mode == "r3hf" and self.scorer != "detector")

    @property
    def redistributes(self) -> bool:
        """Whether a sentence score is spread over the tokens by R3HF."""
        return self.mode == "r3hf" or (self.mode == "hybrid" and self.hybrid_sentence == "r3hf")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RewardConfig:
        """Build from a mapping, checked as the recipe's ``reward:`` section is (one-line ``MtrlError``)."""
        return build(cls, d or {}, "reward")


def allowed(key: str) -> tuple[str, ...]:
    """The allowed values of a ``reward`` key with a fixed set of values (empty for free-form keys)."""
    tp = typing.get_type_hints(RewardConfig).get(key)
    return tuple(typing.get_args(tp)) if typing.get_origin(tp) is Literal else ()
