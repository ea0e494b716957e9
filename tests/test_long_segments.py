"""Text longer than the policy's positions: offline data is refused before any work, naming the row; sources
are cut to the policy's limit and counted (issue #22, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtrl.errors import MtrlError
from mtrl.recipe import recipe_from_dict
from mtrl.runner import run as train
from tests.fixtures.runs import read_metrics, tiny_recipe

LONG = "Ein Hund läuft schnell über die große grüne Wiese. " * 40  # far more than 128 subwords


def test_a_long_offline_row_is_refused_before_the_evaluation(tiny_seq2seq, small_data, tmp_path, monkeypatch):
    import mtrl.runner

    data = tmp_path / "mqm.jsonl"
    rows = [{"src": "A dog.", "mt": "Ein Hund.", "error_spans": []},
            {"src": "A dog runs.", "mt": LONG, "error_spans": [{"start": 4, "end": 8, "severity": "major"}]}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    calls = []
    monkeypatch.setattr(mtrl.runner, "translate", lambda *a, **k: calls.append(1) or [])
    recipe = tiny_recipe(tiny_seq2seq, small_data, tmp_path / "run", offline={"data": str(data)},
                         algorithm={"name": "twa", "max_steps": 1, "batch_size": 2})
    with pytest.raises(MtrlError, match=r"row 2's translation is \d+ tokens, more than the policy's 128 positions "
                                        r"\(1 of 2 rows are\)"):
        train(recipe_from_dict(recipe), quiet=True)
    assert calls == [] and not (tmp_path / "run").exists()  # before any work, and nothing left behind


def test_long_sources_are_cut_and_counted(tiny_seq2seq, small_data, tmp_path, capsys):
    train_file, eval_file = small_data
    long_train = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]
    rows[0]["src"] = LONG
    long_train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_seq2seq, (long_train, eval_file), run, policy={"max_source_tokens": 6},
                         algorithm={"batch_size": len(rows)}, train={"steps": 1, "report_to": []})
    train(recipe_from_dict(recipe))
    err = capsys.readouterr().err
    assert read_metrics(run)[0]["sources_truncated"] >= 1  # the long source, and any other above 6 tokens
    assert "training sources are longer than 6 tokens" in err
    assert "eval sources are longer than 6 tokens (policy.max_source_tokens, or the model's positions) and were cut" in err


def test_the_source_limit_is_the_smaller_of_the_key_and_the_positions(tiny_seq2seq):
    from mtrl.policy import Policy, PolicyConfig, load_model_and_tokenizer

    model, tok, kind = load_model_and_tokenizer(str(tiny_seq2seq))
    policy = Policy(model, tok, kind, PolicyConfig(model="", max_source_tokens=1000))
    assert policy.max_positions == 128 and policy.source_limit == 128
    ids, mask = policy.encode_sources([LONG, "A dog."])
    assert ids.shape[1] == 128 and policy.truncated_sources == 1
    assert policy.source_lengths([LONG])[0] > 128
