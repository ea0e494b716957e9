"""``bleu`` and ``chrf``: sentence-level metric "detectors" (a score, no spans).

They put a lexical metric behind the detector interface, for the BLEU-reward RL
baseline (``reward.mode: sentence`` with ``detector.name: bleu``) and for
side-by-side scoring. Scores are sacrebleu's sentence BLEU (effective order) and
chrF, 0-100, numerically those of ``sentence_bleu`` / ``sentence_chrf``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtrl.detectors.base import Detection, Detector
from mtrl.errors import MtrlError


class MetricDetector(Detector):
    needs_reference = True

    def __init__(self, metric: str = "bleu"):
        from sacrebleu.metrics import BLEU, CHRF

        if metric not in ("bleu", "chrf"):
            raise MtrlError(f"unknown metric {metric!r}; allowed: bleu, chrf")
        self.name = metric
        self.metric = BLEU(effective_order=True) if metric == "bleu" else CHRF()

    def detect(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str | None] | None = None) -> list[Detection]:
        if references is None or any(not (r or "").strip() for r in references):
            raise MtrlError(f"the {self.name} detector needs a reference for every row")
        return [Detection([], float(self.metric.sentence_score(h, [r]).score)) for h, r in zip(hypotheses, references)]
