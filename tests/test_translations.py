"""One reader of translation files for score, label, the gold detector and offline data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtrl.errors import MtrlError
from mtrl.translations import read_translations


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_comet_names_and_ours_read_the_same(tmp_path: Path):
    spans = [{"start": 4, "end": 9, "severity": "major"}]
    ours = write_jsonl(tmp_path / "a.jsonl", [{"src": "The sun.", "mt": "Die Sonne.", "ref": "Die Sonne.",
                                              "spans": spans, "system": "x"}])
    comet = write_jsonl(tmp_path / "b.jsonl", [{"source": "The sun.", "hypothesis": "Die Sonne.",
                                               "reference": "Die Sonne.", "error_spans": spans, "system": "x"}])
    (a,), (b,) = read_translations(ours), read_translations(comet)
    keys = ("src", "mt", "ref", "spans", "system")
    assert [a[k] for k in keys] == [b[k] for k in keys] == ["The sun.", "Die Sonne.", "Die Sonne.", spans, "x"]
    (plain,) = read_translations(write_jsonl(tmp_path / "c.jsonl", [{"mt": "Hallo."}]))
    assert plain["src"] is None and plain["ref"] is None and "spans" not in plain


def test_bad_rows_are_named(tmp_path: Path):
    with pytest.raises(MtrlError, match=r"b.jsonl: row 2 has no text field 'mt'"):
        read_translations(write_jsonl(tmp_path / "b.jsonl", [{"mt": "a"}, {"source": "b"}]))
    with pytest.raises(MtrlError, match=r"row 1: field 'ref' must be a string"):
        read_translations(write_jsonl(tmp_path / "c.jsonl", [{"mt": "a", "ref": 3}]))
    with pytest.raises(MtrlError, match="no such file"):
        read_translations(tmp_path / "missing.jsonl")
    bad_tsv = tmp_path / "d.tsv"
    bad_tsv.write_text("a\tb\n1\t2\n")
    with pytest.raises(MtrlError, match="a TSV needs the MQM columns"):
        read_translations(bad_tsv)


def test_system_outputs_and_parquet(tmp_path: Path):
    import pandas as pd

    tsv = tmp_path / "sys.tsv"
    tsv.write_text("source\tref_A\thyp_A\thyp_B\nA cat.\tEine Katze.\tEine Katze.\tEin Katze.\n")
    rows = read_translations(tsv)
    assert [(r["system"], r["mt"], r["ref"]) for r in rows] == [("A", "Eine Katze.", "Eine Katze."),
                                                                ("B", "Ein Katze.", "Eine Katze.")]
    table = tmp_path / "l.parquet"
    pd.DataFrame([{"src": "A cat.", "mt": "Eine Katze.", "ref": None, "spans": "[]",
                   "token_ids": [1, 2]}]).to_parquet(table)
    (row,) = read_translations(table)
    assert row["spans"] == [] and row["token_ids"] == [1, 2]
