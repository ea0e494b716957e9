"""The ``gold`` detector: error spans given in the input (human MQM annotations).

Used to replay human judgements (``mtrl score --detector gold``) and for oracle
experiments, where a table of annotated (source, hypothesis) pairs stands in
for a model. Two input formats:

* JSON lines as in ``shared/data/mqm`` (and COMET's names): ``source``/``src``,
  ``hypothesis``/``mt``, optional ``reference``/``ref``, ``error_spans`` as a list
  of ``{start, end, severity, category?}``; offsets into the hypothesis.
* Google's MQM TSV (github.com/google/wmt-mqm-human-evaluation): one row per
  error with columns ``system doc doc_id seg_id rater source target category
  severity``; the error's stretch is marked ``<v>...</v>`` in the target. Rows
  are grouped per (system, doc, seg_id). ``No-error`` rows give no span,
  ``Neutral`` errors weigh 0 in WMT's scheme and are skipped, errors marked in
  the source (omissions) have no hypothesis stretch and are skipped. Where
  several raters rated a segment, the first rater in file order is kept (the
  spans of different raters would double count). The reference is the target
  of the segment's ``ref`` system row when the file has one.

The sentence score is the summed span values under the ``wmt-mqm`` severity map
(an MQM score: 0 is perfect, lower is worse).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtrl.detectors.base import Detection, Detector
from mtrl.detectors.spans import SEVERITY_MAPS, ErrorSpan, SpanError, check_spans_inside, sanitize_spans
from mtrl.errors import MtrlError
from mtrl.io import read_jsonl, read_lines

MQM_TSV_COLUMNS = ("system", "doc", "doc_id", "seg_id", "rater", "source", "target", "category", "severity")


def gold_detection(hypothesis: str, spans: Sequence[ErrorSpan]) -> Detection:
    """Detection of annotated spans, scored as -(WMT MQM penalty)."""
    return Detection(sanitize_spans(hypothesis, spans), float(SEVERITY_MAPS["wmt-mqm"].penalty(spans)))


def parse_spans(raw: Any, hypothesis: str, where: str) -> list[ErrorSpan]:
    """Validate the ``error_spans`` of one row (``where`` names the row in errors)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise MtrlError(f"{where}: 'error_spans' must be a list")
    try:
        spans = [ErrorSpan.from_dict(d) for d in raw]
        check_spans_inside(hypothesis, spans)
    except SpanError as e:
        raise MtrlError(f"{where}: {e}") from None
    return spans


def _unmark(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove ``<v>``/``</v>`` markers; return the clean text and the marked intervals."""
    out, spans, pos, start = [], [], 0, None
    i = 0
    while i < len(marked):
        if marked.startswith("<v>", i):
            start, i = pos, i + 3
        elif marked.startswith("</v>", i):
            if start is not None:
                spans.append((start, pos))
            start, i = None, i + 4
        else:
            out.append(marked[i])
            pos, i = pos + 1, i + 1
    return "".join(out), spans


def read_mqm_tsv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Google MQM TSV file, one per (system, doc, seg_id), in our JSONL shape."""
    text = "\n".join(read_lines(path))
    reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    missing = [c for c in MQM_TSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise MtrlError(f"{path}: not an MQM TSV file, missing column(s): {', '.join(missing)}")
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for lineno, r in enumerate(reader, 2):
        key = (r["system"], r["doc"], r["seg_id"])
        target, marks = _unmark(r["target"] or "")
        source, _ = _unmark(r["source"] or "")
        g = groups.setdefault(key, {"system": key[0], "doc": key[1], "seg_id": key[2], "rater": r["rater"],
                                    "source": source, "hypothesis": target, "error_spans": []})
        if r["rater"] != g["rater"]:
            continue  # keep the first rater only
        severity = (r["severity"] or "").strip().lower()
        if severity in ("no-error", "neutral", "") or not marks:
            continue
        if severity not in ("minor", "major", "critical"):
            raise MtrlError(f"{path}: line {lineno}: unknown severity {r['severity']!r}; "
                            "allowed: Minor, Major, Critical, Neutral, No-error")
        if target != g["hypothesis"]:
            raise MtrlError(f"{path}: line {lineno}: target differs from the segment's other rows")
        for start, end in marks:
            g["error_spans"].append({"start": start, "end": end, "text": target[start:end],
                                     "severity": severity, "category": r["category"]})
    refs = {(k[1], k[2]): g["hypothesis"] for k, g in groups.items() if k[0] == "ref"}
    rows = list(groups.values())
    for g in rows:
        if (g["doc"], g["seg_id"]) in refs:
            g["reference"] = refs[(g["doc"], g["seg_id"])]
    return rows


def read_gold_file(path: str | Path) -> list[dict[str, Any]]:
    """Annotated rows from a ``.tsv`` (Google MQM) or JSON-lines file."""
    return read_mqm_tsv(path) if str(path).endswith(".tsv") else read_jsonl(path)


def _field(row: Mapping[str, Any], *names: str) -> Any:
    for n in names:
        if n in row:
            return row[n]
    return None


class GoldDetector(Detector):
    """Looks up annotated spans by (source, hypothesis); the first annotation of a pair wins."""

    name = "gold"

    def __init__(self, path: str | Path | None = None, rows: Sequence[Mapping[str, Any]] | None = None):
        if path is None and rows is None:
            raise MtrlError("the gold detector needs annotated data: give a file of annotated rows (path)")
        rows = list(rows or []) + (read_gold_file(path) if path is not None else [])
        self.table: dict[tuple[str, str], list[ErrorSpan]] = {}
        for i, row in enumerate(rows, 1):
            src, hyp = _field(row, "src", "source"), _field(row, "mt", "hypothesis")
            if not isinstance(hyp, str):
                raise MtrlError(f"{path or 'gold rows'}: row {i} has no hypothesis ('mt' or 'hypothesis')")
            spans = parse_spans(row.get("error_spans"), hyp, f"{path or 'gold rows'}: row {i}")
            self.table.setdefault((src or "", hyp), spans)

    def detect(self, sources, hypotheses, references=None) -> list[Detection]:
        out = []
        for i, (src, hyp) in enumerate(zip(sources, hypotheses)):
            spans = self.table.get((src or "", hyp))
            if spans is None:
                raise MtrlError(f"gold detector: no annotation for row {i + 1} (hypothesis {hyp[:40]!r})")
            out.append(gold_detection(hyp, spans))
        return out
