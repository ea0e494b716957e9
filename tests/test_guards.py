"""Reward guards: each check on real and gamed text, how the rewarder applies them in every reward mode, when
they are on by default, and ``mtrl score --guards``."""

from __future__ import annotations

import json

import pytest

from mtrl.cli import main
from mtrl.detectors import Detection, Detector
from mtrl.errors import MtrlError
from mtrl.rewards import RewardConfig, Rewarder
from mtrl.rewards.guards import GuardConfig, Guards, find_loop, language_code, length_ratio
from mtrl.testing import build_tiny_seq2seq

SRC = "A young man in a red shirt rides his bike down the street."
DE = "Ein junger Mann in einem roten Hemd fährt mit seinem Fahrrad die Straße entlang."
RU = "Молодой человек в красной рубашке едет на велосипеде по улице."


def trips(hyp: str, src: str = SRC, lang: str = "de", **cfg) -> list[str]:
    return sorted(t.guard for t in Guards(GuardConfig(**cfg), lang).check(src, hyp))


def test_a_real_translation_trips_nothing():
    assert trips(DE) == []
    assert trips("A young man in a red shirt rides his bike.", src=DE, lang="en") == []
    assert trips("一个穿红衬衫的年轻人骑着自行车沿街而行。", lang="zh") == []  # CJK length counts 3 per character
    assert trips(SRC, src="一个穿红衬衫的年轻人骑着自行车沿街而行。", lang="en") == []


@pytest.mark.parametrize("hyp,expected", [
    (SRC, ["copy", "language"]),
    (RU, ["language"]),
    ("", ["empty"]),
    ("   ", ["empty"]),
    ("Ein Mann.", ["length"]),
    (DE + " " + DE + " Und dann noch viel mehr, das niemand gesagt hat, immer weiter und weiter.", ["length"]),
    ("Ein junger Mann fährt Fahrrad Fahrrad Fahrrad Fahrrad die Straße entlang.", ["loop"]),
])
def test_gamed_outputs_trip_their_guard(hyp, expected):
    assert trips(hyp) == expected


def test_what_a_guard_covers():
    g = Guards(GuardConfig(), "de")
    (short,) = g.check(SRC, "Ein Mann.")
    assert short.start == short.end  # nothing to cover: the final token takes the penalty
    long_hyp = DE + " " + DE + " " + DE
    (long,) = g.check(SRC, long_hyp)
    assert 0 < long.start < len(long_hyp) and long.end == len(long_hyp)
    assert length_ratio(SRC, long_hyp[:long.start]) <= 3.0 < length_ratio(SRC, long_hyp[:long.start + 2])
    text = "Ein Mann Mann Mann fährt."
    assert find_loop(text, 3, 6) == (9, 18)  # the repeats after the first: "Mann Mann"
    assert find_loop("Ein Mann fährt, fährt.", 3, 6) is None
    assert find_loop("... ... ... Ein Mann.", 3, 6) is None  # punctuation alone is no loop


def test_checks_and_bounds_come_from_the_config():
    assert trips(SRC, checks=["length", "loop"]) == []
    assert trips("Ein Mann.", min_length_ratio=0.1) == []
    assert trips(SRC, lang=None) == ["copy"]  # no language: no language check
    assert trips("Anna", src="Anna") == []  # too few letters for copy and language
    assert trips("Verschoben", src="Postponed", lang="en") == ["language"]
    assert trips("Postponed", src="Verschoben", lang="de") == []  # too short for language ID to tell
    loop = "Jerry: bla bla bla, deine Schuld."
    assert trips(loop, src="Jerry: blah blah blah, your fault.") == []  # the source repeats too
    assert trips(loop, src="Jerry: your fault.") == ["loop"]


def test_language_names_and_codes():
    assert [language_code(x) for x in ("German", "de", "DE", "pt-BR", "Chinese (Simplified)", "zh_CN", "Farsi")] \
        == ["de", "de", "de", "pt", "zh", "zh", "fa"]
    with pytest.raises(MtrlError, match="'Klingon' is not a language the language guard knows"):
        language_code("Klingon")


class Constant(Detector):
    """A reference-free reward that rates everything 0.9: what a gameable QE model does to a copy."""

    name = "constant"

    def detect(self, sources, hypotheses, references=None):
        return [Detection([], 0.9) for _ in hypotheses]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_seq2seq(tmp_path_factory.mktemp("m")))


def rewarder(tokenizer, mode="token", use_reference=False, **guards) -> Rewarder:
    return Rewarder(RewardConfig(mode=mode, guards=GuardConfig(**guards)), Constant(), tokenizer,
                    use_reference=use_reference, language="German")


def test_on_by_default_only_without_references(tokenizer):
    assert rewarder(tokenizer).guards_on
    assert not rewarder(tokenizer, use_reference=True).guards_on
    assert rewarder(tokenizer, use_reference=True, enabled=True).guards_on
    assert not rewarder(tokenizer, enabled=False).guards_on


def test_token_mode_puts_critical_penalties_on_what_trips(tokenizer):
    out = rewarder(tokenizer)([SRC, SRC, SRC], [DE, SRC, ""], None, span_rewards=True)
    assert out.guards == [[], ["copy", "language"], ["empty"]]
    clean, copy, empty = out.token_rewards
    assert set(clean) == {0.0}
    pieces = tokenizer.convert_ids_to_tokens(out.token_ids[1])[:-1]  # EOS excluded
    # every token with a character of the copy is under a critical span (a lone "▁" holds only whitespace)
    assert [r for r, p in zip(copy, pieces) if p.strip("▁")] == [-10.0] * sum(bool(p.strip("▁")) for p in pieces)
    assert empty == [-10.0]  # the empty output's only token, EOS
    assert out.scores == [0.9, 0.0, 0.0]  # the detector's worst score (the floor)
    assert out.span_rewards == out.token_rewards  # in token mode the span rewards are the rewards
    assert rewarder(tokenizer)([SRC], [DE], None).span_rewards is None  # computed only when asked for


def test_guards_off_count_trips_for_training_but_change_nothing(tokenizer):
    cfg = RewardConfig(guards=GuardConfig(enabled=False))
    off = Rewarder(cfg, Constant(), tokenizer, use_reference=False, language="de", log_guards=True)([SRC, SRC],
                                                                                                  [DE, SRC], None)
    assert off.guards == [[], ["copy", "language"]]
    assert off.scores == [0.9, 0.9] and set(off.token_rewards[1]) == {0.0}
    # mtrl score with the guards off does not check them at all
    quiet = Rewarder(cfg, Constant(), tokenizer, use_reference=False, language="de")([SRC], [SRC], None)
    assert quiet.guards == [[]]


@pytest.mark.parametrize("mode", ["sentence", "hybrid"])
def test_sentence_modes_floor_the_score(tokenizer, mode):
    out = rewarder(tokenizer, mode=mode)([SRC, SRC], [DE, "Ein Mann."], None, span_rewards=True)
    assert out.scores == [0.9, 0.0]
    assert out.token_rewards[0][-1] == pytest.approx(0.9)
    if mode == "sentence":
        assert out.token_rewards[1][-1] == 0.0
    else:  # hybrid: span-based, so a guard that covers nothing puts the critical penalty on the final token
        assert out.token_rewards[1][-1] == pytest.approx(-10.0)
    assert out.span_rewards[1][-1] == -10.0 and out.span_rewards[0][-1] == 0.0


def test_r3hf_mode_floors_the_sum_of_the_rewards(tokenizer):
    cfg = RewardConfig(mode="r3hf", scorer="chrf", guards=GuardConfig(enabled=True))
    r = Rewarder(cfg, None, tokenizer, language="de")
    out = r([SRC, SRC], [DE, SRC], [DE, DE])
    assert out.guards[1] == ["copy", "language"]
    assert out.scores[0] == pytest.approx(100.0) and out.scores[1] == 0.0
    assert sum(out.token_rewards[1]) == pytest.approx(0.0, abs=1e-4)
    assert sum(out.token_rewards[0]) == pytest.approx(100.0, abs=1e-3)


def test_the_guards_need_a_language_they_know(tokenizer):
    with pytest.raises(MtrlError, match="needs the target language"):
        Rewarder(RewardConfig(), Constant(), tokenizer, use_reference=False)
    with pytest.raises(MtrlError, match="'Klingon' is not a language"):
        Rewarder(RewardConfig(), Constant(), tokenizer, use_reference=False, language="Klingon")
    # off: the trips are still counted, without a language check
    off = Rewarder(RewardConfig(), Constant(), tokenizer, use_reference=True, language="Klingon")
    assert "language" not in off.guards.checks


def test_recipe_checks_the_guards_section():
    with pytest.raises(MtrlError, match=r"reward.guards.checks.*'lenght' is not allowed; allowed: 'language', "
                                        r"'length', 'copy', 'empty', 'loop'"):
        RewardConfig.from_dict({"guards": {"checks": ["lenght"]}})
    with pytest.raises(MtrlError, match="reward.guards.max_copy"):
        RewardConfig.from_dict({"guards": {"max_copy": 2}})


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_score_cli_lists_the_tripped_guards(tmp_path, capsys):
    rows = [{"src": SRC, "mt": h, "ref": DE} for h in (DE, SRC, "", RU)]
    out = tmp_path / "o.jsonl"
    assert main(["score", "--input", write(tmp_path / "i.jsonl", rows), "--guards", "default", "--tgt-lang", "de",
                 "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["guards"] for g in got] == [[], ["copy", "language"], ["empty"], ["language"]]
    assert "guards tripped: copy 1, empty 1, language 2" in capsys.readouterr().err
    # the reference detector has references: the guards are off unless asked for
    assert main(["score", "--input", str(tmp_path / "i.jsonl"), "--output", str(out)]) == 0
    assert all("guards" not in json.loads(line) for line in out.read_text(encoding="utf-8").splitlines())


def test_score_cli_language_errors_are_one_line(tmp_path, capsys):
    path = write(tmp_path / "i.jsonl", [{"src": SRC, "mt": DE, "ref": DE}])
    assert main(["score", "--input", path, "--guards", "default", "--tgt-lang", "Klingon"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Klingon" in err[0] and "Traceback" not in err[0]
    assert main(["score", "--input", path, "--guards", "default"]) == 2
    assert "--tgt-lang" in capsys.readouterr().err


def test_xcomet_without_references_guards_by_default(tiny_xcomet_ckpt, tmp_path, capsys):
    """The QE path as a user runs it, on a tiny xCOMET checkpoint: the guards are on, rows list what trips."""
    src, hyp = tmp_path / "src.txt", tmp_path / "hyp.txt"
    src.write_text(f"{SRC}\n{SRC}\n", encoding="utf-8")
    hyp.write_text(f"{DE}\n{SRC}\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    args = ["score", "--src", str(src), "--hyp", str(hyp), "--detector", "xcomet", "--model", str(tiny_xcomet_ckpt),
            "--output", str(out)]
    assert main(args) == 2
    assert "--tgt-lang" in capsys.readouterr().err
    assert main([*args, "--tgt-lang", "German"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["guards"] for r in rows] == [[], ["copy", "language"]]
    assert rows[1]["score"] == 0.0 and any(s.get("category") == "guard/copy" for s in rows[1]["spans"])
    assert main([*args, "--guards", "none"]) == 0
    assert all("guards" not in json.loads(line) for line in out.read_text(encoding="utf-8").splitlines())


def test_score_with_a_recipe_uses_its_guards_and_target_language(tmp_path):
    """``mtrl score --recipe`` rewards what training rewards: the recipe's ``reward.guards`` and ``data.tgt_lang``."""
    import yaml

    from tests.test_score_matches_training import REPO

    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
    recipe["reward"]["guards"] = {"enabled": True, "checks": ["copy", "language"]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "o.jsonl"
    rows = [{"src": SRC, "mt": h, "ref": DE} for h in (DE, SRC)]
    assert main(["score", "--recipe", str(path), "--input", write(tmp_path / "i.jsonl", rows),
                 "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["guards"] for g in got] == [[], ["copy", "language"]]
    # the copy's first token is under the critical span (-10 x the recipe's scale 0.05), the clean row's is not
    assert got[1]["token_rewards"][0] <= -0.5 < got[0]["token_rewards"][0]


def test_hybrid_with_another_scorer_floors_that_score(tokenizer):
    cfg = RewardConfig(mode="hybrid", scorer="chrf", guards=GuardConfig(enabled=True))
    out = Rewarder(cfg, Constant(), tokenizer, use_reference=False, language="de")([SRC, SRC], [DE, SRC], [DE, DE])
    assert out.token_rewards[0][-1] == pytest.approx(100.0)  # chrF of the reference itself, on the final token
    from sacrebleu import sentence_chrf

    assert sentence_chrf(SRC, [DE]).score > 5  # the copy's own chrF ...
    assert out.token_rewards[1][-1] == 0.0  # ... floored at 0 (its critical span is on the words, not on EOS)


def test_bounds_that_cannot_hold_are_an_error_and_an_unknown_language_a_warning(tokenizer, capsys):
    with pytest.raises(MtrlError, match=r"min_length_ratio \(2\) must be below max_length_ratio \(1\)"):
        rewarder(tokenizer, min_length_ratio=2.0, max_length_ratio=1.0)
    Rewarder(RewardConfig(), Constant(), tokenizer, use_reference=True, language="Klingon")
    assert "warning" in capsys.readouterr().err  # off: the run goes on, without the language trip rate
