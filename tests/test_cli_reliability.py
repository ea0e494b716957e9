"""Issue 14 probes: crash-truncated logs, bad numeric flags, unwritable outputs, BOMs, resumable sampling.

Every user mistake: exit 2, one ``mtrl: error: ...`` line on stderr, nothing written, before the work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mtrl.datasets
import mtrl.evaluate
import mtrl.label
import mtrl.policy
import mtrl.score
from mtrl.cli import main
from mtrl.errors import MtrlError, one_line
from mtrl.label import chunk_seed, label, sample_rows
from tests.fixtures.labels import TSV, read, rewarder
from tests.fixtures.runs import metric_rows, write_run


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_one_error(capsys, rc: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("mtrl: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def no_work(monkeypatch):
    """Fail the test if any command gets as far as loading a model, reading data or scoring."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    for mod, name in [(mtrl.policy, "build_policy"), (mtrl.datasets, "load_pairs"), (mtrl.label, "label"),
                      (mtrl.label, "sample_rows"), (mtrl.score, "score"), (mtrl.evaluate, "evaluate_systems")]:
        monkeypatch.setattr(mod, name, forbidden)


# --------------------------------------------------------------------------- item 2: truncated logs
def test_stability_reads_a_metrics_log_up_to_a_half_written_last_line(tmp_path, capsys):
    whole = write_run(tmp_path / "whole", metric_rows())
    torn = write_run(tmp_path / "torn", metric_rows())
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "reward_mean": 0.')  # the run was killed mid-write
    assert main(["stability", str(whole), "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["stability", str(torn), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    assert "warning" in err and "incomplete" in err and "Traceback" not in err
    assert {k: v for k, v in got.items() if k not in ("run", "run_dir")} == {k: v for k, v in expected.items() if k not in ("run", "run_dir")}


def test_stability_still_refuses_a_bad_line_before_the_last(tmp_path, capsys):
    run = write_run(tmp_path / "run", metric_rows()[:3])
    text = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(text[0] + '{"step": 2, "rew\n' + "".join(text[2:]))
    assert_one_error(capsys, main(["stability", str(run)]), "metrics.jsonl: line 2 is not valid JSON")


def test_label_reuses_the_complete_rows_of_a_torn_partial(tmp_path, monkeypatch, capsys):
    from mtrl.detectors.reference import ReferenceDetector

    rows = [{"src": f"s{i}", "mt": f"Satz {i}", "ref": f"Satz {i + 1}"} for i in range(10)]
    out = tmp_path / "o.jsonl"
    partial = tmp_path / "o.jsonl.partial"
    real = ReferenceDetector.detect
    calls = []

    def crash_on(n):
        def detect(self, sources, hypotheses, references=None):
            calls.append(len(hypotheses))
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(self, sources, hypotheses, references)
        return detect

    monkeypatch.setattr(ReferenceDetector, "detect", crash_on(2))
    with pytest.raises(KeyboardInterrupt):
        label(rows, out, rewarder(), chunk_size=4, progress=False)
    with open(partial, "a") as f:
        f.write('{"src": "s4", "mt": "Sat')  # a crash in the middle of the second chunk's append
    calls.clear()
    monkeypatch.setattr(ReferenceDetector, "detect", crash_on(2))  # crashes again after one more chunk
    with pytest.raises(KeyboardInterrupt):
        label(rows, out, rewarder(), chunk_size=4, progress=False)
    assert "incomplete" in capsys.readouterr().err
    assert len(read(partial)) == 8  # the torn line was cut off before appending: every line parses
    calls.clear()
    monkeypatch.setattr(ReferenceDetector, "detect", real)
    counts = label(rows, out, rewarder(), chunk_size=4, progress=False)
    assert counts["reused"] == 8 and counts["labelled"] == 2 and counts["rows"] == 10
    assert [r["mt"] for r in read(out)] == [r["mt"] for r in rows] and not partial.exists()


# --------------------------------------------------------------------------- item 5: mtrl label arguments
@pytest.mark.parametrize("flag,value,allowed", [
    ("--max-sources", "0", ">= 1"), ("--max-sources", "-3", ">= 1"), ("--samples", "0", ">= 1"),
    ("--samples", "-1", ">= 1"), ("--temperature", "0", "> 0"), ("--temperature", "-0.5", "> 0"),
    ("--temperature", "nan", "> 0"), ("--max-new-tokens", "0", ">= 1"), ("--batch-size", "0", ">= 1"),
    ("--max-tokens", "0", ">= 1"),
])
def test_label_refuses_out_of_range_numbers_before_loading(tmp_path, capsys, no_work, flag, value, allowed):
    rc = main(["label", "--policy", "mtrl:tiny-marian", "--data", "multi30k:train", flag, value,
               "--output", str(tmp_path / "o" / "l.jsonl"), "--quiet"])
    assert_one_error(capsys, rc, f"{flag} must be", allowed)
    assert files(tmp_path) == set()


def _label_cli(model: Path, data: Path, out: Path) -> int:
    return main(["label", "--policy", str(model), "--data", str(data), "--samples", "4", "--max-new-tokens", "4",
                 "--output", str(out), "--quiet"])


def test_label_resumes_the_sampling_and_matches_an_uninterrupted_run(tiny_seq2seq, small_data, tmp_path,
                                                                     monkeypatch, capsys):
    """16 sources x 4 samples = 2 chunks of 32; killed after the first, the rerun samples only the second."""
    assert _label_cli(tiny_seq2seq, small_data[0], tmp_path / "a" / "l.jsonl") == 0
    uninterrupted = read(tmp_path / "a" / "l.jsonl")
    assert not (tmp_path / "a" / "l.jsonl.samples.jsonl").exists()

    real, calls = mtrl.policy.Policy.generate, []

    def generate(crash_at):
        def gen(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == crash_at:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)
        return gen

    out = tmp_path / "b" / "l.jsonl"
    cache = tmp_path / "b" / "l.jsonl.samples.jsonl"
    monkeypatch.setattr(mtrl.policy.Policy, "generate", generate(2))
    assert _label_cli(tiny_seq2seq, small_data[0], out) == 130
    assert len(read(cache)) == 1 + 32 and not out.exists()  # the settings line and the first chunk
    with open(cache, "a") as f:
        f.write('{"source_index": 8, "src": "A ma')  # and a torn line
    calls.clear()
    monkeypatch.setattr(mtrl.policy.Policy, "generate", generate(0))
    assert _label_cli(tiny_seq2seq, small_data[0], out) == 0
    assert len(calls) == 1  # the missing chunk only
    assert read(out) == uninterrupted
    assert not cache.exists() and not out.with_name("l.jsonl.partial").exists()
    assert "incomplete" in capsys.readouterr().err


def test_label_rerun_after_sampling_does_not_load_the_policy(tiny_seq2seq, small_data, tmp_path, monkeypatch):
    from mtrl.detectors.reference import ReferenceDetector

    out = tmp_path / "l.jsonl"

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ReferenceDetector, "detect", crash)
        assert _label_cli(tiny_seq2seq, small_data[0], out) == 130  # sampled, killed while labelling
    assert out.with_name("l.jsonl.samples.jsonl").exists()
    real = mtrl.policy.build_policy
    built = []
    monkeypatch.setattr(mtrl.policy, "build_policy", lambda *a, **k: built.append(1) or real(*a, **k))
    assert _label_cli(tiny_seq2seq, small_data[0], out) == 0
    assert built == [] and len(read(out)) >= 1


def test_sample_cache_refuses_other_settings(tiny_seq2seq, tmp_path):
    from mtrl.policy import PolicyConfig, build_policy

    load = lambda: build_policy(PolicyConfig(model=str(tiny_seq2seq)), str(tiny_seq2seq), "English", "German")  # noqa: E731
    pairs = [("A man.", "Ein Mann."), ("A dog.", "Ein Hund.")]
    cache = tmp_path / "s.jsonl"
    first = sample_rows(load, pairs, 3, max_new_tokens=4, batch_size=4, progress=False, cache=cache)
    again = sample_rows(load, pairs, 3, max_new_tokens=4, batch_size=4, progress=False, cache=cache)
    assert again == first
    assert sample_rows(load, pairs, 3, max_new_tokens=4, batch_size=4, progress=False) == first
    with pytest.raises(MtrlError, match="temperature 1.0 .now 0.5."):
        sample_rows(load, pairs, 3, 0.5, max_new_tokens=4, batch_size=4, progress=False, cache=cache)
    with pytest.raises(MtrlError, match="another source"):
        sample_rows(load, pairs[::-1], 3, max_new_tokens=4, batch_size=4, progress=False,
                    cache=cache)
    assert chunk_seed(0, 1) == chunk_seed(0, 1) != chunk_seed(0, 2) != chunk_seed(1, 2)


# --------------------------------------------------------------------------- item 6: byte-order marks
def test_a_bom_does_not_change_score_or_eval(tmp_path, capsys):
    hyp, ref = "Ein Mann fährt 3 Fahrräder.\nZwei Hunde.\n", "Ein Mann fährt Fahrrad.\nZwei Hunde.\n"
    for name, bom in (("plain", ""), ("bom", "\ufeff")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "hyp.txt").write_text(bom + hyp, encoding="utf-8")
        (tmp_path / name / "ref.txt").write_text(bom + ref, encoding="utf-8")
    assert (tmp_path / "bom" / "hyp.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    got = {}
    for name in ("plain", "bom"):
        d = tmp_path / name
        assert main(["score", "--hyp", str(d / "hyp.txt"), "--ref", str(d / "ref.txt")]) == 0
        score_out = capsys.readouterr().out
        assert main(["eval", "--hyp", str(d / "hyp.txt"), "--ref", str(d / "ref.txt"), "--bootstrap", "0"]) == 0
        eval_out = json.loads(capsys.readouterr().out)
        got[name] = ([json.loads(line) for line in score_out.splitlines()], eval_out["hyp.txt"])
    assert got["bom"] == got["plain"]
    assert got["plain"][0][1]["score"] == 0  # "Zwei Hunde." equals its reference ...
    assert "\ufeff" not in got["bom"][0][0]["mt"]  # ... and the first segment is the text, not the BOM


# --------------------------------------------------------------------------- item 7: unwritable outputs
def _commands(tmp_path: Path) -> dict[str, list[str]]:
    (tmp_path / "h.txt").write_text("Zwei Hunde.\n")
    (tmp_path / "sys.tsv").write_text(TSV)
    return {"score": ["score", "--hyp", str(tmp_path / "h.txt"), "--ref", str(tmp_path / "h.txt")],
            "eval": ["eval", "--hyp", str(tmp_path / "h.txt"), "--ref", str(tmp_path / "h.txt")],
            "label": ["label", "--input", str(tmp_path / "sys.tsv"), "--quiet"]}


@pytest.mark.parametrize("command", ["score", "eval", "label"])
def test_unwritable_output_is_refused_before_the_work(tmp_path, capsys, no_work, command):
    args = _commands(tmp_path)[command]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    before = files(tmp_path)
    assert_one_error(capsys, main([*args, "--output", str(tmp_path / "a_file" / "sub" / "o.jsonl")]),
                     "--output", "a_file is a file, not a directory")
    assert_one_error(capsys, main([*args, "--output", str(tmp_path / "a_dir")]), "--output", "is a directory")
    assert files(tmp_path) == before


def test_label_output_parquet_name_and_stability_plot_dir_are_refused(tmp_path, capsys, no_work):
    args = _commands(tmp_path)["label"]
    assert_one_error(capsys, main([*args, "--output", str(tmp_path / "l.parquet")]), "JSON-lines name")
    run = write_run(tmp_path / "run", metric_rows())
    (tmp_path / "plots").write_text("x")
    assert_one_error(capsys, main(["stability", str(run), "--plot", str(tmp_path / "plots")]),
                     "--plot", "is a file, not a directory")


def test_output_in_a_new_folder_is_still_fine(tmp_path, capsys):
    args = _commands(tmp_path)["eval"]
    assert main([*args, "--output", str(tmp_path / "new" / "deeper" / "e.json")]) == 0
    assert "bleu" in json.loads((tmp_path / "new" / "deeper" / "e.json").read_text())["h.txt"]


# --------------------------------------------------------------------------- item 10: small ones
@pytest.mark.parametrize("extra,fragments", [
    (["--metrics", ","], ("--metrics: give at least one of", "bleu")),
    (["--metrics", " , "], ("--metrics: give at least one of",)),
    (["--bootstrap", "-5"], ("--bootstrap must be >= 0", "-5")),
    (["--beams", "0"], ("--beams must be >= 1",)),
    (["--batch-size", "0"], ("--batch-size must be >= 1",)),
    (["--max-new-tokens", "-1"], ("--max-new-tokens must be >= 1",)),
])
def test_eval_refuses_bad_numbers_and_empty_metrics(tmp_path, capsys, no_work, extra, fragments):
    out = tmp_path / "e.json"
    assert_one_error(capsys, main([*_commands(tmp_path)["eval"], *extra, "--output", str(out)]), *fragments)
    assert not out.exists()


def test_score_refuses_batch_size_zero(tmp_path, capsys, no_work):
    assert_one_error(capsys, main([*_commands(tmp_path)["score"], "--batch-size", "0"]), "--batch-size must be >= 1")


def test_bootstrap_zero_is_no_test(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Ein Mann fährt Rad.\nZwei Hunde.\n")
    (tmp_path / "b.txt").write_text("Ein Mann fährt Fahrrad.\nZwei Katzen.\n")
    args = ["eval", "--hyp", str(tmp_path / "a.txt"), "--hyp", str(tmp_path / "b.txt"), "--ref", str(tmp_path / "b.txt"),
            "--metrics", "bleu"]
    assert main([*args, "--bootstrap", "0"]) == 0
    assert "p_value" not in json.loads(capsys.readouterr().out)["b.txt"]["bleu"]
    assert main([*args, "--bootstrap", "20"]) == 0
    assert "p_value" in json.loads(capsys.readouterr().out)["b.txt"]["bleu"]


HF_MESSAGE = ("Can't load the configuration of '/models/x'. If you were trying to load it from "
              "'https://huggingface.co/models', make sure you don't have a local directory with the same name. "
              "Otherwise, make sure '/models/x' is the correct path to a directory containing a config.json file")


def test_missing_model_message_keeps_whole_words(monkeypatch):
    import transformers

    def fail(*args, **kwargs):
        raise OSError(HF_MESSAGE + "\nsecond line")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fail)
    with pytest.raises(MtrlError) as e:
        mtrl.policy.load_model_and_tokenizer("/models/x")
    msg = str(e.value)
    assert "Can't load the configuration of '/models/x'. (no network?" in msg and "make su" not in msg
    long = "word " * 60 + "end."
    cut = one_line(long)
    assert cut.endswith("word…") and len(cut) <= 201
    assert one_line("One. Two.") == "One."
