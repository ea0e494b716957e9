"""Files of translations, read in one shape for every command: ``mtrl score`` and ``mtrl label`` inputs, the
gold detector's annotations and the offline algorithms' data.

A row is a dict with ``src`` and ``ref`` (None when absent), ``mt`` and, where the file gives error spans,
``spans`` (a list of ``{start, end, severity, category?}`` with offsets into ``mt``); other fields are kept.
Formats, by extension:

* ``.tsv``: Google's MQM TSV (github.com/google/wmt-mqm-human-evaluation) when it has the MQM columns (one
  row per error; ``<v>...</v>`` marks the error in the target; rows grouped per (system, doc, seg_id), the
  first rater kept; the reference from the segment's ``ref`` system row), else a WMT system-output TSV
  (``source``, ``ref_A`` and one ``hyp_<SYSTEM>`` column per system: one row per system and segment);
* ``.parquet``: a table written by ``mtrl label`` (spans stored as JSON text);
* anything else: JSON lines with ``src``/``mt``/``ref``, or COMET's ``source``/``hypothesis``/``reference``;
  spans as ``spans`` or ``error_spans``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mtrl.errors import MtrlError, one_line
from mtrl.io import read_jsonl, read_lines

MQM_TSV_COLUMNS = ("system", "doc", "doc_id", "seg_id", "rater", "source", "target", "category", "severity")


def read_translations(path: str | Path, ref_column: str = "ref_A") -> list[dict[str, Any]]:
    """The rows of a file of translations (see the module docstring); ``ref_column``: a system-output TSV's
    reference column."""
    p = Path(path)
    if not p.is_file():
        raise MtrlError(f"{path}: no such file")
    if p.suffix == ".tsv":
        header = set((read_lines(p)[:1] or [""])[0].split("\t"))
        raw = read_mqm_tsv(p) if set(MQM_TSV_COLUMNS) <= header else read_system_tsv(p, ref_column)
    elif p.suffix == ".parquet":
        raw = read_parquet(p)
    else:
        raw = read_jsonl(p)
    return [translation_row(r, f"{path}: row {i}") for i, r in enumerate(raw, 1)]


def translation_row(r: dict[str, Any], where: str) -> dict[str, Any]:
    """One row in the common shape; ``where`` names it in the one-line error for a row without a hypothesis."""
    mt = _first(r, "mt", "hypothesis")
    if not isinstance(mt, str):
        raise MtrlError(f"{where} has no text field 'mt' (or 'hypothesis')")
    row = {**r, "src": _first(r, "src", "source"), "mt": mt, "ref": _first(r, "ref", "reference")}
    for name in ("src", "ref"):
        if row[name] is not None and not isinstance(row[name], str):
            raise MtrlError(f"{where}: field '{name}' must be a string")
    spans = _first(r, "spans", "error_spans")
    if spans is not None:
        row["spans"] = spans
    return row


def _first(row: dict[str, Any], *names: str) -> Any:
    return next((row[n] for n in names if n in row), None)


def read_system_tsv(path: Path, ref_column: str = "ref_A") -> list[dict[str, Any]]:
    """A WMT-style system-output TSV: one row per (system, segment)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise MtrlError(f"{path}: cannot read as TSV ({str(e).splitlines()[0]})") from None
    systems = [c for c in df.columns if c.startswith("hyp_")]
    if "source" not in df.columns or not systems:
        raise MtrlError(f"{path}: a TSV needs the MQM columns ({' '.join(MQM_TSV_COLUMNS)}), or a 'source' "
                        "column and 'hyp_<SYSTEM>' columns (system outputs)")
    refs = df[ref_column] if ref_column in df.columns else [None] * len(df)
    return [{"src": s, "mt": h, "ref": r, "system": col[4:]}
            for col in systems for s, h, r in zip(df["source"], df[col], refs)]


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """A table written by ``mtrl label``: spans back from JSON text, arrays back to lists."""
    import pandas as pd

    try:
        rows = pd.read_parquet(path).to_dict("records")
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types; the user needs one line
        raise MtrlError(f"{path}: cannot read as Parquet ({one_line(e)})") from None
    for r in rows:
        for key in ("spans", "error_spans"):
            if isinstance(r.get(key), str):
                r[key] = json.loads(r[key])
        for key in ("token_ids", "token_rewards"):
            if key in r and hasattr(r[key], "tolist"):
                r[key] = r[key].tolist()
    return rows


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
