"""tools/build_tiny_marian.py, the build script of the shipped tiny Marian (a tiny config, a few steps), and
the shipped model itself. The script is not part of the package: it is loaded here by its path."""

from __future__ import annotations

import importlib.util
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, MarianMTModel, PreTrainedTokenizerFast

from mtrl.datasets import load_parallel
from mtrl.errors import MtrlError
from mtrl.policy import TINY_MARIAN, TINY_MARIAN_DIR, resolve_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "build_tiny_marian.py"


def load_script():
    spec = importlib.util.spec_from_file_location("build_tiny_marian", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bt = load_script()
TinyMarianConfig, bucketed_batches, collate, lr_lambda = bt.TinyMarianConfig, bt.bucketed_batches, bt.collate, bt.lr_lambda


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


def build(options: dict, out_dir: Path) -> dict:
    return bt.build(TinyMarianConfig(**options), out_dir, "the command", progress=False)


def test_build_saves_reloads_and_replaces_an_earlier_build(tmp_path):
    out = tmp_path / "tiny"
    saved = build(TINY, out)
    assert json.loads((out / "build.json").read_text()) == saved
    assert saved["config"] == {**vars(TinyMarianConfig()), **TINY} and saved["command"] == "the command"
    assert saved["stats"]["steps"] == 3 and saved["stats"]["train_pairs"] == 300
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp dirs left behind

    model = MarianMTModel.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.d_model == 16 and model.config.vocab_size == len(tok) == 400
    enc = tok(["A dog runs."])
    assert set(enc) == {"input_ids", "attention_mask"}  # no token_type_ids
    assert enc["input_ids"][0][-1] == tok.eos_token_id == model.config.eos_token_id == 1
    assert tok.pad_token_id == model.config.pad_token_id == model.config.decoder_start_token_id == 0
    assert all(isinstance(t, str) for t in greedy(model, tok, ["A dog runs.", "Two men."], max_new_tokens=5))

    build({**TINY, "max_steps": 4}, out)  # an earlier build is replaced in place
    assert json.loads((out / "build.json").read_text())["stats"]["steps"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_build_records_the_training_data(tmp_path):
    data = tmp_path / "train.jsonl"
    pairs = load_parallel("multi30k", "train", limit=200)
    data.write_text("".join(json.dumps({"src": s, "ref": r}) + "\n" for s, r in pairs))
    config = {**TINY, "data": str(data), "split": None, "limit": None}
    first = build(config, tmp_path / "a")
    data.write_text("".join(json.dumps({"src": s, "ref": r}) + "\n" for s, r in pairs[:150]))
    second = build(config, tmp_path / "b")
    assert (first["stats"]["train_pairs"], second["stats"]["train_pairs"]) == (200, 150)
    assert first["data_sha256"] != second["data_sha256"]


def test_build_is_deterministic(tmp_path):
    build(TINY, tmp_path / "a")
    build(TINY, tmp_path / "b")
    build({**TINY, "seed": 1}, tmp_path / "c")
    a, b, c = (MarianMTModel.from_pretrained(tmp_path / n).state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.shared.weight"], c["model.shared.weight"])


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        build(TINY, tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    ({"d_model": 30, "heads": 4}, "--d-model 30 is not divisible by --heads 4"),
    ({"heads": 0}, "--d-model, --heads, --ffn-dim, --encoder-layers and --decoder-layers must be >= 1"),
    ({"schedule": "cosine"}, "--schedule must be 'linear' or 'inverse_sqrt', got 'cosine'"),
    ({"tokenizer": "wordpiece"}, "--tokenizer must be 'unigram' or 'bpe', got 'wordpiece'"),
    ({"limit": 0}, "--limit must be >= 1, got 0"),
])
def test_config_errors(tmp_path, options, message):
    with pytest.raises(MtrlError) as e:
        build(options, tmp_path / "tiny")
    assert str(e.value) == message
    assert list(tmp_path.iterdir()) == []


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
    linear = lr_lambda(TinyMarianConfig(max_steps=100, warmup_steps=10))
    assert linear(0) == pytest.approx(0.1) and linear(9) == pytest.approx(1.0)
    assert linear(50) < linear(10) and linear(99) == pytest.approx(1 / 91) and linear(100) == 0.0
    inv = lr_lambda(TinyMarianConfig(schedule="inverse_sqrt", max_steps=100, warmup_steps=10))
    assert inv(9) == pytest.approx(1.0) and inv(39) == pytest.approx(0.5)


# --- command line and the shipped model -----------------------------------------------------

CLI_TINY = ["--limit", "200", "--max-steps", "3", "--d-model", "32", "--ffn-dim", "64", "--heads", "2",
            "--vocab-size", "300", "--encoder-layers", "1", "--decoder-layers", "1", "--seed", "1", "--quiet"]


def test_cli_builds_fp16_model_that_loads_as_fp32(tmp_path):
    out = tmp_path / "tiny"
    argv = ["--output", str(out), *CLI_TINY]
    run = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp dirs left behind
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F16"}

    saved = json.loads((out / "build.json").read_text())
    assert saved["command"] == shlex.join(["python", "tools/build_tiny_marian.py", *argv])
    assert saved["config"] == {**vars(TinyMarianConfig()), "limit": 200, "max_steps": 3, "d_model": 32,
                               "ffn_dim": 64, "heads": 2, "vocab_size": 300, "encoder_layers": 1,
                               "decoder_layers": 1, "seed": 1}
    assert saved["dtype"] == "fp16" and saved["stats"]["steps"] == 3 and saved["stats"]["train_pairs"] == 200

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
            status = bt.main(argv)
        except SystemExit as e:  # argparse errors
            status = e.code
        lines = capsys.readouterr().err.splitlines()
        assert "Traceback" not in "\n".join(lines)
        return status, [line for line in lines if line.startswith("mtrl: error:")]

    assert error_lines(["--output", str(tmp_path / "a"), "--d-model", "30", "--heads", "4"]) == (
        2, ["mtrl: error: --d-model 30 is not divisible by --heads 4"])
    status, lines = error_lines(["--output", str(tmp_path / "a"), "--d-modle", "30"])
    assert status == 2 and len(lines) == 1 and "--d-modle" in lines[0]
    status, lines = error_lines(["--output", str(tmp_path / "a"), "--max-steps", "many"])
    assert status == 2 and len(lines) == 1 and "--max-steps" in lines[0]
    # --output is replaced atomically: never when it holds something other than an earlier build
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    status, lines = error_lines(["--output", str(tmp_path / "mine"), *CLI_TINY])
    assert status == 2 and len(lines) == 1 and "is not an (empty or earlier) build directory" in lines[0]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# The shipped model (fp16, loaded as fp32) scores chrF 55.1 on the first 50 test2016 sentences (greedy;
# 54.3 on all 1,000); a broken, truncated or untrained model scores far lower.
SHIPPED_MIN_CHRF = 45.0


def test_shipped_tiny_marian_translates_test2016():
    saved = json.loads((TINY_MARIAN_DIR / "build.json").read_text())
    assert saved["command"] == "python tools/build_tiny_marian.py --output mtrl/data/tiny-marian"
    assert saved["config"] == vars(TinyMarianConfig()), (
        "the TinyMarianConfig defaults changed: rebuild the shipped model with " + saved["command"])
    assert resolve_model(TINY_MARIAN) == str(TINY_MARIAN_DIR)
    model = MarianMTModel.from_pretrained(TINY_MARIAN_DIR, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tok = AutoTokenizer.from_pretrained(TINY_MARIAN_DIR)
    pairs = load_parallel("multi30k", "test2016", limit=50)
    hyps = greedy(model, tok, [s for s, _ in pairs], batch_size=64, max_new_tokens=64)
    chrf = sacrebleu.corpus_chrf(hyps, [[r for _, r in pairs]]).score
    assert chrf > SHIPPED_MIN_CHRF, hyps[:3]
