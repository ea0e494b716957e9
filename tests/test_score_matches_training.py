"""``mtrl score --recipe`` writes the token rewards training computes: the quickstart's reward
(reference detector spans + 3 x chrF spread over the tokens by R3HF, x 0.05) on the same
(source, hypothesis, reference) rows, through the CLI on one side and through the rollout path
(response tensor + mask -> ``response_ids`` -> the runner's Rewarder -> ``reward_tensor``) on the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtrl.cli import main
from mtrl.datasets import load_parallel
from mtrl.policy import build_policy
from mtrl.recipe import load_recipe
from mtrl.rewards import Rewarder
from mtrl.rollout import response_ids, reward_tensor
from mtrl.testing import build_tiny_seq2seq

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/quickstart.yaml"


def _hypotheses(refs: list[str]) -> list[str]:
    """Real German sentences with errors of several kinds, and one row identical to its reference."""
    words = refs[1].split()
    return [
        refs[0],  # error-free
        " ".join(words[:4]) + ".",  # most of the content left out
        refs[2].replace("einem", "einem roten", 1).replace("Brett", "Tisch"),  # an addition and a mistranslation
        refs[4],  # another row's reference: all wrong
        refs[4].replace("Dach", "Auto"),  # one wrong word
        refs[5].replace("Männern", "Frauen").replace("dunklen", "hellen"),  # two wrong words
    ]


@pytest.fixture()
def setting(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe path is relative to the repo root, as in the README
    model = build_tiny_seq2seq(tmp_path / "m")
    pairs = load_parallel("multi30k", "test2016")[:6]
    sources, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    return model, sources, _hypotheses(refs), refs


def _training_rewards(model: Path, sources, hyps, refs):
    """What ``collect_rollout`` computes for responses that spell ``hyps``: the runner's Rewarder on
    the response ids, then the (B, T) reward tensor."""
    recipe = load_recipe(RECIPE, [f"policy.model={model}"])
    r = recipe.reward
    assert (r.mode, r.scorer, r.hybrid_sentence, r.hybrid_weight, r.scale) == ("hybrid", "chrf", "r3hf", 3.0, 0.05)
    assert recipe.detector.name == "reference" and recipe.detector.use_reference
    assert recipe.detector.options == {"omission_weight": 10}
    policy = build_policy(recipe.policy, str(model), recipe.data.src_lang, recipe.data.tgt_lang)
    tok = policy.tokenizer
    # a rollout's response: the generated tokens, then EOS, then padding (masked out) to the batch width
    ids = [tok(h, add_special_tokens=False)["input_ids"] + [policy.eos_token_id] for h in hyps]
    width = max(map(len, ids)) + 3
    responses = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    mask = policy.response_mask(responses)
    assert mask.sum(1).tolist() == [len(x) for x in ids]

    detector = recipe.detector.build()
    rewarder = Rewarder(recipe.reward, detector, policy.tokenizer, use_reference=recipe.detector.use_reference)
    scored = rewarder(sources, None, refs, response_ids(responses, mask))
    rewards = reward_tensor(scored.token_rewards, responses.shape, mask)
    assert scored.hypotheses == hyps  # the ids decode back to the hypotheses
    assert scored.token_ids == ids
    return ids, rewards, mask, scored


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_score_with_the_quickstart_recipe_equals_the_training_rewards(setting, tmp_path):
    model, sources, hyps, refs = setting
    ids, rewards, mask, scored = _training_rewards(model, sources, hyps, refs)

    out = tmp_path / "scored.jsonl"
    rc = main(["score", "--recipe", RECIPE, "--tokenizer", str(model),
               "--src", _write(tmp_path / "src.txt", sources), "--hyp", _write(tmp_path / "hyp.txt", hyps),
               "--ref", _write(tmp_path / "ref.txt", refs), "--output", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(hyps)

    for i, row in enumerate(rows):
        assert row["mt"] == hyps[i]
        assert row["token_ids"] == ids[i]
        assert len(row["tokens"]) == len(row["token_rewards"]) == int(mask[i].sum())
        torch.testing.assert_close(torch.tensor(row["token_rewards"], dtype=torch.float32),
                                   rewards[i, :len(ids[i])], atol=1e-6, rtol=0)
        assert float(rewards[i, len(ids[i]):].abs().sum()) == 0.0  # nothing on the padding
        assert row["score"] == pytest.approx(scored.scores[i], abs=1e-9)
        assert [(s["start"], s["end"], s["severity"]) for s in row["spans"]] == \
            [(s.start, s.end, s.severity) for s in scored.detections[i].spans]

    # the comparison is not between two empty things: rewards are there, and they see the errors
    assert float(rewards.abs().sum()) > 0
    clean, wrong = rows[0], rows[4]
    assert clean["spans"] == [] and wrong["spans"]
    assert min(wrong["token_rewards"]) < 0 <= min(clean["token_rewards"])
    assert sum(clean["token_rewards"]) > sum(wrong["token_rewards"])
    assert any(row["spans"] for row in rows[1:4])


@pytest.mark.parametrize("flags", [["--reward-mode", "token"], ["--reward-scale", "1", "--scorer", "bleu"],
                                   ["--detector", "xcomet"]])
def test_reward_or_detector_flags_with_a_recipe_are_one_error(setting, tmp_path, capsys, flags):
    model, sources, hyps, refs = setting
    out = tmp_path / "never.jsonl"
    rc = main(["score", "--recipe", RECIPE, "--tokenizer", str(model), "--hyp", _write(tmp_path / "h.txt", hyps),
               "--ref", _write(tmp_path / "r.txt", refs), "--output", str(out), *flags])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("mtrl: error: "), err
    assert flags[0] in err[0]
    assert not out.exists()
