"""TWA: the loss and the post-error rule by hand; span membership; learning direction on both tiny models;
offline data from MQM TSV / annotated JSONL / plain JSONL; the whole run through the runner; bad keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtrl.algorithms.twa import (
    SeverityWeights,
    TWAConfig,
    aligned,
    build_features,
    collate,
    log1mexp,
    positive_tokens,
    severity_weight_fn,
    span_token_indices,
    train_twa,
    twa_loss,
)
from mtrl.detectors.spans import SEVERITY_MAPS
from mtrl.errors import MtrlError


@pytest.fixture()
def one_thread():
    """Tiny models train fastest on one thread (this machine is shared; more threads oversubscribe it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits_of(probs: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(probs).log()


# ------------------------------------------------------------------ the loss
def test_unlikelihood_term_is_minus_w_log_one_minus_span_prob():
    # V = 3; 4 positions: a positive token, a two-token error span (w = 5), an ignored token, padding.
    logits = logits_of([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.4, 0.4, 0.2]]])
    targets = torch.tensor([[0, 1, 2, 0]])
    positive = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    members = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])  # (N=1, B=1, T=4)
    loss, stats = twa_loss(logits, targets, positive, members, torch.tensor([5.0]))
    p_span = 0.6 * 0.6
    ce, ul = -math.log(0.5), -5.0 * math.log(1.0 - p_span)
    assert loss.item() == pytest.approx((ce + ul) / 3, abs=1e-5)  # 1 positive token + 2 span tokens
    assert stats["span_prob"] == pytest.approx(p_span, abs=1e-5)
    assert stats["unlikelihood"] == pytest.approx(-math.log(1 - p_span), abs=1e-5)
    assert stats["ce"] == pytest.approx(ce, abs=1e-5) and stats["positive_tokens"] == 1

    # two spans in two rows, weights 1 and 0: the zero-weight span adds tokens to the count, nothing else
    logits2 = logits_of([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]])
    targets2 = torch.tensor([[0, 1], [2, 2]])
    members2 = torch.zeros(2, 2, 2)
    members2[0, 0, 1] = 1.0
    members2[1, 1, :] = 1.0
    loss2, _ = twa_loss(logits2, targets2, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), members2, torch.tensor([1.0, 0.0]))
    assert loss2.item() == pytest.approx((-math.log(0.5) - math.log(1 - 0.6)) / 4, abs=1e-5)


def test_rows_without_errors_reduce_to_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[1, 4, 0, 6], [2, 2, 3, 0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).float()
    loss, stats = twa_loss(logits, targets, valid, torch.zeros(0, 2, 4), torch.zeros(0))
    ce = F.cross_entropy(logits[valid.bool()], targets[valid.bool()])
    assert loss.item() == pytest.approx(ce.item(), abs=1e-6)
    assert stats["error_spans"] == 0 and stats["unlikelihood"] == 0.0


def test_unlikelihood_is_finite_and_pushes_the_span_down_when_it_is_certain():
    x = torch.tensor([-50.0, -1.0, -0.5, -1e-3, -1e-9])
    ref = torch.log(1 - torch.exp(x.double())).float()
    assert torch.allclose(log1mexp(x)[:4], ref[:4], rtol=1e-4)
    assert torch.isfinite(log1mexp(x)).all()
    logits = torch.tensor([[[30.0, 0.0, 0.0]]], requires_grad=True)  # p(token 0) ~ 1
    loss, _ = twa_loss(logits, torch.tensor([[0]]), torch.zeros(1, 1), torch.ones(1, 1, 1), torch.tensor([1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    logits = torch.tensor([[[2.0, 0.0, 0.0]]], requires_grad=True)
    twa_loss(logits, torch.tensor([[0]]), torch.zeros(1, 1), torch.ones(1, 1, 1), torch.tensor([1.0]))[0].backward()
    assert logits.grad[0, 0, 0] > 0  # gradient descent lowers the error token's logit


def test_post_error_rule_masks_exactly_the_tokens_after_the_first_error():
    spans = [[6], [3, 4]]  # listed out of order: the earliest span decides
    trainable = [False] + [True] * 7  # position 0: a forced language token
    assert positive_tokens(8, spans, trainable, "ignore") == [False, True, True, False, False, False, False, False]
    assert positive_tokens(8, spans, trainable, "train") == [False, True, True, False, False, True, False, True]
    assert positive_tokens(4, [], [True] * 4, "ignore") == [True] * 4  # no error: every token
    assert positive_tokens(3, [[0, 1, 2]], [True] * 3, "ignore") == [False] * 3


def test_severity_weights_from_the_config_or_the_reward_map():
    minor_punct = {"start": 0, "end": 1, "severity": "minor", "category": "Fluency/Punctuation"}
    major = {"start": 0, "end": 1, "severity": "Major"}
    by_map = severity_weight_fn(TWAConfig(), SEVERITY_MAPS["wmt-mqm"])
    assert by_map(minor_punct) == pytest.approx(0.1) and by_map(major) == 5.0
    fixed = severity_weight_fn(TWAConfig(severity_weights=SeverityWeights(minor=1, major=3, critical=9)),
                               SEVERITY_MAPS["xcomet"])
    assert fixed(minor_punct) == 1.0 and fixed(major) == 3.0


# ------------------------------------------------------------------ span membership and features
def policy_of(path: Path):
    from mtrl.policy import Policy, load_model_and_tokenizer

    model, tok, kind = load_model_and_tokenizer(str(path))
    return Policy(model, tok, kind)


def row(policy, src: str, mt: str, bad: str | None = None, severity: str = "major") -> dict:
    from mtrl.algorithms.offline_data import policy_target_ids

    spans = []
    if bad is not None:
        start = mt.index(bad)
        spans = [{"start": start, "end": start + len(bad), "severity": severity}]
    ids = policy_target_ids(policy, mt)
    return {"src": src, "mt": mt, "token_ids": ids, "spans": spans}


def test_span_tokens_follow_the_rewarders_intervals(tiny_seq2seq):
    from mtrl.rewards import hypothesis_intervals

    policy = policy_of(tiny_seq2seq)
    r = row(policy, "A dog runs.", "Ein Katze läuft schnell.", bad="Katze")
    texts, offsets = hypothesis_intervals(policy.tokenizer, [r["token_ids"]], [r["mt"]])
    (members,) = span_token_indices(texts[0], offsets[0], r["spans"])
    assert members and "".join(texts[0][a:b] for a, b in (offsets[0][t] for t in members)).strip() == "Katze"


@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_features_put_spans_and_positives_on_the_right_targets(kind, tiny_seq2seq, tiny_causal):
    policy = policy_of(tiny_seq2seq if kind == "seq2seq" else tiny_causal)
    rows = [row(policy, "A dog runs.", "Ein Katze läuft schnell.", bad="Katze"),
            row(policy, "A cat.", "Eine Katze.")]
    feats = build_features(rows, policy, TWAConfig(), lambda sp: 5.0)
    batch = collate(feats, policy.tokenizer.pad_token_id)
    with torch.no_grad():
        logits, targets, positive, members = aligned(policy.model, batch, kind)
    assert logits.shape[:2] == targets.shape == positive.shape == members.shape[1:]
    tok = policy.tokenizer
    span_text = tok.decode(targets[0][members[0, 0].bool()].tolist())
    assert span_text.replace(" ", "") == "Katze" and batch["span_weights"].tolist() == [5.0]
    # row 0: only the tokens before "Katze" are positive ("Ein"); row 1 (clean): every token, EOS included
    assert tok.decode(targets[0][positive[0].bool()].tolist()).strip() == "Ein"
    n1 = len(rows[1]["token_ids"])
    assert positive[1].sum().item() == n1 and targets[1][positive[1].bool()].tolist() == rows[1]["token_ids"]


def test_forced_language_token_is_never_trained(tiny_nllb):
    from mtrl.policy import Policy, PolicyConfig, load_model_and_tokenizer

    model, tok, kind = load_model_and_tokenizer(str(tiny_nllb))
    policy = Policy(model, tok, kind, PolicyConfig(model="", src_lang_code="eng_Latn", tgt_lang_code="deu_Latn"))
    from mtrl.algorithms.offline_data import policy_target_ids

    ids = policy_target_ids(policy, "Ein Hund.")
    assert ids[0] == policy.forced_bos_token_id and ids[-1] == policy.eos_token_id
    feat = build_features([{"src": "A dog.", "mt": "Ein Hund.", "token_ids": ids, "spans": []}], policy, TWAConfig(),
                          lambda sp: 1.0)[0]
    assert feat["labels"][0] == -100 and feat["positive"][0] == 0.0 and all(feat["positive"][1:])


def test_build_features_names_a_row_without_spans(tiny_seq2seq):
    policy = policy_of(tiny_seq2seq)
    r = row(policy, "A cat.", "Eine Katze.")
    del r["spans"]
    with pytest.raises(MtrlError, match="twa row 1: no 'spans'"):
        build_features([r], policy, TWAConfig(), lambda sp: 1.0)


# ------------------------------------------------------------------ learning direction
def sequence_logprobs(policy, feats: list[dict]) -> torch.Tensor:
    """Per feature: log p of its whole target and of its first error span."""
    batch = collate(feats, policy.tokenizer.pad_token_id)
    with torch.no_grad():
        logits, targets, _, members = aligned(policy.model, batch, policy.kind)
        valid = (batch["labels"] if policy.kind == "seq2seq" else batch["labels"][:, 1:]) != -100
        logp = torch.gather(F.log_softmax(logits, -1), 2, targets.unsqueeze(-1)).squeeze(-1)
    whole = (logp * valid).sum(1)
    span = (members * logp.unsqueeze(0)).sum((1, 2))
    return whole, span


@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_a_few_steps_lower_the_error_span_and_raise_the_clean_target(kind, tiny_seq2seq, tiny_causal, one_thread):
    """A model that learnt an erroneous translation (SFT) unlearns its error span and learns the clean one."""
    torch.manual_seed(0)
    policy = policy_of(tiny_seq2seq if kind == "seq2seq" else tiny_causal)
    rows = [row(policy, "A dog runs fast.", "Ein Katze läuft schnell.", bad="Katze"),
            row(policy, "A dog runs fast.", "Ein Hund läuft schnell.")]
    sft = build_features([{**rows[0], "spans": []}], policy, TWAConfig(), lambda sp: 1.0)  # no spans: plain SFT
    train_twa(policy, sft, TWAConfig(lr=3e-3, max_steps=40, batch_size=1, logging_steps=40), lambda row: None)
    cfg = TWAConfig(lr=1e-3, max_steps=6, batch_size=2, logging_steps=2)
    feats = build_features(rows, policy, cfg, lambda sp: 1.0)
    whole0, span0 = sequence_logprobs(policy, feats)
    assert span0[0] > -10.0  # the unlikelihood only bites where the span is likely
    history: list[dict] = []
    train_twa(policy, feats, cfg, history.append)
    whole1, span1 = sequence_logprobs(policy, feats)
    assert span1[0] < span0[0] - 0.3  # p("Katze" | "Ein") went down
    assert whole1[1] > whole0[1] + 0.5  # the clean translation went up
    assert [h["step"] for h in history] == [2, 4, 6]
    assert {"loss", "ce", "unlikelihood", "span_prob", "error_spans", "grad_norm", "lr", "epoch"} <= set(history[0])


# ------------------------------------------------------------------ offline data (item 6)
MQM_TSV = ("system\tdoc\tdoc_id\tseg_id\trater\tsource\ttarget\tcategory\tseverity\n"
           "sysA\tt1\t1\t1\trater1\tA dog runs.\tEin <v>Katze</v> läuft.\tAccuracy/Mistranslation\tMajor\n"
           "sysA\tt1\t1\t1\trater1\tA dog runs.\tEin Katze läuft<v>.</v>\tFluency/Punctuation\tMinor\n"
           "sysA\tt1\t1\t2\trater1\tA cat sleeps.\tEine Katze schläft.\tNo-error\tNo-error\n"
           "ref\tt1\t1\t1\trater1\tA dog runs.\tEin Hund läuft.\tNo-error\tNo-error\n")


def offline(tmp_path: Path, data: Path, policy, log=None):
    from mtrl.algorithms.offline_data import OfflineConfig, offline_rows
    from mtrl.algorithms.protocols import RunLog
    from mtrl.detectors import load_detector
    from mtrl.rewards import RewardConfig, Rewarder

    rewarder = Rewarder(RewardConfig(severity_map="wmt-mqm"), load_detector("reference"), policy.tokenizer)
    return offline_rows(OfflineConfig(data=str(data)), policy, rewarder, [], tmp_path / "offline", max_new_tokens=8,
                        seed=0, log=RunLog(log or (lambda *a: None), lambda row: None, progress=False))


def test_offline_rows_from_a_google_mqm_tsv(tiny_seq2seq, tmp_path):
    policy = policy_of(tiny_seq2seq)
    (tmp_path / "mqm.tsv").write_text(MQM_TSV)
    rows = offline(tmp_path, tmp_path / "mqm.tsv", policy)
    assert [r["mt"] for r in rows] == ["Ein Katze läuft.", "Eine Katze schläft.", "Ein Hund läuft."]
    bad = rows[0]
    assert bad["src"] == "A dog runs." and bad["ref"] == "Ein Hund läuft."
    assert [(s["text"], s["severity"]) for s in bad["spans"]] == [("Katze", "major"), (".", "minor")]
    assert bad["token_ids"] == policy.tokenizer(text_target=bad["mt"]).input_ids  # the policy's tokenizer, EOS last
    assert len(bad["token_rewards"]) == len(bad["token_ids"]) and min(bad["token_rewards"]) == -5.0
    assert bad["score"] == pytest.approx(-5.1)  # wmt-mqm: major 5 + minor punctuation 0.1
    assert rows[1]["spans"] == [] and set(rows[1]["token_rewards"]) == {0.0}
    assert (tmp_path / "offline" / "labelled.jsonl").exists()
    # Q-SFT reads the same rows (token_rewards of the policy's tokens)
    from mtrl.algorithms.qsft import QSFTConfig
    from mtrl.algorithms.qsft import build_features as qsft_features

    assert len(qsft_features(rows, policy, QSFTConfig())) == 3


def test_offline_rows_from_xcomet_jsonl_plain_jsonl_and_label_output(tiny_causal, tmp_path):
    policy = policy_of(tiny_causal)
    xcomet = tmp_path / "xcomet.jsonl"
    xcomet.write_text(json.dumps({"src": "A dog.", "mt": "Ein Katze.", "score": 0.4,
                                  "spans": [{"start": 4, "end": 9, "severity": "minor", "confidence": 0.9}]}) + "\n")
    (r,) = offline(tmp_path, xcomet, policy)
    assert r["token_ids"][-1] == policy.eos_token_id and r["score"] == 0.4  # the row's own score is kept
    assert r["spans"][0]["text"] == "Katze" and min(r["token_rewards"]) == -1.0

    plain = tmp_path / "plain.jsonl"  # no spans: labelled here by the recipe's detector (reference)
    plain.write_text(json.dumps({"source": "A dog.", "hypothesis": "Ein Katze.", "reference": "Ein Hund."}) + "\n")
    (p,) = offline(tmp_path / "p", plain, policy)
    assert p["spans"] and len(p["token_ids"]) == len(p["token_rewards"])

    labelled = tmp_path / "p" / "offline" / "labelled.jsonl"  # `mtrl label` output is used as it is
    (again,) = offline(tmp_path / "q", labelled, policy)
    assert again["token_ids"] == p["token_ids"] and not (tmp_path / "q" / "offline").exists()

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(xcomet.read_text() + json.dumps({"src": "A cat.", "mt": "Eine Katze."}) + "\n")
    with pytest.raises(MtrlError, match="row 2 has no spans while others have"):
        offline(tmp_path, mixed, policy)
    bad_span = tmp_path / "bad.jsonl"
    bad_span.write_text(json.dumps({"src": "A.", "mt": "Ein.", "spans": [{"start": 2, "end": 40, "severity": "major"}]})
                        + "\n")
    with pytest.raises(MtrlError, match="row 1: span .* outside"):
        offline(tmp_path, bad_span, policy)
    with pytest.raises(MtrlError, match="no such file"):
        offline(tmp_path, tmp_path / "missing.jsonl", policy)


# ------------------------------------------------------------------ the whole run
def twa_recipe(model: Path, data: tuple[Path, Path], run_dir: Path, offline: dict, **algorithm) -> dict:
    train_file, eval_file = data
    return {"run_dir": str(run_dir), "seed": 1, "policy": {"model": str(model)},
            "data": {"train": str(train_file), "eval": str(eval_file)}, "detector": {"name": "reference"},
            "reward": {"severity_map": "wmt-mqm"},
            "algorithm": {"name": "twa", "max_steps": 2, "batch_size": 2, "lr": 1e-3, "logging_steps": 1, **algorithm},
            "offline": offline, "generation": {"max_new_tokens": 8, "eval_batch_size": 4},
            "train": {"report_to": [], "threads": 1}}


def test_mtrl_train_twa_on_an_mqm_tsv(tiny_seq2seq, small_data, tmp_path):
    from mtrl.recipe import recipe_from_dict
    from mtrl.runner import run as train

    (tmp_path / "mqm.tsv").write_text(MQM_TSV)
    run = tmp_path / "run"
    results = train(recipe_from_dict(twa_recipe(tiny_seq2seq, small_data, run, {"data": str(tmp_path / "mqm.tsv")})),
                    quiet=True)
    assert {"before", "after"} <= set(results) and "chrf" in results["after"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    from transformers import AutoModelForSeq2SeqLM

    before = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq).state_dict()
    after = AutoModelForSeq2SeqLM.from_pretrained(run / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len((run / "offline" / "labelled.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_mtrl_train_twa_on_the_policys_own_labelled_samples(kind, tiny_seq2seq, tiny_causal, small_data, tmp_path):
    from mtrl.recipe import recipe_from_dict
    from mtrl.runner import run as train

    run = tmp_path / "run"
    model = tiny_seq2seq if kind == "seq2seq" else tiny_causal
    recipe = twa_recipe(model, small_data, run, {"num_sources": 4, "samples_per_source": 2}, after_error="train")
    train(recipe_from_dict(recipe), quiet=True)
    labelled = [json.loads(line) for line in (run / "offline" / "labelled.jsonl").read_text().splitlines()]
    assert labelled and all("spans" in r for r in labelled)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "final" / "config.json").exists()


def test_gold_twa_recipe_loads():
    from mtrl.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "gold-twa.yaml")
    assert recipe.algorithm.name == "twa" and recipe.offline.data.endswith(".jsonl")
    assert recipe.policy.model == "mtrl:tiny-marian"


def test_bad_keys_are_one_line_errors(tiny_seq2seq, small_data, tmp_path):
    from mtrl.recipe import recipe_from_dict

    base = twa_recipe(tiny_seq2seq, small_data, tmp_path, {})
    for algo, words in [({"after_eror": "train"}, r"unknown key 'algorithm.after_eror' \(algorithm twa does not use it\)"
                                                  r"; did you mean 'after_error'"),
                        ({"after_error": "keep"}, r"algorithm.after_error: 'keep' is not allowed"),
                        ({"severity_weights": {"minor": 1, "major": 5}}, r"algorithm.severity_weights.*critical"),
                        ({"severity_weights": {"minor": 1, "major": -5, "critical": 9}},
                         r"algorithm.severity_weights.major: must be >= 0"),
                        ({"max_steps": 0}, r"algorithm.max_steps: must be >= 1 or -1, got 0"),
                        ({"tau": 0.1}, "algorithm twa does not use it")]:
        with pytest.raises(MtrlError, match=words):
            recipe_from_dict({**base, "algorithm": {**base["algorithm"], **algo}})
