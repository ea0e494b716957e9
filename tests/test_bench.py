"""``mtrl bench``: a two-scheme benchmark on tiny models end to end, resume, and a bad benchmark file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mtrl.bench import load_bench, run_bench
from mtrl.errors import MtrlError


def write_bench(tmp_path: Path, model: Path, data: tuple[Path, Path], schemes: dict) -> Path:
    base = {"run_dir": "unused", "policy": {"model": str(model)},
            "data": {"train": str(data[0]), "eval": str(data[1])},
            "algorithm": {"batch_size": 4, "minibatch_size": 4, "epochs": 1, "lr": 1e-3},
            "generation": {"max_new_tokens": 6, "eval_batch_size": 4}, "train": {"steps": 2, "report_to": []}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    bench = {"base": "base.yaml", "output": "report", "seeds": [0, 1], "schemes": schemes}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


def test_bench_two_schemes_report_and_resume(tiny_seq2seq, small_data, tmp_path, capsys):
    path = write_bench(tmp_path, tiny_seq2seq, small_data,
                       {"sentence": ["reward.mode=sentence"], "token": ["reward.mode=token"]})
    out = run_bench(path, quiet=True)
    table = (out / "results.md").read_text()
    assert "| sentence" in table and "| token" in table and "±" in table
    rows = [line for line in (out / "results.csv").read_text().splitlines()[1:]]
    assert len(rows) == 4
    assert (out / "reward_curves.png").stat().st_size > 1000 and (out / "kl_entropy.png").exists()
    assert sorted(p.name for p in (out / "recipes").iterdir()) == [
        "sentence-seed-0.yaml", "sentence-seed-1.yaml", "token-seed-0.yaml", "token-seed-1.yaml"]
    assert yaml.safe_load((out / "recipes" / "token-seed-1.yaml").read_text())["seed"] == 1
    first = json.loads((out / "runs" / "token" / "seed-0" / "eval.json").read_text())
    capsys.readouterr()
    run_bench(path, quiet=True)  # resume: every cell is done, nothing reruns
    assert json.loads((out / "runs" / "token" / "seed-0" / "eval.json").read_text()) == first
    assert capsys.readouterr().err.count("done, skipped") == 4


def test_bad_bench_files(tiny_seq2seq, small_data, tmp_path):
    path = write_bench(tmp_path, tiny_seq2seq, small_data, {"x": ["reward.mode=tokens"]})
    with pytest.raises(MtrlError, match="scheme 'x': reward.mode: 'tokens' is not allowed"):
        load_bench(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: base.yaml\nschemes: {a: []}\nseed: [1]\n")
    with pytest.raises(MtrlError, match="unknown key 'seed'"):
        load_bench(bad)
