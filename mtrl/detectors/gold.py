"""The ``gold`` detector: error spans given in the input (human MQM annotations).

Used to replay human judgements (``mtrl score --detector gold``) and for oracle
experiments, where a table of annotated (source, hypothesis) pairs stands in
for a model. The annotations are read by :func:`mtrl.translations.read_translations`:
JSON lines as in ``shared/data/mqm`` (``error_spans`` as a list of ``{start, end,
severity, category?}``, offsets into the hypothesis), or Google's MQM TSV.

The sentence score is the summed span values under the ``wmt-mqm`` severity map
(an MQM score: 0 is perfect, lower is worse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtrl.detectors.base import Detection, Detector
from mtrl.detectors.spans import SEVERITY_MAPS, ErrorSpan, SpanError, check_spans_inside, sanitize_spans
from mtrl.errors import MtrlError
from mtrl.translations import read_translations, translation_row


def gold_detection(hypothesis: str, spans: Sequence[ErrorSpan]) -> Detection:
    """Detection of annotated spans, scored as -(WMT MQM penalty)."""
    return Detection(sanitize_spans(hypothesis, spans), float(SEVERITY_MAPS["wmt-mqm"].penalty(spans)))


def parse_spans(raw: Any, hypothesis: str, where: str) -> list[ErrorSpan]:
    """Validate the error spans of one row (``where`` names the row in errors)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise MtrlError(f"{where}: its error spans must be a list")
    try:
        spans = [ErrorSpan.from_dict(d) for d in raw]
        check_spans_inside(hypothesis, spans)
    except SpanError as e:
        raise MtrlError(f"{where}: {e}") from None
    return spans


class GoldDetector(Detector):
    """Looks up annotated spans by (source, hypothesis); the first annotation of a pair wins."""

    name = "gold"
    worst_score = -25.0  # MQM scores have no lower bound; WMT caps a segment at -25

    def __init__(self, path: str | Path | None = None, rows: Sequence[Mapping[str, Any]] | None = None):
        if path is None and rows is None:
            raise MtrlError("the gold detector needs annotated data: give a file of annotated rows (path)")
        where = str(path or "gold rows")
        given = [translation_row(dict(r), f"{where}: row {i}") for i, r in enumerate(rows or [], 1)]
        self.table: dict[tuple[str, str], list[ErrorSpan]] = {}
        for i, row in enumerate(given + (read_translations(path) if path is not None else []), 1):
            spans = parse_spans(row.get("spans"), row["mt"], f"{where}: row {i}")
            self.table.setdefault((row["src"] or "", row["mt"]), spans)

    def detect(self, sources, hypotheses, references=None) -> list[Detection]:
        out = []
        for i, (src, hyp) in enumerate(zip(sources, hypotheses)):
            spans = self.table.get((src or "", hyp))
            if spans is None:
                raise MtrlError(f"gold detector: no annotation for row {i + 1} (hypothesis {hyp[:40]!r})")
            out.append(gold_detection(hyp, spans))
        return out
