"""``mtrl eval``: numbers identical to sacrebleu on real WMT22 outputs, paired bootstrap, COMET, --model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sacrebleu.metrics import BLEU, CHRF, TER

from mtrl.evaluate import evaluate_systems, format_markdown


def mtrl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtrl.cli", "eval", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def wmt22_files(shared_data, tmp_path_factory) -> dict[str, dict[str, Path]]:
    out = {}
    d = tmp_path_factory.mktemp("wmt22")
    for lp in ("en-de", "zh-en"):
        df = pd.read_csv(shared_data / "wmt22" / f"wmt22_{lp}.dev.tsv", sep="\t", keep_default_na=False)
        # TER (and its bootstrap resamples) dominates the cost; a part of each file tests the same code
        df = df.head(60 if lp == "zh-en" else 200)
        files = {}
        for col in [c for c in df.columns if c.startswith(("hyp_", "ref_")) or c == "source"][:5]:
            files[col] = d / f"{lp}.{col}.txt"
            files[col].write_text("\n".join(df[col]) + "\n", encoding="utf-8")
        out[lp] = files
    return out


@pytest.mark.parametrize("lp", ["en-de", "zh-en"])
def test_scores_and_signatures_equal_sacrebleu(wmt22_files, lp):
    f = wmt22_files[lp]
    hyps = [k for k in f if k.startswith("hyp_")][:2]
    bootstrap = "100" if lp == "en-de" else "0"  # TER resampling of long zh-en segments is slow; one test is enough
    proc = mtrl("--hyp", str(f[hyps[0]]), "--hyp", str(f[hyps[1]]), "--ref", str(f["ref_A"]), "--ref", str(f["ref_B"]),
                "--bootstrap", bootstrap)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    refs = [f["ref_A"].read_text().splitlines(), f["ref_B"].read_text().splitlines()]
    for h in hyps:
        lines = f[h].read_text().splitlines()
        for name, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("chrf++", CHRF(word_order=2)), ("ter", TER())):
            expected = metric.corpus_score(lines, refs)
            assert res[f[h].name][name]["score"] == expected.score
            assert res[f[h].name][name]["signature"] == str(metric.get_signature())
            assert res[f[h].name][name]["signature"].startswith("nrefs:2|")
    assert "p_value" not in res[f[hyps[0]].name]["bleu"]
    if bootstrap != "0":
        second = res[f[hyps[1]].name]["bleu"]
        assert second["baseline"] == f[hyps[0]].name and 0.0 <= second["p_value"] <= 1.0


def test_same_as_the_sacrebleu_command_line(wmt22_files):
    f = wmt22_files["en-de"]
    hyp = next(k for k in f if k.startswith("hyp_"))
    ours = json.loads(mtrl("--hyp", str(f[hyp]), "--ref", str(f["ref_A"]), "--metrics", "bleu,chrf").stdout)
    for metric in ("bleu", "chrf"):
        cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(f["ref_A"]), "-i", str(f[hyp]), "-m", metric],
                             capture_output=True, text=True)
        theirs = json.loads(cli.stdout)
        assert round(ours[f[hyp].name][metric]["score"], 1) == theirs["score"]
        assert ours[f[hyp].name][metric]["signature"] in theirs["signature"]


def test_markdown_comet_skipped_and_detector(tmp_path):
    (tmp_path / "h.txt").write_text("Ein Mann fährt Rad.\nZwei Hunde.\n")
    (tmp_path / "r.txt").write_text("Ein Mann fährt Fahrrad.\nZwei Hunde.\n")
    (tmp_path / "s.txt").write_text("A man rides a bike.\nTwo dogs.\n")
    proc = mtrl("--hyp", str(tmp_path / "h.txt"), "--ref", str(tmp_path / "r.txt"), "--src", str(tmp_path / "s.txt"),
                "--metrics", "bleu,comet,detector", "--comet-model", "Unbabel/wmt22-comet-da", "--format", "markdown")
    assert proc.returncode == 0, proc.stderr
    assert "| system | bleu | comet | detector |" in proc.stdout
    assert "comet: skipped (" in proc.stdout and "could not be loaded without network" in proc.stdout


def test_comet_with_a_local_checkpoint(tiny_xcomet_ckpt):
    res = evaluate_systems({"a": ["Ein Mann fährt KAPUTT Fahrrad."]}, [["Ein Mann fährt Fahrrad."]],
                           ["A man rides a bike."], metrics=["comet", "detector"], comet_model=str(tiny_xcomet_ckpt))
    assert 0.0 <= res["a"]["comet"]["score"] <= 1.0
    # The default (reference) detector runs next to COMET: KAPUTT, absent from the reference, is one major error.
    det = res["a"]["detector"]
    assert det["detector"] == "reference" and det["major_per_segment"] == 1.0
    assert det["minor_per_segment"] == det["critical_per_segment"] == 0.0
    assert "| a |" in format_markdown(res)


def test_model_and_data(tiny_seq2seq, small_data):
    proc = mtrl("--model", str(tiny_seq2seq), "--data", str(small_data[1]), "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert set(next(iter(res.values()))) == {"bleu", "chrf", "chrf++", "ter"}


def test_bad_input(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny\n")
    (tmp_path / "b.txt").write_text("x\n")
    for args, msg in [(["--hyp", str(tmp_path / "a.txt"), "--ref", str(tmp_path / "b.txt")], "a.txt has 2 lines"),
                      (["--hyp", str(tmp_path / "a.txt")], "give --hyp FILE"),
                      (["--hyp", str(tmp_path / "a.txt"), "--ref", str(tmp_path / "a.txt"), "--metrics", "bleurt"],
                       "unknown bleurt")]:
        proc = mtrl(*args)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr
