"""Warm start (tiny config, a few steps) and the parallel-data loaders it reads."""

from __future__ import annotations

import gzip
import json
import random
import shlex
import subprocess
import sys

import pytest
import sacrebleu
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, MarianMTModel, PreTrainedTokenizerFast

import mtrl.warmstart as ws
from mtrl.datasets import load_parallel
from mtrl.errors import MtrlError
from mtrl.warmstart import TINY_MARIAN, WarmStartConfig, bucketed_batches, collate, lr_lambda, warm_start


def greedy(model, tok, sources, batch_size=64, max_new_tokens=64):
    """Greedy translations with a plain HF seq2seq model, in input order (batches sorted by length)."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [""] * len(sources)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([sources[i] for i in idx], return_tensors="pt", padding=True, truncation=True)
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            for i, text in zip(idx, tok.batch_decode(generated, skip_special_tokens=True)):
                out[i] = text
    return out


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
    assert all(isinstance(t, str) for t in greedy(model, tok, ["A dog runs.", "Two men."], max_new_tokens=5))

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


# --- command line (python -m mtrl.warmstart) and the shipped TINY_MARIAN -------------------------

CLI_TINY = ["--limit", "200", "--max-steps", "3", "--d-model", "32", "--ffn-dim", "64", "--heads", "2",
            "--vocab-size", "300", "--encoder-layers", "1", "--decoder-layers", "1", "--seed", "1", "--quiet"]


def test_cli_builds_fp16_model_that_loads_as_fp32(tmp_path):
    out = tmp_path / "tiny"
    argv = ["--output", str(out), *CLI_TINY]
    run = subprocess.run([sys.executable, "-m", "mtrl.warmstart", *argv], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp dirs left behind
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F16"}

    saved = json.loads((out / "warmstart.json").read_text())
    assert saved["command"] == shlex.join(["python", "-m", "mtrl.warmstart", *argv])
    assert saved["config"] == {**vars(WarmStartConfig()), "limit": 200, "max_steps": 3, "d_model": 32,
                               "ffn_dim": 64, "heads": 2, "vocab_size": 300, "encoder_layers": 1,
                               "decoder_layers": 1, "seed": 1}
    assert saved["dtype"] == "float16" and saved["stats"]["steps"] == 3 and saved["stats"]["train_pairs"] == 200

    model = MarianMTModel.from_pretrained(out, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.d_model == 32 and model.config.encoder_ffn_dim == 64
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["A dog runs in the park."], return_tensors="pt")
    generated = model.generate(**enc, min_new_tokens=3, max_new_tokens=6)
    assert tok.batch_decode(generated, skip_special_tokens=True)[0].strip()


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    def error_lines(argv):
        try:
            status = ws.main(argv)
        except SystemExit as e:  # argparse errors
            status = e.code
        lines = capsys.readouterr().err.splitlines()
        assert "Traceback" not in "\n".join(lines)
        return status, [line for line in lines if line.startswith("mtrl: error:")]

    assert error_lines(["--output", str(tmp_path / "a"), "--d-model", "30", "--heads", "4"]) == (
        2, ["mtrl: error: warm start: d_model 30 is not divisible by heads 4"])
    status, lines = error_lines(["--output", str(tmp_path / "a"), "--d-modle", "30"])
    assert status == 2 and len(lines) == 1 and "--d-modle" in lines[0]
    status, lines = error_lines(["--output", str(tmp_path / "a"), "--max-steps", "many"])
    assert status == 2 and len(lines) == 1 and "--max-steps" in lines[0]
    # --output is replaced atomically: never when it holds something other than an earlier build
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    status, lines = error_lines(["--output", str(tmp_path / "mine"), *CLI_TINY])
    assert status == 2 and len(lines) == 1 and "is not an (empty or earlier) warm-start directory" in lines[0]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# The shipped model (fp16, loaded as fp32) scores chrF 55.1 on the first 50 test2016 sentences (greedy;
# 54.3 on all 1,000); a broken, truncated or untrained model scores far lower.
SHIPPED_MIN_CHRF = 45.0


def test_shipped_tiny_marian_translates_test2016():
    saved = json.loads((TINY_MARIAN / "warmstart.json").read_text())
    assert saved["command"] == "python -m mtrl.warmstart --output mtrl/data/tiny-marian"
    assert saved["config"] == vars(WarmStartConfig()), (
        "the WarmStartConfig defaults changed: rebuild the shipped model with " + saved["command"])
    model = MarianMTModel.from_pretrained(TINY_MARIAN, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tok = AutoTokenizer.from_pretrained(TINY_MARIAN)
    pairs = load_parallel("multi30k", "test2016", limit=50)
    hyps = greedy(model, tok, [s for s, _ in pairs], batch_size=64, max_new_tokens=64)
    chrf = sacrebleu.corpus_chrf(hyps, [[r for _, r in pairs]]).score
    assert chrf > SHIPPED_MIN_CHRF, hyps[:3]
