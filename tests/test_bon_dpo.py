"""Best-of-n SFT and DPO: selection and pairs by hand, the DPO loss by hand, a few steps on both tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtrl.algorithms.bon import BestOfN, BestOfNConfig, select_best
from mtrl.algorithms.dpo import DPO, DPOConfig, dpo_loss, fit_causal, fit_seq2seq, pair_loss, preference_pairs
from mtrl.algorithms.offline import pad_batch
from mtrl.algorithms.protocols import OfflineData, RunLog
from mtrl.algorithms.qsft import QSFTConfig, build_features
from mtrl.errors import MtrlError
from mtrl.policy import GenerationConfig
from mtrl.recipe import recipe_from_dict
from mtrl.runner import run as train
from tests.fixtures.runs import read_metrics, tiny_recipe


def row(src: str, mt: str, rewards: list[float], score: float | None = None) -> dict:
    return {"src": src, "mt": mt, "token_ids": list(range(3, 3 + len(rewards))), "token_rewards": rewards,
            "score": score}


# ------------------------------------------------------------------ selection and pairs
ROWS = [
    row("a", "a1", [0.0, -1.0], 0.9), row("a", "a2", [0.0, 0.0], 0.1), row("a", "a3", [-3.0, 0.0], 0.5),  # returns -1 0 -3
    row("b", "b1", [-2.0], 0.4), row("b", "b2", [-1.0, -1.0], 0.4),  # a tie: -2, -2
    row("c", "c1", [-10.0], 0.2), row("c", "c2", [-12.0], 0.3),
    row("d", "d1", [-4.0], 0.0),  # one row only
]


def mts(rows: list[dict]) -> list[str]:
    return [r["mt"] for r in rows]


def test_select_best_per_source_ties_and_threshold():
    assert mts(select_best(ROWS)) == ["a2", "b1", "c1", "d1"]  # b ties: its first row
    assert mts(select_best(ROWS, min_reward=-5.0)) == ["a2", "b1", "d1"]  # c's best (-10) is below
    assert mts(select_best(ROWS, min_reward=-2.0)) == ["a2", "b1"]  # >= keeps the threshold itself
    assert mts(select_best(ROWS, rank_by="score")) == ["a1", "b1", "c2", "d1"]
    assert select_best(ROWS, min_reward=1.0) == []
    with pytest.raises(MtrlError, match="by 'score' needs a 'score' in every labelled row"):
        select_best([row("a", "x", [0.0])], rank_by="score")


def test_preference_pairs_best_vs_worst_skip_ties():
    pairs = preference_pairs(ROWS)
    assert [(c["mt"], r["mt"]) for c, r in pairs] == [("a2", "a3"), ("c1", "c2")]  # b ties, d has one row
    assert [(c["mt"], r["mt"]) for c, r in preference_pairs(ROWS, "score")] == [("a1", "a2"), ("c2", "c1")]


# ------------------------------------------------------------------ the DPO loss
def test_dpo_loss_by_hand_and_its_gradient():
    chosen = torch.tensor([-5.0, -7.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -4.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-5.5, -6.0]), torch.tensor([-5.0, -4.5])
    beta = 0.5
    losses, rw, rl = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    # pair 0: m = .5 [(.5) - (-1)] = .75; pair 1: m = .5 [(-1) - (.5)] = -.75
    expected = [-math.log(1 / (1 + math.exp(-0.75))), -math.log(1 / (1 + math.exp(0.75)))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert rw.tolist() == pytest.approx([0.25, -0.5]) and rl.tolist() == pytest.approx([-0.5, 0.25])
    losses.mean().backward()
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)  # descent raises chosen, lowers rejected
    assert chosen.grad.tolist() == pytest.approx((-rejected.grad).tolist())
    # label smoothing ε: -(1-ε) log σ(m) - ε log σ(-m)
    smooth = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.2)[0]
    m = torch.tensor([0.75, -0.75])
    assert smooth.tolist() == pytest.approx((-0.8 * F.logsigmoid(m) - 0.2 * F.logsigmoid(-m)).tolist(), abs=1e-6)


@pytest.mark.parametrize("name", ["dpo", "bon"])
def test_config_errors_name_the_key(name):
    with pytest.raises(MtrlError, match="algorithm.rank_by: 'best' is not allowed; allowed: 'return', 'score'"):
        recipe_from_dict({"policy": {"model": "mtrl:tiny-marian"}, "algorithm": {"name": name, "rank_by": "best"}})
    with pytest.raises(MtrlError, match="algorithm.max_grad_norm: must be > 0"):
        recipe_from_dict({"policy": {"model": "mtrl:tiny-marian"}, "algorithm": {"name": name, "max_grad_norm": 0}})


@pytest.mark.parametrize("algorithm, words", [
    ({"name": "dpo", "betta": 0.1}, r"unknown key 'algorithm.betta' \(algorithm dpo does not use it\); did you mean 'beta'"),
    ({"name": "dpo", "beta": 0}, r"algorithm.beta: must be > 0, got 0"),
    ({"name": "dpo", "label_smoothing": 0.5}, r"algorithm.label_smoothing: must be in \[0, 0.5\), got 0.5"),
    ({"name": "dpo", "rank_by": "best"}, r"algorithm.rank_by"),
    ({"name": "bon", "tau": 0.1}, r"unknown key 'algorithm.tau' \(algorithm bon does not use it\)"),
    ({"name": "bon", "max_steps": 0}, r"algorithm.max_steps: must be >= 1 or -1, got 0"),
    ({"name": "bon", "min_reward": float("inf")}, r"algorithm.min_reward: must be a finite number or null, got inf"),
])
def test_recipe_rejects_bad_keys(algorithm, words, tiny_seq2seq, small_data, tmp_path):
    with pytest.raises(MtrlError, match=words):
        recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, tmp_path, algorithm=algorithm))


# ------------------------------------------------------------------ tiny models
SRC_MT = [("A man is riding a bike.", "Ein Mann fährt Fahrrad.", "Hund Hund Hund."),
          ("Two dogs play.", "Zwei Hunde spielen.", "Katze."),
          ("A cat sleeps.", "Eine Katze schläft.", "Ein Mann.")]


def make_pairs(tok, kind: str) -> list[tuple[dict, dict]]:
    def ids(text: str) -> list[int]:
        return tok(text_target=text).input_ids if kind == "seq2seq" else tok(text).input_ids + [tok.eos_token_id]

    return [(row(s, good, [0.0] * len(ids(good))) | {"token_ids": ids(good)},
             row(s, bad, [-1.0] * len(ids(bad))) | {"token_ids": ids(bad)}) for s, good, bad in SRC_MT]


def load_policy(path: Path):
    from mtrl.policy import Policy, load_model_and_tokenizer

    model, tok, kind = load_model_and_tokenizer(str(path))
    return Policy(model, tok, kind)


def margin_of(policy, ref, pairs, cfg: DPOConfig) -> float:
    feats = build_features([r for p in pairs for r in p], policy, QSFTConfig())
    batch = pad_batch(feats[0::2] + feats[1::2], policy.tokenizer.pad_token_id)
    with torch.no_grad():
        return pair_loss(policy.model, ref, batch, policy.kind, cfg)[1]["dpo_margin"]


def test_seq2seq_dpo_raises_the_margin(tiny_seq2seq: Path):
    import copy

    torch.manual_seed(0)
    policy = load_policy(tiny_seq2seq)
    ref = copy.deepcopy(policy.model).eval()
    pairs = make_pairs(policy.tokenizer, "seq2seq")
    cfg = DPOConfig(lr=1e-3, max_steps=4, batch_size=3, beta=0.5, logging_steps=1, sft_weight=0.1)
    assert margin_of(policy, ref, pairs, cfg) == pytest.approx(0.0, abs=1e-5)  # π = π_ref at the start
    history: list[dict] = []
    fit_seq2seq(policy, pairs, cfg, 0, history.append)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert history[0]["dpo_margin"] == pytest.approx(0.0, abs=1e-5)
    assert history[0]["loss"] > math.log(2)  # log 2 at m = 0, plus the SFT term
    after = margin_of(policy, ref, pairs, cfg)
    assert after > 0.1 and history[-1]["dpo_accuracy"] == 1.0


def test_forced_language_token_is_not_in_the_sequence_logprob(tiny_nllb: Path):
    from mtrl.algorithms.dpo import sequence_logprobs
    from mtrl.policy import Policy, PolicyConfig, load_model_and_tokenizer

    model, tok, kind = load_model_and_tokenizer(str(tiny_nllb))
    policy = Policy(model, tok, kind, PolicyConfig(model="", src_lang_code="eng_Latn", tgt_lang_code="deu_Latn"))
    ids = [policy.forced_bos_token_id] + tok(text_target="Ein Hund.").input_ids
    feats = build_features([row("A dog.", "Ein Hund.", [0.0] * len(ids)) | {"token_ids": ids}], policy, QSFTConfig())
    batch = pad_batch(feats, tok.pad_token_id, ["rewards"])
    with torch.no_grad():
        logps, counts = sequence_logprobs(model, batch, kind)
        full = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   decoder_input_ids=batch["decoder_input_ids"]).logits, -1)[0]
    by_hand = sum(full[t, ids[t]].item() for t in range(1, len(ids)))  # position 0 (the language token) left out
    assert counts.item() == len(ids) - 1 and logps.item() == pytest.approx(by_hand, abs=1e-4)


def test_causal_dpo_through_trl(tiny_causal: Path, tmp_path: Path):
    torch.manual_seed(0)
    policy = load_policy(tiny_causal)
    init = [p.detach().clone() for p in policy.model.parameters()]
    pairs = make_pairs(policy.tokenizer, "causal")
    logged: list[dict] = []
    cfg = DPOConfig(lr=1e-3, max_steps=3, batch_size=3, beta=0.5, logging_steps=1)
    fit_causal(policy, pairs, cfg, 0, logged.append, use_cpu=True, progress=False)
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert logged[0]["dpo_margin"] == pytest.approx(0.0, abs=1e-4)  # the reference is the initial policy
    assert logged[-1]["dpo_margin"] > logged[0]["dpo_margin"] and logged[-1]["dpo_accuracy"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(init, policy.model.parameters()))  # trained in place
    out = policy.model.generate(**policy.tokenizer(["A cat."], return_tensors="pt"), max_new_tokens=3)
    assert out.shape[1] >= 1  # plain generation still works after TRL's patching


# ------------------------------------------------------------------ fit on a labelled file, and through the runner
def given_rows(rows: list[dict]) -> OfflineData:
    return OfflineData([], lambda: rows, seed=0, temperature=1.0)


class Accel:
    device = torch.device("cpu")


def test_bon_fit_on_a_labelled_file(tiny_seq2seq: Path, tmp_path: Path):
    policy = load_policy(tiny_seq2seq)
    rows = [r for c, rj in make_pairs(policy.tokenizer, "seq2seq") for r in (rj, c)]
    logged, messages = [], []
    before = [p.detach().clone() for p in policy.model.parameters()]
    algo = BestOfN(BestOfNConfig(lr=1e-3, max_steps=2, batch_size=2, logging_steps=1), policy, None, GenerationConfig(), Accel(), 0)
    algo.fit(given_rows(rows), RunLog(messages.append, logged.append, progress=False))
    assert logged[0]["step"] == 0 and logged[0]["bon_kept"] == logged[0]["bon_sources"] == 3
    assert logged[0]["bon_best_value_mean"] == 0.0 > logged[0]["bon_value_mean"]  # the chosen rows have return 0
    assert [r["step"] for r in logged[1:]] == [1, 2] and "3 of 3 sources" in messages[-1]
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))
    with pytest.raises(MtrlError, match="no source's best row reaches min_reward 1.0"):
        BestOfN(BestOfNConfig(min_reward=1.0), policy, None, GenerationConfig(), Accel(), 0).fit(
            given_rows(rows), RunLog(print, print, progress=False))


def test_dpo_fit_refuses_all_ties(tiny_seq2seq: Path, tmp_path: Path):
    policy = load_policy(tiny_seq2seq)
    rows = [row("a", "x", [0.0]), row("a", "y", [0.0]), row("b", "z", [-1.0])]
    with pytest.raises(MtrlError, match="none of the 2 sources has two rows of different return"):
        DPO(DPOConfig(), policy, None, GenerationConfig(), Accel(), 0).fit(given_rows(rows),
                                                                           RunLog(print, print, progress=False))


@pytest.mark.parametrize("name", ["bon", "dpo"])
def test_recipe_samples_labels_trains_and_evaluates(name, tiny_seq2seq, small_data, tmp_path):
    run = tmp_path / "run"
    algorithm = {"name": name, "max_steps": 2, "batch_size": 2, "logging_steps": 1, "lr": 1e-3}
    recipe = tiny_recipe(tiny_seq2seq, small_data, run, offline={"num_sources": 4, "samples_per_source": 3},
                         reward={"mode": "hybrid", "scorer": "chrf", "hybrid_sentence": "r3hf"}, algorithm=algorithm)
    results = train(recipe_from_dict(recipe), quiet=True)
    assert {"before", "after"} <= set(results) and "chrf" in results["after"]
    assert (run / "final" / "config.json").exists() and (run / "offline" / "labelled.jsonl").exists()
    metrics = read_metrics(run)
    assert metrics[0]["step"] == 0 and [r["step"] for r in metrics[1:]] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in metrics[1:])
    if name == "dpo":
        assert {"dpo_margin", "dpo_accuracy"} <= set(metrics[1])


def test_dpo_recipe_on_a_causal_policy(tiny_causal, small_data, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_causal, small_data, run, offline={"num_sources": 4, "samples_per_source": 3},
                         algorithm={"name": "dpo", "max_steps": 2, "batch_size": 2, "logging_steps": 1, "lr": 1e-3})
    results = train(recipe_from_dict(recipe), quiet=True)
    assert "after" in results and (run / "final" / "config.json").exists() and not (run / "dpo").exists()
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]
