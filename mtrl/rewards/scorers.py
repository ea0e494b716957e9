"""Sentence scorers: one number per (source, hypothesis, reference), higher is better.

The registry behind ``reward.scorer``: ``chrf`` and ``bleu`` (sacrebleu's sentence
chrF / BLEU, 0-100, computed once in :mod:`mtrl.detectors.metric`), ``detector``
(a detector's own sentence score) and ``comet`` (a COMET-DA, COMET-Kiwi or
xCOMET checkpoint, run by :mod:`mtrl.comet`). A scorer returns **scores**;
:class:`mtrl.rewards.Rewarder` turns them into rewards.
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
    worst_score = 0.0  # the floor of a hypothesis that trips a reward guard (chrF, BLEU, COMET: 0)

    def score(self, sources: Sequence[str], hypotheses: Sequence[str],
              references: Sequence[str | None] | None) -> list[float]:
        raise NotImplementedError


class DetectorScorer(SentenceScorer):
    """A detector's sentence score (also how chrF and BLEU are scored: their "detectors" have no spans)."""

    def __init__(self, detector: Detector):
        self.detector, self.name = detector, detector.name
        self.needs_reference, self.worst_score = detector.needs_reference, detector.worst_score

    def score(self, sources, hypotheses, references) -> list[float]:
        return [d.score for d in self.detector.detect(sources, hypotheses, references)]


class CometScorer(SentenceScorer):
    """A COMET model's segment scores (e.g. Unbabel/wmt22-comet-da, a CometKiwi or xCOMET checkpoint).

    Loaded once and kept on ``device`` in ``dtype`` (the detector's choices: auto = this process's
    GPU in fp16, or the CPU in fp32). Rows with a reference and rows without are scored apart; a
    model that needs references (COMET-DA) refuses rows without one.
    """

    def __init__(self, model: str, batch_size: int = 16, device: str = "auto", dtype: str = "auto",
                 max_tokens: int = 8192):
        from mtrl.comet import RegressionMetric, load_comet, place, resolve_device, resolve_dtype

        dev = resolve_device(device, "comet device")
        self.name, self.batch_size, self.max_tokens = "comet", batch_size, max_tokens
        self.model = place(load_comet(model), dev, resolve_dtype(dtype, dev, "comet dtype"))
        self.needs_reference = isinstance(self.model, RegressionMetric)

    def score(self, sources, hypotheses, references) -> list[float]:
        from mtrl.comet import predict

        refs = list(references) if references is not None else [None] * len(sources)
        if self.needs_reference and not all(refs):
            raise MtrlError("comet: this COMET model (regression_metric) needs a reference for every row")
        scores: list[float] = [0.0] * len(sources)
        for with_ref in (True, False):
            idx = [i for i, r in enumerate(refs) if bool(r) == with_ref]
            rows = [{"src": sources[i], "mt": hypotheses[i]} | ({"ref": refs[i]} if with_ref else {}) for i in idx]
            for i, row in zip(idx, predict(self.model, rows, self.batch_size, self.max_tokens), strict=True):
                scores[i] = row.score
        return scores


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
