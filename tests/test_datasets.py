"""The parallel-data loaders (:func:`mtrl.datasets.load_parallel`): Multi30k, JSONL, TSV, text-file pairs."""

from __future__ import annotations

import gzip
import json

import pytest

from mtrl.datasets import load_parallel
from mtrl.errors import MtrlError


def test_multi30k_builtin_sizes_and_direction():
    sizes = {split: len(load_parallel("multi30k", split)) for split in ("train", "val", "test2016")}
    assert sizes == {"train": 29000, "val": 1014, "test2016": 1000}
    en_de = load_parallel("multi30k", "test2016", limit=2)
    de_en = load_parallel("multi30k", "test2016", reverse=True, limit=2)
    assert en_de[0][0] == "A man in an orange hat starring at something."
    assert en_de[0][1].startswith("Ein Mann mit einem orangefarbenen Hut")
    assert de_en == [(r, s) for s, r in en_de]


def test_multi30k_bad_split():
    with pytest.raises(MtrlError, match="test2016"):
        load_parallel("multi30k", "test")


PAIRS = [("A dog runs.", "Ein Hund rennt."), ('He said "hi".', 'Er sagte "hallo".'), ("Ünïcode ✓", "x")]


def test_jsonl_roundtrip_and_field_names(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"src": s, "ref": r, "id": i} for i, (s, r) in enumerate(PAIRS)]
    rows[1] = {"source": PAIRS[1][0], "reference": PAIRS[1][1]}  # long names work too
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert load_parallel(path) == PAIRS
    custom = tmp_path / "c.jsonl"
    custom.write_text(json.dumps({"en": "a", "de": "b"}) + "\n")
    assert load_parallel(custom, src_field="en", ref_field="de") == [("a", "b")]


def test_tsv_roundtrip_custom_columns(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("id\tsource\treference\n" + "".join(f"{i}\t{s}\t{r}\n" for i, (s, r) in enumerate(PAIRS)))
    assert load_parallel(path) == PAIRS
    assert load_parallel(path, src_field="src", ref_field="ref") == PAIRS  # aliases
    assert load_parallel(path, src_field="reference", ref_field="id")[0] == ("Ein Hund rennt.", "0")


def test_text_file_pair_roundtrip_plain_and_gz(tmp_path):
    src, ref = tmp_path / "a.en", tmp_path / "a.de.gz"
    src.write_text("".join(s + "\n" for s, _ in PAIRS), encoding="utf-8")
    with gzip.open(ref, "wt", encoding="utf-8") as f:
        f.write("".join(r + "\r\n" for _, r in PAIRS))  # CRLF line ends are removed too
    assert load_parallel((src, ref)) == PAIRS
    assert load_parallel([str(src), str(ref)], reverse=True, limit=1) == [(PAIRS[0][1], PAIRS[0][0])]


def test_loader_errors(tmp_path):
    with pytest.raises(MtrlError, match="not found|no such file"):
        load_parallel(tmp_path / "missing.jsonl")
    (tmp_path / "a.txt").write_text("1\n2\n3\n")
    (tmp_path / "b.txt").write_text("1\n2\n")
    with pytest.raises(MtrlError, match="line counts differ"):
        load_parallel((tmp_path / "a.txt", tmp_path / "b.txt"))
    (tmp_path / "bad.jsonl").write_text('{"src": "a", "ref": "b"}\n{"src": "c"}\n')
    with pytest.raises(MtrlError, match=r"bad.jsonl:2: missing field 'ref' or 'reference'"):
        load_parallel(tmp_path / "bad.jsonl")
    (tmp_path / "bad.tsv").write_text("en\tref\na\tb\n")
    with pytest.raises(MtrlError, match="no column 'src' or 'source'"):
        load_parallel(tmp_path / "bad.tsv")
    (tmp_path / "ragged.tsv").write_text("source\treference\na\tb\tc\n")
    with pytest.raises(MtrlError, match="ragged.tsv:2"):
        load_parallel(tmp_path / "ragged.tsv")
    with pytest.raises(MtrlError, match="don't know how to read"):
        load_parallel(tmp_path / "a.txt")
    with pytest.raises(MtrlError, match="split"):
        load_parallel(tmp_path / "bad.jsonl", "train")
