"""What every error-span detector returns, and the interface it implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from mtrl.detectors.spans import ErrorSpan

DEFAULT_XCOMET = "Unbabel/XCOMET-XL"  # the detector of Ramos et al. (2024)


@dataclass
class Detection:
    """Spans (sanitised, offsets into the hypothesis) and a sentence score (higher is better)."""

    spans: list[ErrorSpan]
    score: float
    truncated: bool = False  # the input was cut (e.g. xCOMET's 512-subword limit)
    # Penalty (<= 0) for content the hypothesis leaves out: it has no span, so token-level reward modes put it
    # on the final token (the decision to stop); it is already part of ``score``.
    omission_penalty: float = 0.0
    extra: dict = field(default_factory=dict)


class Detector(ABC):
    """Marks error spans in batches of (source, hypothesis, optional reference)."""

    name: str = "detector"
    needs_reference: bool = False
    # the lowest sentence score: what a hypothesis that trips a reward guard scores (mtrl.rewards.guards)
    worst_score: float = 0.0

    @abstractmethod
    def detect(
        self,
        sources: Sequence[str],
        hypotheses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> list[Detection]:
        """One :class:`Detection` per hypothesis, in input order."""

    def load(self) -> object:
        """Load the detector's model now, so that a missing checkpoint fails before the run starts; a detector
        without a model has nothing to load."""
        return None
