"""Warm start (tiny config, a few steps) and the parallel-data loaders it reads."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from transformers import AutoTokenizer, MarianMTModel, PreTrainedTokenizerFast

import mtrl.warmstart as ws
from mtrl.datasets import load_parallel
from mtrl.errors import MtrlError
from mtrl.evaluate import translate
from mtrl.warmstart import WarmStartConfig, bucketed_batches, collate, lr_lambda, warm_start

TINY = dict(limit=300, vocab_size=400, d_model=16, encoder_layers=1, decoder_layers=1, heads=2,
            ffn_dim=32, max_steps=3, batch_size=16, warmup_steps=1)

# --- loaders ----------------------------------------------------------------------------------


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


# --- warm start -------------------------------------------------------------------------------


def test_warm_start_saves_reloads_and_caches(tmp_path, monkeypatch):
    out = warm_start(TINY, tmp_path)
    assert out == tmp_path / "warmstart"
    saved = json.loads((out / "warmstart.json").read_text())
    assert saved["config"] == {**vars(WarmStartConfig()), **TINY}
    assert saved["stats"]["steps"] == 3 and saved["stats"]["train_pairs"] == 300
    assert [p.name for p in tmp_path.iterdir()] == ["warmstart"]  # no temp dirs left behind

    model = MarianMTModel.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.d_model == 16 and model.config.vocab_size == len(tok) == 400
    enc = tok(["A dog runs."])
    assert set(enc) == {"input_ids", "attention_mask"}  # no token_type_ids
    assert enc["input_ids"][0][-1] == tok.eos_token_id == model.config.eos_token_id == 1
    assert tok.pad_token_id == model.config.pad_token_id == model.config.decoder_start_token_id == 0
    assert all(isinstance(t, str) for t in translate(model, tok, ["A dog runs.", "Two men."], max_new_tokens=5))

    # Same settings: nothing is trained or rewritten.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(ws, "train", lambda *a, **k: pytest.fail("a cached warm start was retrained"))
    assert warm_start(WarmStartConfig(**TINY), tmp_path) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

    # Other settings, or other data: retrained in place.
    monkeypatch.undo()
    warm_start({**TINY, "max_steps": 4}, tmp_path)
    assert json.loads((out / "warmstart.json").read_text())["stats"]["steps"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["warmstart"]


def test_warm_start_cache_notices_changed_data(tmp_path):
    data = tmp_path / "train.jsonl"
    pairs = load_parallel("multi30k", "train", limit=200)
    data.write_text("".join(json.dumps({"src": s, "ref": r}) + "\n" for s, r in pairs))
    config = {**TINY, "data": str(data), "split": None, "limit": None}
    first = json.loads((warm_start(config, tmp_path / "run") / "warmstart.json").read_text())
    data.write_text("".join(json.dumps({"src": s, "ref": r}) + "\n" for s, r in pairs[:150]))
    second = json.loads((warm_start(config, tmp_path / "run") / "warmstart.json").read_text())
    assert (first["stats"]["train_pairs"], second["stats"]["train_pairs"]) == (200, 150)
    assert first["data_sha256"] != second["data_sha256"]


def test_warm_start_is_deterministic(tmp_path):
    a = MarianMTModel.from_pretrained(warm_start(TINY, tmp_path / "a")).state_dict()
    b = MarianMTModel.from_pretrained(warm_start(TINY, tmp_path / "b")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = MarianMTModel.from_pretrained(warm_start({**TINY, "seed": 1}, tmp_path / "c")).state_dict()
    assert not torch.equal(a["model.shared.weight"], c["model.shared.weight"])


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        warm_start(TINY, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_config_errors(tmp_path):
    with pytest.raises(MtrlError, match="unknown warm-start option"):
        warm_start({"d_modle": 64}, tmp_path)
    with pytest.raises(MtrlError, match="divisible"):
        warm_start({"d_model": 30, "heads": 4}, tmp_path)
    with pytest.raises(MtrlError, match="schedule"):
        warm_start({"schedule": "cosine"}, tmp_path)


def test_bucketed_batches_cover_each_epoch_with_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(1000)]
    batches = bucketed_batches(lengths, 10, random.Random(1))
    epoch = [next(batches) for _ in range(100)]
    assert sorted(i for b in epoch for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch) / len(epoch)
    assert spread < 5  # random batches of 10 would spread ~48
    assert next(batches) != epoch[0]  # the next epoch is reshuffled


def test_collate_shifts_targets_right():
    src, tgt = torch.tensor([5, 6, 1]), torch.tensor([7, 8, 9, 1])
    input_ids, mask, dec_in, labels = collate([(src, tgt), (src[1:], tgt[2:])])
    assert input_ids.tolist() == [[5, 6, 1], [6, 1, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[7, 8, 9, 1], [9, 1, -100, -100]]
    assert dec_in.tolist() == [[0, 7, 8, 9], [0, 9, 1, 0]]


def test_lr_schedules():
    linear = lr_lambda(WarmStartConfig(max_steps=100, warmup_steps=10))
    assert linear(0) == pytest.approx(0.1) and linear(9) == pytest.approx(1.0)
    assert linear(50) < linear(10) and linear(99) == pytest.approx(1 / 91) and linear(100) == 0.0
    inv = lr_lambda(WarmStartConfig(schedule="inverse_sqrt", max_steps=100, warmup_steps=10))
    assert inv(9) == pytest.approx(1.0) and inv(39) == pytest.approx(0.5)
