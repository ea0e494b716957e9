"""``mtrl score`` through a subprocess, as a user runs it: outputs, conservation, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.tokenizers import get_tokenizer


def mtrl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtrl.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    get_tokenizer("unigram").save_pretrained(path)
    return path


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtrl: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0]


def test_gold_wmt_mqm_spread_conserves_on_real_mqm(shared_data, tokenizer_dir, tmp_path):
    src = shared_data / "mqm" / "mqm_wmt21-ted_en-de.dev.jsonl"
    out = tmp_path / "out.jsonl"
    proc = mtrl("score", "--input", str(src), "--detector", "gold", "--severity-map", "wmt-mqm",
                "--token-rewards", "spread", "--tokenizer", str(tokenizer_dir), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 500
    for row in rows:
        assert len(row["tokens"]) == len(row["token_rewards"])
        assert sum(row["token_rewards"]) == pytest.approx(-row["mqm_penalty"], abs=1e-6), row["id"]
        assert row["score"] == pytest.approx(-row["mqm_penalty"], abs=1e-6)
        for span in row["spans"]:
            assert row["hypothesis"][span["start"]:span["end"]] == span["text"]
    assert "500 segments" in proc.stderr and "major" in proc.stderr


def test_text_files_with_reference_detector(tokenizer_dir, tmp_path):
    (tmp_path / "src.txt").write_text("A man rides a bike.\nTwo dogs.\n")
    (tmp_path / "hyp.txt").write_text("Ein Mann fährt 3 Fahrräder.\nZwei Hunde.\n")
    (tmp_path / "ref.txt").write_text("Ein Mann fährt Fahrrad.\nZwei Hunde.\n")
    proc = mtrl("score", "--src", str(tmp_path / "src.txt"), "--hyp", str(tmp_path / "hyp.txt"),
                "--ref", str(tmp_path / "ref.txt"), "--tokenizer", str(tokenizer_dir))
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert any("3" in s["text"] and s["severity"] != "minor" for s in first["spans"])
    assert min(first["token_rewards"]) < 0 and first["score"] < second["score"]
    assert second["spans"] == [] and set(second["token_rewards"]) == {0.0}
    pretty = mtrl("score", "--src", str(tmp_path / "src.txt"), "--hyp", str(tmp_path / "hyp.txt"),
                  "--ref", str(tmp_path / "ref.txt"), "--format", "pretty")
    assert pretty.returncode == 0 and "[3 Fahrräder]{major}" in pretty.stdout


def test_sentence_and_hybrid_modes(tokenizer_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"src": "x", "mt": "Ein Hund läuft.", "ref": "Eine Katze läuft."}) + "\n")
    rows = {}
    for mode in ("token", "sentence", "hybrid"):
        proc = mtrl("score", "--input", str(inp), "--tokenizer", str(tokenizer_dir), "--reward-mode", mode,
                    "--hybrid-weight", "0.5")
        assert proc.returncode == 0, proc.stderr
        rows[mode] = json.loads(proc.stdout)
    score = rows["token"]["score"]
    assert rows["sentence"]["token_rewards"][-1] == pytest.approx(score)
    assert sum(rows["sentence"]["token_rewards"]) == pytest.approx(score)
    assert sum(rows["hybrid"]["token_rewards"]) == pytest.approx(sum(rows["token"]["token_rewards"]) + 0.5 * score)


def test_hybrid_chrf_spread_by_r3hf_with_scale(tokenizer_dir, tmp_path):
    """hybrid + chrF spread over the tokens (R3HF), the quickstart's training reward, is computed
    (no longer refused): beyond the span penalties the tokens carry scale x weight x (chrF(hyp) - chrF(""))."""
    from sacrebleu import sentence_chrf

    hyp, ref = "Ein Hund läuft über die Wiese.", "Eine Katze läuft über die grüne Wiese."
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"src": "A cat runs over the green meadow.", "mt": hyp, "ref": ref}) + "\n")
    common = ("score", "--input", str(inp), "--tokenizer", str(tokenizer_dir), "--reward-mode", "hybrid",
              "--reward-scale", "0.5")
    spread = mtrl(*common, "--scorer", "chrf", "--hybrid-sentence", "r3hf", "--hybrid-weight", "2")
    spans_only = mtrl(*common, "--hybrid-weight", "0")
    assert spread.returncode == 0, spread.stderr
    assert spans_only.returncode == 0, spans_only.stderr
    a, b = json.loads(spread.stdout), json.loads(spans_only.stdout)
    assert a["token_ids"] == b["token_ids"] and a["spans"] == b["spans"] and a["spans"]
    extra = [x - y for x, y in zip(a["token_rewards"], b["token_rewards"])]
    chrf = sentence_chrf(hyp, [ref]).score - sentence_chrf("", [ref]).score
    assert sum(extra) == pytest.approx(0.5 * 2 * chrf, abs=1e-3)
    assert sum(abs(x) > 1e-6 for x in extra) > 1  # spread, not all on the last token


def test_bad_inputs_one_line_no_traceback(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("one\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"fine\nbroken \xff here\n")
    out = tmp_path / "never.jsonl"
    assert_user_error(mtrl("score", "--hyp", str(tmp_path / "a.txt"), "--ref", str(tmp_path / "b.txt"),
                           "--output", str(out)), "b.txt has 1 lines", "a.txt has 2")
    assert_user_error(mtrl("score", "--hyp", str(tmp_path / "empty.txt")), "no segments")
    assert_user_error(mtrl("score", "--hyp", str(tmp_path / "bad.txt"), "--ref", str(tmp_path / "a.txt")),
                      "bad.txt: line 2 is not valid UTF-8")
    assert_user_error(mtrl("score", "--hyp", str(tmp_path / "a.txt")), "needs a reference", "row 1")
    assert_user_error(mtrl("score", "--hyp", str(tmp_path / "missing.txt")), "missing.txt: no such file")
    assert_user_error(mtrl("score", "--hyp", str(tmp_path / "a.txt"), "--ref", str(tmp_path / "a.txt"),
                           "--severity-map", "minor=-1,major=-5,fatal=-9"), "fatal")
    assert not out.exists()


def test_bad_gold_inputs(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"mt": "ok", "error_spans": []}) + "\n"
                       + json.dumps({"mt": "tiny", "error_spans": [{"start": 1, "end": 30, "severity": "major"}]})
                       + "\n")
    assert_user_error(mtrl("score", "--input", str(outside), "--detector", "gold"), "row 2", "outside")
    sev = tmp_path / "sev.jsonl"
    sev.write_text(json.dumps({"mt": "tiny", "error_spans": [{"start": 0, "end": 2, "severity": "fatal"}]}) + "\n")
    assert_user_error(mtrl("score", "--input", str(sev), "--detector", "gold"), "unknown severity 'fatal'",
                      "minor, major, critical")
    notjson = tmp_path / "x.jsonl"
    notjson.write_text('{"mt": "a"}\n{oops\n')
    assert_user_error(mtrl("score", "--input", str(notjson), "--detector", "gold"), "line 2 is not valid JSON")


def test_xcomet_hub_id_without_network_is_one_line(tmp_path):
    (tmp_path / "h.txt").write_text("Hallo Welt.\n")
    proc = mtrl("score", "--hyp", str(tmp_path / "h.txt"), "--detector", "xcomet", "--model", "Unbabel/XCOMET-XL",
                "--tgt-lang", "German")
    assert_user_error(proc, "XCOMET-XL")
