"""The embedded ``reference`` detector: its documented rules, and that it beats chrF on MQM dev."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtrl.detectors import load_detector
from mtrl.detectors.reference import ReferenceDetector
from mtrl.detectors.spans import sanitize_spans
from mtrl.errors import MtrlError

MQM_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "mqm" / "mqm_wmt21-ted_en-de.dev.jsonl"

SRC = "The meeting is on 12 May in Berlin."
REF = "Das Treffen ist am 12. Mai in Berlin."


@pytest.fixture(scope="module")
def det() -> ReferenceDetector:
    return ReferenceDetector()


def marked(hyp: str, d) -> list[tuple[str, str]]:
    return [(hyp[s.start:s.end], s.severity) for s in d.spans]


def test_load_detector_builds_it():
    d = load_detector("reference")
    assert isinstance(d, ReferenceDetector)
    assert d.name == "reference" and d.needs_reference


def test_identical_hypothesis_has_no_spans_and_top_score(det):
    same, other = det.detect([SRC, SRC], [REF, "Das Treffen ist am 12. Mai in Hamburg."], [REF, REF])
    assert same.spans == []
    assert same.score == 0.0
    assert other.score < same.score


def test_wrong_number_is_major_exactly_on_the_number(det):
    hyp = "Das Treffen ist am 13. Mai in Berlin."
    (d,) = det.detect([SRC], [hyp], [REF])
    assert len(d.spans) == 1
    assert hyp[d.spans[0].start:d.spans[0].end] == "13"
    assert d.spans[0].severity in ("major", "critical")


def test_number_formats_are_the_same_number(det):
    (d,) = det.detect(["It costs 1,000 euros."], ["Es kostet 1.000 Euro."], ["Es kostet 1000 Euro."])
    assert d.spans == []


def test_function_word_substitution_is_minor(det):
    hyp = "The cat is sitting on the table."
    (d,) = det.detect(["x"], [hyp], ["The cat is sitting at the table."])
    assert marked(hyp, d) == [("on", "minor")]


def test_content_word_substitution_is_major(det):
    hyp = "Die Sonne verbrennt unser peripheres Gehör."
    (d,) = det.detect(["x"], [hyp], ["Die Sonne verbrennt unser peripheres Sehen."])
    assert marked(hyp, d) == [("Gehör", "major")]


def test_inflection_variant_is_minor_not_major(det):
    hyp = "Die Sonne verbrennt unser periphere Sehen."
    (d,) = det.detect(["x"], [hyp], ["Die Sonne verbrennt unser peripheres Sehen."])
    assert marked(hyp, d) == [("periphere", "minor")]


def test_adjacent_unsupported_words_form_one_span_with_worst_severity(det):
    hyp = "Das Treffen ist in der großen Halle am 12. Mai in Berlin."
    (d,) = det.detect([SRC], [hyp], [REF])
    assert marked(hyp, d) == [("in der großen Halle", "major")]


def test_untranslated_copy_of_source_is_critical(det):
    (d,) = det.detect([SRC], [SRC], [REF])
    assert [s.severity for s in d.spans] == ["critical"]
    assert (d.spans[0].start, d.spans[0].end) == (0, len(SRC))


def test_wrong_script_is_critical(det):
    hyp = "Встреча состоится 12 мая в Берлине."
    (d,) = det.detect([SRC], [hyp], [REF])
    assert [s.severity for s in d.spans] == ["critical"]


def test_latin_names_in_cyrillic_text_are_not_wrong_script(det):
    hyp = "EverGrow сильно отличается от Shiba Inu."
    (d,) = det.detect(["x"], [hyp], ["EverGrow имеет мало общего с Shiba Inu."])
    assert d.spans and all(s.severity != "critical" for s in d.spans)


def test_mostly_unsupported_is_critical_but_a_short_paraphrase_is_not(det):
    ref = "Die Sonne verbrennt unser peripheres Sehen, sagte die Forscherin gestern."
    hallucination = "Bitte klicken Sie hier, um Ihr Passwort zurückzusetzen und Hilfe anzufordern."
    d_bad, d_short = det.detect(["x", "x"], [hallucination, "Tausend Dank!"], [ref, "Vielen Dank."])
    assert [s.severity for s in d_bad.spans] == ["critical"]
    assert all(s.severity != "critical" for s in d_short.spans)
    assert d_bad.score < d_short.score


def test_more_errors_score_lower(det):
    one, two = det.detect(
        [SRC, SRC],
        ["Das Treffen ist am 13. Mai in Berlin.", "Das Treffen ist am 13. Juni in Berlin."],
        [REF, REF],
    )
    assert two.score < one.score < 0


def test_spans_stay_inside_and_are_sanitized(det):
    hyps = [
        "  Das Treffen findet am 13. Mai statt.  ",
        "\tEin völlig anderer Satz über Katzen und Hunde, 42 Stück!\n",
        "Das Treffen, das Treffen, das Treffen ist am 12. Mai.",
        "Встреча 12 мая.",
        "",
        "   ",
        "!!! ???",
    ]
    out = det.detect([SRC] * len(hyps), hyps, [REF] * len(hyps))
    assert len(out) == len(hyps)
    for hyp, d in zip(hyps, out, strict=True):
        for s in d.spans:
            assert 0 <= s.start < s.end <= len(hyp)
            assert not hyp[s.start].isspace() and not hyp[s.end - 1].isspace()
        assert d.spans == sanitize_spans(hyp, d.spans)
        assert d.score <= 0.0


def test_empty_hypothesis_has_no_span_but_a_bad_score(det):
    (d,) = det.detect([SRC], [""], [REF])
    assert d.spans == [] and d.score < 0


def test_cjk_is_aligned_by_character(det):
    ref = "我们明天去上海开会。"
    hyp = "我们明天去北京开会。"
    same, diff = det.detect(["x", "x"], [ref, hyp], [ref, ref])
    assert same.spans == [] and same.score == 0.0
    assert marked(hyp, diff) == [("北京", "major")]

    ja_ref, ja_hyp = "私は昨日大阪に行きました。", "私は昨日東京に行きました。"
    (d,) = det.detect(["x"], [ja_hyp], [ja_ref])
    assert marked(ja_hyp, d) == [("東京", "major")]


def test_missing_reference_raises_mtrl_error(det):
    with pytest.raises(MtrlError, match="reference detector needs references"):
        det.detect([SRC], [REF], None)
    with pytest.raises(MtrlError, match="reference detector needs references"):
        det.detect([SRC, SRC], [REF, REF], [REF, None])


def test_custom_severity_map_changes_the_score_scale():
    hyp = "Das Treffen ist am 13. Mai in Berlin."
    det = ReferenceDetector(severity_map={"minor": -1, "major": -2, "critical": -3})
    (d,) = det.detect([SRC], [hyp], [REF])
    assert d.score == -2.0


@pytest.mark.skipif(not MQM_DEV.exists(), reason="shared MQM data not available")
def test_beats_chrf_kendall_tau_on_mqm_dev(det):
    from sacrebleu import sentence_chrf
    from scipy.stats import kendalltau

    with MQM_DEV.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    human = [-r["mqm_penalty"] for r in rows]
    ours = [d.score for d in det.detect([r["source"] for r in rows], [r["hypothesis"] for r in rows],
                                        [r["reference"] for r in rows])]
    chrf = [sentence_chrf(r["hypothesis"], [r["reference"]]).score for r in rows]
    tau_ours, tau_chrf = kendalltau(ours, human).statistic, kendalltau(chrf, human).statistic
    assert tau_ours > tau_chrf, (tau_ours, tau_chrf)


def test_omission_weight_penalises_left_out_content_words():
    plain, strict = ReferenceDetector(), ReferenceDetector(omission_weight=5)
    ref = "Ein Mann fährt ein rotes Fahrrad."
    short, full = "Ein Mann.", "Ein Mann fährt ein rotes Fahrrad."
    # precision-only by default: dropping words costs nothing
    assert plain.detect([""], [short], [ref])[0].score == plain.detect([""], [full], [ref])[0].score == 0.0
    d = strict.detect([""], [short], [ref])[0]
    assert d.extra["omissions"] == 3  # fährt, rotes, Fahrrad
    assert d.extra["omitted_function_words"] == 1  # the second 'ein', at minor/major = 1/5 of a content word
    assert d.score == pytest.approx(-5 * (3 + 1 / 5))
    assert d.spans == []  # an omission has no place in the hypothesis
    assert strict.detect([""], [full], [ref])[0].score == 0.0


def test_unknown_detector_option_is_a_user_error():
    from mtrl.detectors import load_detector

    with pytest.raises(MtrlError, match="reference detector: got an unexpected keyword argument 'omision_weight'"):
        load_detector("reference", omision_weight=1)
