"""End to end: a few RL steps on tiny local models, both kinds, every reward mode; resume; recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mtrl.recipe import load_recipe, recipe_from_dict
from mtrl.runner import run as train
from tests.fixtures.runs import read_metrics, tiny_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
REQUIRED = {"step", "reward_mean", "reward_std", "sentence_score_mean", "spans_minor", "spans_major",
            "spans_critical", "kl", "entropy", "policy_loss", "tokens_per_s"}


@pytest.mark.parametrize("mode", ["token", "sentence", "hybrid"])
def test_ppo_seq2seq_reward_modes(mode, tiny_seq2seq, small_data, tmp_path):
    run = tmp_path / "run"
    results = train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run, reward={"mode": mode})), quiet=True)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert REQUIRED <= set(rows[0]) and {"value_loss", "clipfrac"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in rows)
    assert {"before", "after"} <= set(results)
    assert set(results["after"]) >= {"bleu", "chrf", "ter", "detector_score"}
    assert json.loads((run / "eval.json").read_text())["after"]["chrf"]["signature"].startswith("nrefs:1")
    assert (run / "final" / "config.json").exists() and (run / "recipe.yaml").exists()
    if mode == "sentence":  # one task reward per sequence: with the reference detector, its score
        assert rows[0]["reward_mean"] == pytest.approx(rows[0]["sentence_score_mean"], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce", "rloo"])
def test_causal_policy_algorithms(algorithm, tiny_causal, small_data, tmp_path):
    run = tmp_path / "run"
    algo = {"name": algorithm, "samples_per_prompt": 2 if algorithm == "rloo" else 1}
    train(recipe_from_dict(tiny_recipe(tiny_causal, small_data, run, algorithm=algo)), quiet=True)
    rows = read_metrics(run)
    assert len(rows) == 2 and REQUIRED <= set(rows[-1])
    assert rows[0]["response_length_mean"] > 0


def test_training_changes_the_policy(tiny_seq2seq, small_data, tmp_path):
    run = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run)), quiet=True)
    from transformers import AutoModelForSeq2SeqLM

    before = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq).state_dict()
    after = AutoModelForSeq2SeqLM.from_pretrained(run / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fixed_position_tables_are_not_trained(tiny_seq2seq):
    """Marian's sinusoidal position tables are rebuilt on load: trained, the saved policy would not be
    the trained one (and DDP would wait for their gradients where the model computes them without grad)."""
    from mtrl.policy import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(str(tiny_seq2seq))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}


def test_loading_a_model_leaves_the_random_stream_alone(tiny_seq2seq):
    """transformers 5 draws from the global RNG while loading; a run's seed must give the same samples
    whatever the version (the quickstart gives the same numbers on transformers 4.57 and 5.24)."""
    from mtrl.policy import load_model_and_tokenizer

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_model_and_tokenizer(str(tiny_seq2seq))
    assert torch.equal(torch.rand(3), expected)


def test_quiet_run_writes_nothing_to_stderr(tiny_seq2seq, small_data, tmp_path, capfd):
    """No progress bars: mtrl's, nor transformers' (loading and saving weights)."""
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, tmp_path / "run")), quiet=True)
    assert capfd.readouterr().err == ""


def test_value_head_has_its_own_learning_rate(tiny_seq2seq, small_data, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_seq2seq, small_data, run, algorithm={"lr": 1e-4, "value_lr": 3e-3},
                         train={"steps": 1, "report_to": []})
    train(recipe_from_dict(recipe), quiet=True)
    state = torch.load(run / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=False)
    groups = state["algorithm"]["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-4, 3e-3]
    assert len(groups[1]["params"]) == 2  # the value head's weight and bias, nothing else


def test_resume_two_plus_two_equals_four(tiny_seq2seq, small_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = {"train": {"steps": 4, "save_every": 2, "report_to": []}}
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, straight, **base)), quiet=True)
    first = tiny_recipe(tiny_seq2seq, small_data, resumed, train={"steps": 2, "save_every": 2, "report_to": []})
    train(recipe_from_dict(first), quiet=True)
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, resumed, **base)), resume=True, quiet=True)
    a = torch.load(straight / "checkpoints" / "step-000004" / "policy.pt")
    b = torch.load(resumed / "checkpoints" / "step-000004" / "policy.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward_mean"] for r in read_metrics(straight)] == [r["reward_mean"] for r in read_metrics(resumed)]


def test_refuses_to_overwrite_a_run(tiny_seq2seq, small_data, tmp_path):
    from mtrl.errors import MtrlError

    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_seq2seq, small_data, run, train={"steps": 1, "report_to": []})
    train(recipe_from_dict(recipe), quiet=True)
    with pytest.raises(MtrlError, match="--resume to continue it, --overwrite"):
        train(recipe_from_dict(recipe), quiet=True)
    (run / "keep.txt").write_text("x")  # --overwrite clears the run's outputs only
    train(recipe_from_dict(recipe), quiet=True, overwrite=True)
    assert (run / "keep.txt").exists() and len(read_metrics(run)) == 1


def test_lora_reference_is_the_disabled_adapter(tiny_causal, small_data, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_causal, small_data, run, policy={"model": str(tiny_causal), "lora": {"r": 2}})
    train(recipe_from_dict(recipe), quiet=True)
    rows = read_metrics(run)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA starts as the identity: policy == reference
    assert (run / "final" / "adapter_config.json").exists()


# ------------------------------------------------------------------ shipped recipes
def recipe_files() -> list[Path]:
    return sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith("accelerate"))


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: p.name)
def test_shipped_recipe_validates(path, tmp_path):
    from mtrl.algorithms import ALGORITHMS
    from mtrl.recipe import dump_recipe

    recipe = load_recipe(path)
    assert type(recipe.algorithm) is ALGORITHMS[recipe.algorithm.name][0]  # the algorithm's own config class
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(recipe))
    assert load_recipe(again) == recipe  # what a run directory saves loads back to the same recipe


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in recipe_files() if not p.name.startswith("quickstart")],
                         ids=lambda p: p.name)
def test_shipped_recipe_runs_one_step_on_stand_ins(path, tiny_seq2seq, tiny_nllb, tiny_causal, tiny_xcomet_ckpt,
                                                   small_data, tmp_path):
    """Every real-model recipe, with hub names swapped for tiny local models, runs one step."""
    data = yaml.safe_load(path.read_text())
    model = data["policy"]["model"]
    stand_in = tiny_causal if "qwen" in model.lower() or "tower" in model.lower() else (
        tiny_nllb if data["policy"].get("tgt_lang_code") else tiny_seq2seq)
    overrides = [f"policy.model={stand_in}", f"run_dir={tmp_path / 'run'}", "train.steps=1",
                 f"data.train={small_data[0]}", f"data.eval={small_data[1]}", "train.report_to=[]",
                 "algorithm.batch_size=2", "generation.max_new_tokens=6"]
    if data.get("algorithm", {}).get("name", "ppo") in ("ppo", "reinforce", "rloo"):
        overrides.append("algorithm.minibatch_size=2")
    else:  # offline: two optimizer steps on a few labelled rows
        overrides += ["algorithm.max_steps=2", "offline.num_sources=4", "offline.samples_per_source=2"]
    offline_data = data.get("offline", {}).get("data")
    if offline_data and not Path(offline_data).exists():
        pytest.skip(f"{offline_data} is not here (the shared data slice)")
    if offline_data:  # the stand-in reads 128 positions (the real model 512): its short rows only
        rows = [json.loads(line) for line in Path(offline_data).read_text(encoding="utf-8").splitlines()]
        short = tmp_path / "short.jsonl"
        short.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows
                                 if len(r.get("mt", r.get("hypothesis", ""))) < 150), encoding="utf-8")
        overrides.append(f"offline.data={short}")
    if data["detector"]["name"] == "xcomet":
        overrides.append(f"detector.model={tiny_xcomet_ckpt}")
    recipe = load_recipe(path, overrides)
    if recipe.policy.dtype == "bf16" or recipe.train.mixed_precision != "no":
        recipe.policy.dtype, recipe.train.mixed_precision = "fp32", "no"  # bf16 on this CPU is slow, not wrong
    results = train(recipe, quiet=True)
    rows = read_metrics(Path(recipe.run_dir))
    assert "after" in results and rows[-1]["step"] in (1, 2)  # one on-policy step, or two offline ones


@pytest.mark.parametrize("scorer", ["chrf", "detector"])
def test_ppo_with_r3hf_rewards(scorer, tiny_seq2seq, small_data, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_seq2seq, small_data, run, reward={"mode": "r3hf", "scorer": scorer})
    train(recipe_from_dict(recipe), quiet=True)
    rows = read_metrics(run)
    assert len(rows) == 2 and REQUIRED <= set(rows[0])
    if scorer == "chrf":  # the task reward of a sequence telescopes to chrF(hypothesis) - chrF("")
        assert 0.0 <= rows[0]["reward_mean"] <= 100.0
        assert rows[0]["reward_mean"] == pytest.approx(rows[0]["sentence_score_mean"], abs=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_qsft_recipe_samples_labels_trains_and_evaluates(kind, tiny_seq2seq, tiny_causal, small_data, tmp_path,
                                                          capsys):
    run = tmp_path / "run"
    model = tiny_seq2seq if kind == "seq2seq" else tiny_causal
    recipe = tiny_recipe(model, small_data, run, offline={"num_sources": 4, "samples_per_source": 2},
                         algorithm={"name": "qsft", "max_steps": 2, "batch_size": 4, "sft_steps": 1, "logging_steps": 1})
    results = train(recipe_from_dict(recipe), quiet=True)
    assert {"before", "after"} <= set(results) and "chrf" in results["after"]
    assert "sample" not in capsys.readouterr().err  # quiet: no progress bars from sampling or labelling either
    labelled = [json.loads(line) for line in (run / "offline" / "labelled.jsonl").read_text().splitlines()]
    assert len(labelled) <= 8 and all(len(r["token_ids"]) == len(r["token_rewards"]) for r in labelled)
    assert (run / "final" / "config.json").exists() and (run / "final" / "behaviour" / "config.json").exists()
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]


def test_qsft_recipe_rejects_unknown_options(tiny_seq2seq, small_data, tmp_path):
    from mtrl.errors import MtrlError

    recipe = tiny_recipe(tiny_seq2seq, small_data, tmp_path, algorithm={"name": "qsft", "tua": 1})
    with pytest.raises(MtrlError, match=r"unknown key 'algorithm.tua' \(algorithm qsft does not use it\); did you mean 'tau'"):
        recipe_from_dict(recipe)


def test_summary_names_only_what_the_run_directory_holds(tmp_path, capsys):
    from mtrl.runner import print_run_summary

    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "offline").mkdir()
    print_run_summary({}, str(tmp_path))
    assert capsys.readouterr().out.strip() == f"run directory: {tmp_path} (eval.json, offline/)"


def test_reinforce_builds_no_value_head_and_refuses_ppo_keys(tiny_seq2seq, small_data, tmp_path):
    from mtrl.errors import MtrlError

    run = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run, algorithm={"name": "reinforce"})), quiet=True)
    rows = read_metrics(run)
    assert "value_loss" not in rows[0] and "policy_loss" in rows[0]
    assert not (run / "final" / "value_head.pt").exists()
    assert not any(k.startswith("value_head.") for k in torch.load(run / "checkpoints" / "step-000002" / "policy.pt"))
    bad = tiny_recipe(tiny_seq2seq, small_data, run, algorithm={"name": "reinforce", "value_lr": 1e-3})
    with pytest.raises(MtrlError, match=r"unknown key 'algorithm.value_lr' \(algorithm reinforce does not use it\)"):
        recipe_from_dict(bad)
