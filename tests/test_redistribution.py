"""R3HF redistribution: telescoping on real WMT22 outputs, batching, word level, the comet scorer, training."""

from __future__ import annotations

import pandas as pd
import pytest
from sacrebleu import sentence_chrf

from mtrl.detectors import load_detector
from mtrl.errors import MtrlError
from mtrl.rewards.alignment import token_offsets
from mtrl.rewards.redistribution import (
    Redistributor,
    prefix_boundaries,
    spread_words,
    word_ends,
)
from mtrl.rewards.scorers import load_scorer
from mtrl.score import score
from tests.fixtures.tokenizers import get_tokenizer


@pytest.fixture(scope="module")
def wmt22(shared_data):
    rows = []
    for lp in ("en-de", "zh-en"):
        df = pd.read_csv(shared_data / "wmt22" / f"wmt22_{lp}.dev.tsv", sep="\t", keep_default_na=False)
        hyp = [c for c in df.columns if c.startswith("hyp_")][0]
        rows += list(zip(df["source"][:25], df[hyp][:25], df["ref_A"][:25]))
    return rows


@pytest.mark.parametrize("family", ["unigram", "bytelevel"])
@pytest.mark.parametrize("scorer_name", ["chrf", "detector"])
def test_rewards_telescope_on_real_outputs(wmt22, family, scorer_name):
    tok = get_tokenizer(family)
    srcs, hyps, refs = (list(x) for x in zip(*wmt22))
    texts, offsets = zip(*(token_offsets(tok, tok(h)["input_ids"]) for h in hyps))
    scorer = load_scorer(scorer_name, load_detector("reference"))
    rewards, full = Redistributor(scorer)(srcs, list(texts), list(offsets), refs)
    empty = scorer.score(srcs, [""] * len(srcs), refs)
    for t, o, r, f, e, ref in zip(texts, offsets, rewards, full, empty, refs):
        assert len(r) == len(o)
        assert sum(r) == pytest.approx(f - e, abs=1e-9)
        if scorer_name == "chrf":  # the same scale as sacrebleu's own sentence chrF
            assert f == pytest.approx(sentence_chrf(t, [ref]).score, abs=1e-12)


def test_batched_equals_one_by_one(wmt22):
    tok = get_tokenizer("unigram")
    srcs, hyps, refs = (list(x) for x in zip(*wmt22[:10]))
    enc = [token_offsets(tok, tok(h)["input_ids"]) for h in hyps]
    scorer = load_scorer("chrf")
    batched, _ = Redistributor(scorer)(srcs, [t for t, _ in enc], [o for _, o in enc], refs)
    single = [Redistributor(scorer)([s], [t], [o], [r])[0][0] for s, (t, o), r in zip(srcs, enc, refs)]
    assert batched == single


def test_word_level_conserves_and_is_cheaper(wmt22):
    tok = get_tokenizer("bytelevel")
    srcs, hyps, refs = (list(x) for x in zip(*wmt22[:10]))
    enc = [token_offsets(tok, tok(h)["input_ids"]) for h in hyps]
    calls = {}
    for level in ("token", "word"):
        red = Redistributor(load_scorer("chrf"), level)
        rewards, full = red(srcs, [t for t, _ in enc], [o for _, o in enc], refs)
        calls[level] = len(red.cache)
        empty = [sentence_chrf("", [r]).score for r in refs]
        assert all(sum(r) == pytest.approx(f - e, abs=1e-9) for r, f, e in zip(rewards, full, empty))
    assert calls["word"] < calls["token"]


def test_prefix_boundaries_and_spread_words():
    text = "ab cd"
    offsets = [(0, 0), (0, 2), (2, 5), (5, 5)]  # BOS, "ab", " cd", EOS
    assert prefix_boundaries(text, offsets) == [0, 2, 5, 5]
    # words end at 2 and 5; word 2 (" cd", chars 2-5) lies in token 2 only
    assert spread_words(text, offsets, [2, 5], [1.0, 3.0]) == [0.0, 1.0, 3.0, 0.0]
    assert spread_words(text, [(0, 1), (1, 3), (3, 5)], [2, 5], [2.0, 3.0]) == [1.0, 1.0 + 1.0, 2.0]
    assert word_ends(" ab  cd ") == [3, 7] and word_ends("") == []


def test_redistributor_refuses_an_unknown_level():
    with pytest.raises(MtrlError, match="allowed: token, word"):
        Redistributor(load_scorer("chrf"), "sentence")


def test_score_api_r3hf_needs_a_tokenizer_and_references():
    with pytest.raises(MtrlError, match="give a tokenizer"):
        score(["Hallo Welt"], ["Hello world"], ["Hallo Welt"], reward={"mode": "r3hf", "scorer": "chrf"})
    with pytest.raises(MtrlError, match="needs a reference"):
        score(["Hallo"], ["Hello"], None, tokenizer=get_tokenizer("unigram"), reward={"mode": "r3hf", "scorer": "bleu"})


HYB_HYPS = ["Ein Hund schläft auf dem Sofa.", "Zwei Kinder spielen im Park."]
HYB_SRCS = ["A cat sleeps on the green sofa.", "Two children play in the park."]
HYB_REFS = ["Eine Katze schläft auf dem grünen Sofa.", "Zwei Kinder spielen im Park."]


@pytest.mark.parametrize("reward", [
    {"mode": "hybrid", "scorer": "chrf", "hybrid_weight": 2.0},
    {"mode": "hybrid", "scorer": "chrf", "hybrid_sentence": "r3hf", "hybrid_weight": 2.0},
    {"mode": "hybrid", "hybrid_sentence": "r3hf", "hybrid_weight": 2.0},
    {"mode": "hybrid", "hybrid_weight": 2.0},
])
def test_score_api_computes_every_hybrid_training_reward(reward):
    """score() goes through the training rewarder: another scorer, or an R3HF spread, is now computed
    (it used to be refused). The part beyond the span penalties is hybrid_weight x the sentence score,
    on the last token or spread so that it telescopes to S(hyp) - S("")."""
    tok = get_tokenizer("unigram")
    spans_only = score(HYB_HYPS, HYB_SRCS, HYB_REFS, tokenizer=tok, reward={"mode": "hybrid", "hybrid_weight": 0.0})
    out = score(HYB_HYPS, HYB_SRCS, HYB_REFS, tokenizer=tok, reward=reward)
    scorer = load_scorer(reward.get("scorer", "detector"), load_detector("reference"))
    full = scorer.score(HYB_SRCS, HYB_HYPS, HYB_REFS)
    empty = scorer.score(HYB_SRCS, ["", ""], HYB_REFS)
    spread = reward.get("hybrid_sentence") == "r3hf"
    for seg, base, f, e in zip(out, spans_only, full, empty):
        assert seg.token_ids == base.token_ids == tok(text_target=seg.hypothesis)["input_ids"]
        assert seg.score == base.score  # the row's score is the detector's in hybrid mode
        extra = [a - b for a, b in zip(seg.token_rewards, base.token_rewards)]
        assert sum(extra) == pytest.approx(2.0 * ((f - e) if spread else f), abs=1e-3)
        if spread:
            assert sum(abs(x) > 1e-6 for x in extra) > 1
        else:
            assert all(x == 0.0 for x in extra[:-1])
    assert any(seg.spans for seg in out) and out[0].token_rewards != out[1].token_rewards


def test_comet_scorer_on_the_tiny_xcomet_checkpoint(tiny_xcomet_ckpt):
    tok = get_tokenizer("unigram")
    hyps = ["Ein Mann fährt KAPUTT Fahrrad.", "Zwei Hunde spielen."]
    out = score(hyps, ["A man rides a bike.", "Two dogs play."], ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen."],
                tokenizer=tok, reward={"mode": "r3hf", "scorer": "comet", "scorer_model": str(tiny_xcomet_ckpt)})
    scorer = load_scorer("comet", model=str(tiny_xcomet_ckpt))
    empty = scorer.score(["A man rides a bike.", "Two dogs play."], ["", ""],
                         ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen."])
    for seg, e in zip(out, empty):
        assert sum(seg.token_rewards) == pytest.approx(seg.score - e, abs=1e-5)
