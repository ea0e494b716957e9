"""Sentence scorers: one number per (source, hypothesis, reference), higher is better.

The registry behind ``reward.scorer``: ``chrf`` and ``bleu`` (sacrebleu's sentence
chrF / BLEU, 0-100, computed once in :mod:`mtrl.detectors.metric`), ``detector``
(a detector's own sentence score) and ``comet`` (any COMET model through
``unbabel-comet``). A scorer returns **scores**; :class:`mtrl.rewards.Rewarder`
turns them into rewards.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtrl.detectors import Detector, load_detector
from mtrl.errors import MtrlError
from mtrl.rewards.config import allowed


class SentenceScorer:
    """Scores (source, hypothesis, reference) rows; higher is better."""

    name = "scorer"
    needs_reference = False

    def score(self, sources: Sequence[str], hypotheses: Sequence[str],
              references: Sequence[str | None] | None) -> list[float]:
        raise NotImplementedError


class DetectorScorer(SentenceScorer):
    """A detector's sentence score (also how chrF and BLEU are scored: their "detectors" have no spans)."""

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
    """The scorer ``name`` (one of ``reward.scorer``'s allowed values)."""
    if name in ("chrf", "bleu"):
        return DetectorScorer(load_detector(name))
    if name == "detector":
        if detector is None:
            raise MtrlError("the detector scorer needs a detector")
        return DetectorScorer(detector)
    if name == "comet":
        if not model:
            raise MtrlError("the comet scorer needs a model (reward.scorer_model: hub id or local checkpoint)")
        return CometScorer(model, batch_size)
    raise MtrlError(f"unknown scorer {name!r}; allowed: {', '.join(allowed('scorer'))}")
