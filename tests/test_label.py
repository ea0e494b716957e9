"""``mtrl label``: labelled offline data, resumable, de-duplicated, bad rows kept out with a reason."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtrl.detectors.reference import ReferenceDetector
from mtrl.label import label, sample_rows
from mtrl.translations import read_translations
from tests.fixtures.labels import TSV, read, rewarder
from tests.fixtures.tokenizers import get_tokenizer


def test_label_tsv_outputs(tmp_path):
    (tmp_path / "sys.tsv").write_text(TSV)
    rows = read_translations(tmp_path / "sys.tsv")
    assert len(rows) == 6 and {r["system"] for r in rows} == {"A", "B"}
    out = tmp_path / "out" / "labelled.jsonl"
    counts = label(rows, out, rewarder(get_tokenizer("unigram")), progress=False)
    # 6 rows: one empty hypothesis (rejected), one exact duplicate ("Eine Katze 12." for both systems)
    assert counts == {"labelled": 4, "reused": 0, "duplicates": 1, "rejected": 1, "rows": 4}
    got = read(out)
    assert len(got) == 4 and all(len(r["token_ids"]) == len(r["token_rewards"]) == len(r["tokens"]) for r in got)
    bad = next(r for r in got if r["mt"] == "Eine Katze 12.")
    assert any(s["text"] == "12" for s in bad["spans"]) and min(bad["token_rewards"]) < 0
    rejected = read(tmp_path / "out" / "labelled.rejected.jsonl")
    assert rejected[0]["reason"] == "empty hypothesis" and rejected[0]["row"] == 5
    from datasets import load_dataset

    table = load_dataset("parquet", data_files=str(out.with_suffix(".parquet")), split="train")
    assert table.num_rows == 4 and table[0]["mt"] == got[0]["mt"]
    assert not out.with_name(out.name + ".partial").exists()


def test_over_length_and_missing_reference_are_rejected(tmp_path):
    rows = [{"src": "x", "mt": "ein " * 50, "ref": "ein"}, {"src": "y", "mt": "zwei", "ref": None},
            {"src": "z", "mt": "drei", "ref": "drei"}]
    counts = label(rows, tmp_path / "o.jsonl", rewarder(get_tokenizer("unigram")), max_tokens=20,
                   progress=False)
    assert counts["rejected"] == 2 and counts["rows"] == 1
    reasons = [r["reason"] for r in read(tmp_path / "o.rejected.jsonl")]
    assert reasons[0].startswith("over-length: ") and reasons[1] == "missing reference"


def test_resume_after_a_crash_skips_finished_chunks(tmp_path, monkeypatch):
    rows = [{"src": f"s{i}", "mt": f"Satz {i}", "ref": f"Satz {i + 1}"} for i in range(10)]
    out = tmp_path / "o.jsonl"
    calls = []
    real = ReferenceDetector.detect

    def crashing(self, sources, hypotheses, references=None):
        calls.append(len(hypotheses))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, sources, hypotheses, references)

    monkeypatch.setattr(ReferenceDetector, "detect", crashing)
    with pytest.raises(KeyboardInterrupt):
        label(rows, out, rewarder(), chunk_size=4, progress=False)
    assert not out.exists() and len(read(out.with_name("o.jsonl.partial"))) == 4  # nothing half-written
    calls.clear()
    monkeypatch.setattr(ReferenceDetector, "detect", real)
    counts = label(rows, out, rewarder(), chunk_size=4, progress=False)
    assert counts["reused"] == 4 and counts["labelled"] == 6 and len(read(out)) == 10
    assert [r["mt"] for r in read(out)] == [r["mt"] for r in rows]  # input order kept


def loader(path, src_lang: str = "English", tgt_lang: str = "German"):
    from mtrl.policy import PolicyConfig, build_policy

    return lambda: build_policy(PolicyConfig(model=str(path)), str(path), src_lang, tgt_lang)


def test_sample_rows_from_a_policy(tiny_seq2seq):
    rows = sample_rows(loader(tiny_seq2seq), [("A man.", "Ein Mann."), ("A dog.", "Ein Hund.")], samples=3,
                       max_new_tokens=5, progress=False)
    assert len(rows) == 6 and [r["sample"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert all(r["ref"] in ("Ein Mann.", "Ein Hund.") and isinstance(r["mt"], str) for r in rows)
    assert all(isinstance(r["token_ids"], list) and 1 <= len(r["token_ids"]) <= 5 for r in rows)


def test_labelled_samples_carry_the_sampled_token_ids(tiny_seq2seq, tmp_path):
    """Labelling rewards the ids that were sampled, not the hypothesis re-encoded."""
    from mtrl.score import load_tokenizer

    pairs = [("A man rides a bike.", "Ein Mann fährt Fahrrad."), ("Two dogs play.", "Zwei Hunde spielen.")]
    rows = sample_rows(loader(tiny_seq2seq), pairs, samples=3, max_new_tokens=8, progress=False)
    tok = load_tokenizer(str(tiny_seq2seq))
    out = tmp_path / "l.jsonl"
    counts = label(rows, out, rewarder(tok), progress=False)
    got = read(out)
    assert counts["rows"] == len(got) >= 1
    sampled: dict[tuple, list[int]] = {}
    for r in rows:  # a repeated (src, mt, ref) row is labelled once, as its first occurrence
        sampled.setdefault((r["src"], r["mt"], r["ref"]), r["token_ids"])
    for r in got:
        assert r["token_ids"] == sampled[(r["src"], r["mt"], r["ref"])]
        assert len(r["token_rewards"]) == len(r["token_ids"]) == len(r["tokens"])


def test_cli_label_passes_the_languages_to_sampling(tiny_causal, small_data, tmp_path, monkeypatch):
    import mtrl.label
    from mtrl.cli import main

    seen = {}
    real = mtrl.label.sample_rows

    def spy(load_policy, *args, **kwargs):
        seen.update(kwargs, policy=load_policy())
        return real(lambda: seen["policy"], *args, **kwargs)

    monkeypatch.setattr(mtrl.label, "sample_rows", spy)
    out = tmp_path / "l.jsonl"
    assert main(["label", "--policy", str(tiny_causal), "--data", str(small_data[0]), "--max-sources", "2",
                 "--samples", "1", "--max-new-tokens", "4", "--src-lang", "French", "--tgt-lang", "Spanish",
                 "--output", str(out), "--quiet"]) == 0
    policy = seen["policy"]
    assert (policy.src_lang, policy.tgt_lang) == ("French", "Spanish")
    assert seen["policy_id"] == {"model": str(tiny_causal), "src_lang": "French", "tgt_lang": "Spanish"}
    prompt = policy.tokenizer.decode(policy.encode_sources(["Un chat dort."])[0][0])  # what was sampled from
    assert "French" in prompt and "Spanish" in prompt and "English" not in prompt and "German" not in prompt
    assert all(len(r["token_rewards"]) == len(r["token_ids"]) for r in read(out))
    seen.clear()
    assert main(["label", "--policy", str(tiny_causal), "--data", str(small_data[0]), "--max-sources", "1",
                 "--samples", "1", "--max-new-tokens", "2", "--output", str(tmp_path / "d.jsonl"), "--quiet"]) == 0
    assert (seen["policy"].src_lang, seen["policy"].tgt_lang) == ("English", "German")  # the defaults


def test_cli_label_and_its_errors(tmp_path):
    (tmp_path / "sys.tsv").write_text(TSV)
    cmd = [sys.executable, "-m", "mtrl.cli", "label"]
    ok = subprocess.run(cmd + ["--input", str(tmp_path / "sys.tsv"), "--output", str(tmp_path / "l.jsonl"),
                               "--quiet"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "4 rows in" in ok.stderr and "1 rejected" in ok.stderr
    bad = subprocess.run(cmd + ["--output", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("mtrl: error: give either --input")
