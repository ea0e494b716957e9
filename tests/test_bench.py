"""``mtrl bench``: a tiny two-scheme benchmark end to end (one fixed evaluation for every cell, resume),
the cell recipes, bad benchmark files, the report's scorers, and the numbers behind the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mtrl.bench import (
    Bench,
    cell_recipe,
    changed_sections,
    chrf_bands,
    comet_unavailable,
    load_bench,
    plot_reward_changes,
    reward_change,
    reward_change_bands,
    run_bench,
    write_report,
)
from mtrl.errors import MtrlError
from mtrl.recipe import dump_recipe
from mtrl.stability import load_metrics


def write_bench(tmp_path: Path, model: Path, data: tuple[Path, Path], schemes: dict, seeds: tuple = (0,),
                **extra) -> Path:
    base = {"run_dir": "unused", "policy": {"model": str(model)},
            "data": {"train": str(data[0]), "eval": str(data[1])},
            "algorithm": {"batch_size": 4, "minibatch_size": 4, "epochs": 1, "lr": 1e-3},
            "generation": {"max_new_tokens": 6, "eval_batch_size": 4},
            "train": {"steps": 3, "eval_every": 1, "report_to": [], "threads": 1}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    bench = {"base": "base.yaml", "output": "report", "seeds": list(seeds), "schemes": schemes, **extra}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


TWO_SCHEMES = {"token": ["reward.mode=token"],  # trained with the reference detector (defaults)
               "bleu": ["detector.name=bleu", "detector.options={}", "reward.mode=sentence"]}  # with sentence BLEU


def test_bench_end_to_end_one_evaluation_for_every_cell(tiny_seq2seq, small_data, tmp_path, capsys):
    path = write_bench(tmp_path, tiny_seq2seq, small_data, TWO_SCHEMES)
    out = run_bench(path, quiet=True)
    report = (out / "results.md").read_text()
    assert "| token" in report and "| bleu" in report
    assert "reference-detector score" in report and "reference detector with its defaults" in report
    assert "COMET: skipped: no COMET checkpoint given" in report
    assert len((out / "results.csv").read_text().splitlines()) == 3
    assert (out / "reward_curves.png").stat().st_size > 1000 and (out / "kl_entropy.png").exists()
    assert sorted(p.name for p in (out / "recipes").iterdir()) == ["bleu-seed-0.yaml", "token-seed-0.yaml"]
    for scheme, trained_with in (("token", "reference"), ("bleu", "bleu")):
        recipe = yaml.safe_load((out / "recipes" / f"{scheme}-seed-0.yaml").read_text())
        assert recipe["detector"]["name"] == trained_with  # the training reward is the scheme's ...
        assert recipe["evaluation"]["detector"]["name"] == "reference"  # ... the evaluation the bench's
        assert recipe["evaluation"]["comet"] is None
        rows = [json.loads(x) for x in (out / "runs" / scheme / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "eval_chrf" in r] == [1, 2, 3]  # train.eval_every: chrF over steps
    first = json.loads((out / "runs" / "token" / "seed-0" / "eval.json").read_text())
    capsys.readouterr()
    run_bench(path, quiet=True)  # resume: every cell is done with the same recipe, nothing reruns
    assert json.loads((out / "runs" / "token" / "seed-0" / "eval.json").read_text()) == first
    assert capsys.readouterr().err.count("done, skipped") == 2
    # The runner honours `evaluation:`: the initial policy (the same in both cells) gets the same reference-
    # detector score in both, although the bleu cell's training detector is sentence BLEU.
    before = {s: json.loads((out / "runs" / s / "seed-0" / "eval.json").read_text())["before"]["detector_score"]
              for s in TWO_SCHEMES}
    assert before["bleu"] == pytest.approx(before["token"]) and before["token"] < 0  # sentence BLEU is >= 0


def test_evaluation_overrides_reach_every_cell(tiny_seq2seq, small_data, tmp_path):
    ev = {"detector": {"name": "reference", "options": {"omission_weight": 2}}, "comet": "some/comet"}
    bench = load_bench(write_bench(tmp_path, tiny_seq2seq, small_data, TWO_SCHEMES, seeds=(0, 1), evaluation=ev))
    for scheme in bench.schemes:
        for seed in bench.seeds:
            r = cell_recipe(bench, scheme, seed)
            assert (r.evaluation.detector.name, r.evaluation.detector.options, r.evaluation.comet) == (
                "reference", {"omission_weight": 2}, "some/comet")
            assert r.seed == seed and r.detector.name == ("bleu" if scheme == "bleu" else "reference")
    dropped = cell_recipe(bench, "bleu", 0, evaluation={**bench.evaluation, "comet": None})  # COMET not at hand
    assert dropped.evaluation.comet is None
    default = load_bench(write_bench(tmp_path, tiny_seq2seq, small_data, TWO_SCHEMES))
    assert default.evaluation == {"detector": {"name": "reference"}, "comet": None}
    assert cell_recipe(default, "bleu", 0).evaluation.detector.options == {}


def test_a_cell_run_with_another_recipe_is_rerun(tiny_seq2seq, small_data, tmp_path):
    bench = load_bench(write_bench(tmp_path, tiny_seq2seq, small_data, TWO_SCHEMES))
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    old = cell_recipe(bench, "token", 0, evaluation={"detector": {"name": "chrf"}, "comet": None})
    (run_dir / "recipe.yaml").write_text(dump_recipe(old))
    assert changed_sections(run_dir, old) == []
    assert changed_sections(run_dir, cell_recipe(bench, "token", 0)) == ["evaluation"]
    assert changed_sections(tmp_path / "missing", old) == ["recipe.yaml"]


@pytest.mark.parametrize("evaluation, message", [
    ({"detektor": {"name": "reference"}}, "unknown key 'evaluation.detektor'; allowed: comet, detector"),
    ([1], "'evaluation' must be a mapping with keys comet, detector"),
    ({"detector": None}, "'evaluation.detector' must be a detector mapping"),
    ({"comet": 3}, "'evaluation.comet' must be a COMET checkpoint"),
    ({"detector": {"name": "nope"}}, "evaluation: evaluation.detector.name: 'nope' is not allowed"),
])
def test_bad_evaluation_key(tiny_seq2seq, small_data, tmp_path, evaluation, message):
    path = write_bench(tmp_path, tiny_seq2seq, small_data, TWO_SCHEMES, evaluation=evaluation)
    with pytest.raises(MtrlError, match=message) as e:
        load_bench(path)
    assert str(e.value).startswith(str(path))


def test_bad_bench_files(tiny_seq2seq, small_data, tmp_path):
    path = write_bench(tmp_path, tiny_seq2seq, small_data, {"x": ["reward.mode=tokens"]})
    with pytest.raises(MtrlError, match="scheme 'x': reward.mode: 'tokens' is not allowed"):
        load_bench(path)
    path = write_bench(tmp_path, tiny_seq2seq, small_data, {"x": ["evaluation.comet=a/b"]})
    with pytest.raises(MtrlError, match="scheme 'x': 'evaluation.comet=a/b' is not allowed: the bench file's"):
        load_bench(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: base.yaml\nschemes: {a: []}\nseed: [1]\n")
    with pytest.raises(MtrlError, match="unknown key 'seed'; allowed: base, evaluation, output, overrides"):
        load_bench(bad)
    assert comet_unavailable(None).startswith("no COMET checkpoint given")


# --------------------------------------------------------------------------- synthetic runs: numbers, plots, report
def fake_cell(run_dir: Path, rewards: list[float] | None, chrf: dict[int, float], before: float, after: float,
              comet: dict | None = None) -> Path:
    """A finished cell: ``metrics.jsonl`` (rollout rows, or an offline trainer's loss rows) and ``eval.json``."""
    run_dir.mkdir(parents=True)
    rows = ([{"step": i + 1, "reward_mean": r, "kl": 0.01 * i, "entropy": 2.0} for i, r in enumerate(rewards)]
            if rewards is not None else [{"step": 1, "loss": 0.5}])
    rows += [{"step": s, "eval_chrf": c} for s, c in chrf.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = {m: {"bleu": {"score": 30.0}, "chrf": {"score": c}, "detector_score": -10.0,
              **({"comet": comet} if comet else {})} for m, c in (("before", before), ("after", after))}
    (run_dir / "eval.json").write_text(json.dumps(ev))
    return run_dir


def test_reward_change_from_start_and_chrf_bands(tmp_path):
    r = [float(x) for x in range(1, 21)]  # 20 rows: the start is the mean of the first 20 // 5 = 4 rows, 2.5
    a = fake_cell(tmp_path / "a", r, {10: 51.0, 20: 52.0}, before=50.0, after=52.0)
    b = fake_cell(tmp_path / "b", [2 * x for x in r], {10: 53.0, 20: 54.0}, before=50.0, after=54.0)
    q = fake_cell(tmp_path / "q", None, {}, before=50.0, after=49.0)  # a whole-run algorithm: no curve
    change = reward_change(load_metrics(a), window=1)
    assert list(change.index) == list(range(1, 21)) and change.tolist() == [x - 2.5 for x in r]
    assert reward_change(load_metrics(a), window=3).iloc[:3].tolist() == [-1.5, -1.0, -0.5]  # trailing mean
    band = reward_change_bands({"x": [a, b]}, window=1)["x"]  # seed b: 2r - 5
    assert band["mean"].tolist() == pytest.approx([(3 * x - 7.5) / 2 for x in r])
    assert band["std"].tolist() == pytest.approx([abs(x - 2.5) / 2 ** 0.5 for x in r])
    assert band["n"].eq(2).all()
    curves, ends = chrf_bands({"x": [a, b], "q": [q]})
    assert curves["x"]["mean"].to_dict() == {0: 50.0, 10: 52.0, 20: 53.0}  # before at step 0, then eval_chrf
    assert ends["q"]["mean"].tolist() == [50.0, 49.0] and list(ends) == ["q"]
    out = plot_reward_changes({"x": [a, b]}, {"x": [a, b], "q": [q]}, tmp_path / "plots" / "reward_curves.png")
    assert out.stat().st_size > 1000


def test_report_names_the_fixed_scorers(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"policy": {"model": "x"}, "train": {"eval_every": 10}}))
    ev = {"detector": {"name": "reference", "options": {"omission_weight": 2}}, "comet": "my/comet"}
    bench = Bench(base=tmp_path / "base.yaml", output=tmp_path / "out", seeds=[0, 1],
                  schemes={"token": [], "qsft": []}, evaluation=ev)
    runs = bench.output / "runs"
    for seed in (0, 1):
        fake_cell(runs / "token" / f"seed-{seed}", [1.0 + seed] * 20, {10: 51.0, 20: 52.0}, 50.0, 52.0 + seed,
                  comet={"score": 0.8})
        fake_cell(runs / "qsft" / f"seed-{seed}", None, {}, 50.0, 49.0, comet={"score": 0.7})
    write_report(bench, tmp_path / "bench.yaml")
    md = (bench.output / "results.md").read_text()
    assert "the reference detector with omission_weight 2" in md and "COMET: `my/comet`" in md
    header = next(line for line in md.splitlines() if line.startswith("| scheme"))
    assert [c.strip() for c in header.split("|")[3:7]] == ["BLEU", "chrF", "reference-detector score", "COMET"]
    assert "52.50 ± 0.71" in md and "held-out chrF every 10 steps" in md  # token chrF over two seeds
    df = pd.read_csv(bench.output / "results.csv")
    assert df["comet"].tolist() == [0.8, 0.8, 0.7, 0.7]
    assert (bench.output / "reward_curves.png").exists()
    for seed in (0, 1):  # COMET asked for but not at hand: the report says why
        for s in ("token", "qsft"):
            path = runs / s / f"seed-{seed}" / "eval.json"
            data = json.loads(path.read_text())
            data["after"]["comet"] = {"skipped": "no checkpoint here"}
            path.write_text(json.dumps(data))
    write_report(bench, tmp_path / "bench.yaml")
    md = (bench.output / "results.md").read_text()
    assert "COMET: skipped: no checkpoint here." in md and "| COMET" not in md
