"""Span -> token rewards (max / spread), their edge cases, the reward modes and real MQM data."""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from mtrl.detectors.base import Detection
from mtrl.detectors.spans import SEVERITIES, ErrorSpan, get_severity_map, sanitize_spans
from mtrl.errors import MtrlError
from mtrl.rewards import RewardConfig, Rewarder, allowed, spans_to_token_rewards, token_rewards
from mtrl.rewards.alignment import token_offsets
from tests.fixtures.tokenizers import FAMILIES, get_tokenizer, unicode_texts

texts = unicode_texts()
# MTRL_PROPERTY_EXAMPLES=1000 for a longer search (the default keeps the suite short)
PROPS = settings(max_examples=int(os.environ.get("MTRL_PROPERTY_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
XCOMET = get_severity_map("xcomet")
WMT = get_severity_map("wmt-mqm")
MQM = Path(__file__).resolve().parents[2] / "shared" / "data" / "mqm" / "mqm_wmt21-ted_en-de.dev.jsonl"


@pytest.fixture(scope="session", params=FAMILIES)
def tok(request) -> PreTrainedTokenizerFast:
    return get_tokenizer(request.param)


def _spans(n: int) -> st.SearchStrategy[list[ErrorSpan]]:
    span = st.builds(
        ErrorSpan,
        st.integers(-3, n + 3),
        st.integers(-3, n + 3),
        st.sampled_from(SEVERITIES),
        st.sampled_from([None, "Fluency/Punctuation", "Accuracy/Mistranslation", "Non-translation"]),
    )
    return st.lists(span, max_size=5)


def _expected_total(text: str, spans: list[ErrorSpan], smap) -> float:
    """Σ values of spans with at least one character after clipping (whitespace-only ones included)."""
    n = len(text)
    return sum(smap.value(s) for s in spans if min(max(s.end, 0), n) > min(max(s.start, 0), n))


def _overlaps_nonspace(text: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return lo < hi and not text[lo:hi].isspace()


# --- properties on every tokenizer family ----------------------------------


@PROPS
@given(data=st.data())
def test_spread_conserves_the_total(tok, data) -> None:
    text0 = data.draw(texts)
    ids = tok(text0)["input_ids"]
    text, off = token_offsets(tok, ids)
    spans = data.draw(_spans(len(text)))
    for smap in (XCOMET, WMT):
        r = spans_to_token_rewards(text, off, spans, smap, "spread")
        assert len(r) == len(off)
        assert math.isclose(sum(r), _expected_total(text, spans, smap), abs_tol=1e-9)
        if any(s < e for s, e in off):  # else everything lands on the last token
            assert all(r[t] == 0.0 for t, (s, e) in enumerate(off) if s == e)


@PROPS
@given(data=st.data())
def test_max_gives_map_values_and_the_most_severe(tok, data) -> None:
    ids = tok(data.draw(texts))["input_ids"]
    text, off = token_offsets(tok, ids)
    spans = data.draw(_spans(len(text)))
    smap = get_severity_map("wmt-mqm", no_error=0.25)
    r = spans_to_token_rewards(text, off, spans, smap, "max")
    map_values = {smap.no_error, *smap.values.values(), *smap.category_values.values()}
    assert len(r) == len(off) and set(r) <= map_values
    special = set(tok.all_special_ids)
    clean = sanitize_spans(text, spans)
    n = len(text)
    # whitespace-only spans are kept (blamed on the token holding the space), so may add to a token
    ws_only = any(text[max(0, sp.start):min(sp.end, n)].isspace() for sp in spans)
    for t, (s, e) in enumerate(off):
        if s == e or ids[t] in special:
            assert r[t] == smap.no_error
        hit = [smap.value(sp) for sp in clean if _overlaps_nonspace(text, (s, e), (sp.start, sp.end))]
        if hit:
            assert r[t] <= min(hit) if ws_only else r[t] == min(hit)
        elif not ws_only:
            assert r[t] == smap.no_error  # offsets partition the text: no nearest-token attachment


# --- explicit edge cases (hand-made offsets) --------------------------------

TEXT = "The cat  sat."
OFF = [(0, 3), (3, 7), (7, 8), (8, 12), (12, 13), (13, 13)]  # "The", " cat", " ", " sat", ".", </s>


def test_no_spans_and_no_tokens() -> None:
    assert spans_to_token_rewards(TEXT, OFF, [], XCOMET) == [0.0] * 6
    assert spans_to_token_rewards(TEXT, [], [ErrorSpan(0, 3, "major")], XCOMET, "spread") == []
    ne = get_severity_map("xcomet", no_error=0.5)
    assert spans_to_token_rewards(TEXT, OFF, [], ne) == [0.5] * 6


def test_max_whitespace_overlap_does_not_count() -> None:
    # span "cat" starts at the space before it (xCOMET style): trimmed; " sat" not touched
    r = spans_to_token_rewards(TEXT, OFF, [ErrorSpan(3, 8, "minor")], XCOMET, "max")
    assert r == [0.0, -1.0, 0.0, 0.0, 0.0, 0.0]


def test_max_most_severe_wins_and_spread_sums() -> None:
    spans = [ErrorSpan(4, 12, "minor"), ErrorSpan(9, 13, "critical")]
    assert spans_to_token_rewards(TEXT, OFF, spans, XCOMET, "max") == [0.0, -1.0, 0.0, -10.0, -10.0, 0.0]
    r = spans_to_token_rewards(TEXT, OFF, spans, XCOMET, "spread")
    # minor: 6 non-space chars, 3 on " cat" and 3 on " sat"; critical: 3 on " sat", 1 on "."
    assert r == pytest.approx([0.0, -0.5, 0.0, -0.5 - 7.5, -2.5, 0.0])
    assert sum(r) == pytest.approx(-11.0)


def test_spans_are_clipped_trimmed_and_empty_ones_dropped() -> None:
    spans = [ErrorSpan(-5, 2, "major"), ErrorSpan(12, 99, "minor"), ErrorSpan(7, 7, "critical"),
             ErrorSpan(20, 30, "critical"), ErrorSpan(9, 4, "critical")]
    r = spans_to_token_rewards(TEXT, OFF, spans, XCOMET, "spread")
    assert r == [-5.0, 0.0, 0.0, 0.0, -1.0, 0.0]


def test_whitespace_only_span_is_kept_on_the_token_holding_the_space() -> None:
    r = spans_to_token_rewards(TEXT, OFF, [ErrorSpan(7, 8, "minor", "Fluency/Punctuation")], WMT, "spread")
    assert r == [0.0, 0.0, -0.1, 0.0, 0.0, 0.0]
    # a whitespace-only span no token holds goes to the nearest token
    r = spans_to_token_rewards("a  b", [(0, 1), (3, 4)], [ErrorSpan(1, 3, "major")], XCOMET, "max")
    assert r == [0.0, -5.0]


def test_span_in_a_gap_goes_to_the_nearest_token() -> None:
    off = [(0, 3), (3, 3), (3, 3), (8, 12), (12, 13)]  # characters 3..8 covered by no token
    assert spans_to_token_rewards(TEXT, off, [ErrorSpan(4, 5, "major")], XCOMET, "spread") == [-5.0, 0.0, 0.0, 0.0, 0.0]
    assert spans_to_token_rewards(TEXT, off, [ErrorSpan(6, 7, "major")], XCOMET, "spread") == [0.0, 0.0, 0.0, -5.0, 0.0]
    # equally far from both neighbours: the later token
    assert spans_to_token_rewards(TEXT, off, [ErrorSpan(4, 7, "major")], XCOMET, "max") == [0.0, 0.0, 0.0, -5.0, 0.0]
    # no token has characters at all: the last one (EOS) takes it
    assert spans_to_token_rewards(TEXT, [(0, 0), (0, 0)], [ErrorSpan(0, 3, "minor")], XCOMET, "spread") == [0.0, -1.0]


def test_special_tokens_never_take_a_value() -> None:
    off = [(0, 0), (0, 3), (3, 3), (3, 7)]  # BOS, "The", special in the middle, " cat"
    r = spans_to_token_rewards("The cat", off, [ErrorSpan(0, 7, "major")], XCOMET, "max")
    assert r == [0.0, -5.0, 0.0, -5.0]


def test_shared_interval_tokens_split_the_character() -> None:
    off = [(0, 1), (1, 2), (1, 2), (1, 2)]  # "a" then an emoji in three byte tokens
    r = spans_to_token_rewards("a😀", off, [ErrorSpan(1, 2, "critical")], XCOMET, "spread")
    assert r == pytest.approx([0.0, -10 / 3, -10 / 3, -10 / 3])
    assert spans_to_token_rewards("a😀", off, [ErrorSpan(1, 2, "critical")], XCOMET, "max") == [0.0, -10.0, -10.0, -10.0]


def test_non_monotone_offsets_and_dict_spans() -> None:
    off = [(4, 7), (0, 3), (8, 12)]
    r = spans_to_token_rewards(TEXT, off, [{"start": 0, "end": 3, "severity": "MAJOR"}], "xcomet", "max")
    assert r == [0.0, -5.0, 0.0]


def test_bad_token_reward_mode() -> None:
    with pytest.raises(MtrlError, match="token_rewards.*allowed: max, spread"):
        spans_to_token_rewards(TEXT, OFF, [], XCOMET, "sum")


# --- RewardConfig and the reward modes ---------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [({"mode": "r4hf"}, "mode"), ({"token_rewards": "mean"}, "token_rewards"), ({"severity_map": "mqm"}, "severity_map"),
     ({"severity_map": {"minor": -1}}, "severity_map"), ({"no_error": "x"}, "no_error"),
     ({"hybrid_weight": float("nan")}, "hybrid_weight")],
)
def test_config_validation_names_the_key(kwargs, key) -> None:
    with pytest.raises(MtrlError, match=f"reward.{key}"):
        RewardConfig.from_dict(kwargs)
    with pytest.raises(MtrlError, match="unknown key 'reward.mdoe'; did you mean 'mode'"):
        RewardConfig.from_dict({"mdoe": "token"})


def test_config_resolves_the_map_and_no_error() -> None:
    cfg = RewardConfig.from_dict({"severity_map": {"minor": -2, "major": -4, "critical": -8}, "no_error": 0.1})
    assert cfg.severity().values["major"] == -4 and cfg.severity().no_error == 0.1
    assert RewardConfig().severity() == XCOMET and allowed("mode") == ("token", "sentence", "hybrid", "r3hf")
    assert allowed("token_rewards") == ("max", "spread") and allowed("severity_map") == ()


def test_reward_modes() -> None:
    det = Detection([ErrorSpan(4, 7, "major")], score=0.8)
    tok = RewardConfig(mode="token")
    assert token_rewards(det, TEXT, OFF, tok) == [0.0, -5.0, 0.0, 0.0, 0.0, 0.0]
    assert token_rewards(det, TEXT, OFF, RewardConfig(mode="sentence")) == [0.0] * 5 + [0.8]  # on EOS
    hyb = token_rewards(det, TEXT, OFF, RewardConfig(mode="hybrid", hybrid_weight=2.0, no_error=0.5))
    assert hyb == [0.5, -5.0, 0.5, 0.5, 0.5, 0.5 + 1.6]
    assert token_rewards(det, "", [], tok) == []


# --- real MQM spans -----------------------------------------------------------


def _remap(src: str, dst: str, spans: list[ErrorSpan]) -> list[ErrorSpan]:
    """Move spans from ``src`` onto ``dst`` through a character alignment (decode added spaces)."""
    if src == dst:
        return spans
    pos: dict[int, int] = {}
    for a, b, size in difflib.SequenceMatcher(None, src, dst, autojunk=False).get_matching_blocks():
        for k in range(size):
            pos[a + k] = b + k
    out = []
    for s in spans:
        kept = [pos[i] for i in range(s.start, s.end) if i in pos]
        assert kept, f"span {s} lost in decoding"
        out.append(ErrorSpan(kept[0], kept[-1] + 1, s.severity, s.category))
    return out


@pytest.mark.skipif(not MQM.exists(), reason="shared/data not available")
@pytest.mark.parametrize("family", FAMILIES)
def test_mqm_spread_equals_minus_penalty(family: str) -> None:
    tokenizer = get_tokenizer(family)
    rows = [json.loads(line) for line in MQM.read_text(encoding="utf-8").splitlines()]
    ws_only = 0
    for row in rows:
        assert len(row["raters"]) == 1
        hyp = row["hypothesis"]
        spans = [ErrorSpan.from_dict(s) for s in row["error_spans"]]
        ws_only += sum(not hyp[s.start:s.end].strip() for s in spans)
        text, off = token_offsets(tokenizer, tokenizer(hyp)["input_ids"])
        r = spans_to_token_rewards(text, off, _remap(hyp, text, spans), WMT, "spread")
        weights = WMT.penalty(spans)
        assert math.isclose(sum(r), weights, abs_tol=1e-9), row["id"]
        assert math.isclose(sum(r), -row["mqm_penalty"], abs_tol=1e-9), row["id"]
    assert ws_only == 0  # none in this slice; they would be kept (see _prepare), not dropped


def test_omission_penalty_goes_on_the_final_token_in_token_mode():
    from mtrl.detectors.base import Detection
    from mtrl.detectors.spans import ErrorSpan
    from mtrl.rewards import RewardConfig, token_rewards

    text, offsets = "ab cd", [(0, 2), (2, 5), (5, 5)]
    det = Detection([ErrorSpan(0, 2, "major")], score=-15.0, omission_penalty=-10.0)
    assert token_rewards(det, text, offsets, RewardConfig(mode="token")) == [-5.0, 0.0, -10.0]
    # hybrid and sentence already carry it inside the score
    assert token_rewards(det, text, offsets, RewardConfig(mode="sentence")) == [0.0, 0.0, -15.0]
    assert token_rewards(det, text, offsets, RewardConfig(mode="hybrid")) == [-5.0, 0.0, -15.0]


def test_hybrid_sentence_score_from_another_scorer():
    from mtrl.detectors.base import Detection
    from mtrl.detectors.spans import ErrorSpan
    from mtrl.rewards import RewardConfig, token_rewards

    text, offsets = "ab cd", [(0, 2), (2, 5), (5, 5)]
    det = Detection([ErrorSpan(0, 2, "major")], score=-15.0, omission_penalty=-10.0)
    cfg = RewardConfig(mode="hybrid", scorer="chrf", hybrid_weight=0.5)
    assert token_rewards(det, text, offsets, cfg, sentence_score=40.0) == [-5.0, 0.0, 20.0]


@pytest.mark.parametrize("where", ["last", "r3hf"])
def test_rewarder_hybrid_with_chrf(where):
    """Spans of the reference detector + chrF, on the last token or redistributed (R3HF) over the tokens."""
    import torch
    from sacrebleu import sentence_chrf

    from mtrl.detectors import load_detector
    from mtrl.rewards import Rewarder, hypothesis_intervals
    from mtrl.rollout import response_ids, reward_tensor

    tok = get_tokenizer("unigram")
    hyps = ["Ein Mann schläft auf einem grünen Sofa.", "Zwei Hunde spielen im Schnee."]
    refs = ["Ein Mann schläft in einem grünen Raum auf einem Sofa.", "Zwei Hunde laufen durch den Schnee."]
    ids = [tok(h)["input_ids"] for h in hyps]
    width = max(map(len, ids)) + 2  # padding after every row
    responses = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    cfg = RewardConfig(mode="hybrid", scorer="chrf", hybrid_sentence=where, hybrid_weight=2.0)
    rewarder = Rewarder(cfg, load_detector("reference"), tok)
    out = rewarder(["", ""], None, refs, response_ids(responses, mask))
    assert out.token_ids == ids
    rewards = reward_tensor(out.token_rewards, responses.shape, mask)
    assert float(rewards[mask == 0].abs().sum()) == 0.0
    texts, offsets = hypothesis_intervals(tok, ids)
    assert out.hypotheses == texts
    for i, (text, det) in enumerate(zip(texts, out.detections)):
        n = len(ids[i])
        spans = spans_to_token_rewards(text, offsets[i], det.spans, cfg.severity(), "max")
        extra = rewards[i, :n] - torch.tensor(spans)
        chrf = sentence_chrf(text, [refs[i]]).score
        assert float(extra.sum()) == pytest.approx(2.0 * (chrf - sentence_chrf("", [refs[i]]).score), abs=1e-3)
        if where == "last":  # all of it on the final token
            assert float(extra[:-1].abs().sum()) == 0.0
        else:  # spread: more than one token carries part of it
            assert int((extra.abs() > 1e-6).sum()) > 1
    assert any(d.spans for d in out.detections)  # the detector's spans are really in there


def test_rewarder_scale_float32_and_given_hypotheses():
    """``scale`` multiplies every reward (float32, as trained); given hypotheses are encoded once."""
    import numpy as np

    from mtrl.detectors import load_detector

    tok = get_tokenizer("unigram")
    hyps, refs = ["Ein Hund schläft.", "Zwei Katzen."], ["Eine Katze schläft.", "Zwei Katzen."]
    plain = Rewarder(RewardConfig(mode="hybrid"), load_detector("reference"), tok)(["", ""], hyps, refs)
    scaled = Rewarder(RewardConfig(mode="hybrid", scale=0.05), load_detector("reference"), tok)(["", ""], hyps, refs)
    assert plain.token_ids == scaled.token_ids == [tok(text_target=h)["input_ids"] for h in hyps]
    assert plain.hypotheses == hyps and plain.scores == scaled.scores
    for a, b in zip(plain.token_rewards, scaled.token_rewards):
        assert b == (np.asarray(a, dtype=np.float32) * np.float32(0.05)).tolist()
    assert min(plain.token_rewards[0]) < 0 and plain.token_rewards[0] != plain.token_rewards[1]


def test_rewarder_cache_counts_a_repeat_within_a_batch_as_a_hit():
    from mtrl.detectors import load_detector

    rewarder = Rewarder(RewardConfig(), load_detector("reference"))
    calls = []
    detect = rewarder.detector.detect
    rewarder.detector.detect = lambda s, h, r: calls.append(len(h)) or detect(s, h, r)
    src, hyp, ref = ["A dog."] * 3, ["Ein Hund.", "Ein Hund.", "Eine Katze."], ["Ein Hund."] * 3
    rewarder.detect(src, hyp, ref)
    assert calls == [2] and (rewarder.hits, rewarder.misses) == (1, 2)  # the repeat is detected once
    rewarder.detect(src[:1], hyp[:1], ref[:1])
    assert calls == [2] and (rewarder.hits, rewarder.misses) == (2, 2)
    out = rewarder(src, hyp, ref)  # the call goes through the same cache; no tokenizer: no token rewards
    assert calls == [2] and out.token_ids is None and out.token_rewards is None
    assert out.scores[0] == out.scores[1] > out.scores[2]
