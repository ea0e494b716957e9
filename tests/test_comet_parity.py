"""mtrl's COMET models against unbabel-comet 2.2.7's own outputs on the same checkpoints.

The golden files (``tests/data/comet-parity``) were written by ``tools/comet_parity.py`` in an
environment with comet 2.2.7; another copy (other rows, other random checkpoints) is checked with
``MTRL_COMET_GOLDEN=DIR pytest tests/test_comet_parity.py``. fp32: scores to 1e-5, spans exactly.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from mtrl.comet import load_comet, predict
from mtrl.comet.models import decode_spans, mqm_scores

GOLDEN = Path(os.environ.get("MTRL_COMET_GOLDEN", Path(__file__).parent / "data" / "comet-parity"))
MODELS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.json.gz").is_file()) if GOLDEN.is_dir() else []
CASES = [(m, mode) for m in MODELS
         for mode in json.load(gzip.open(GOLDEN / m / "golden.json.gz", "rt"))["modes"]]


@pytest.fixture(scope="module")
def models() -> dict:
    torch.set_num_threads(1)
    return {}


def _load(models: dict, name: str):
    if name not in models:
        models[name] = load_comet(str(GOLDEN / name))
    return models[name]


def _golden(name: str) -> dict:
    with gzip.open(GOLDEN / name / "golden.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


def _spans(spans: list[dict]) -> list[tuple[int, int, str]]:
    return [(int(s["start"]), int(s["end"]), s["severity"]) for s in spans]


def test_golden_files_cover_every_model_type() -> None:
    kinds = {_golden(m)["class_identifier"] for m in MODELS}
    assert kinds == {"xcomet_metric", "unified_metric", "regression_metric"}, GOLDEN
    assert {"xcomet-xl", "cometkiwi", "comet-da"} <= set(MODELS)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_batches_match_comet(models: dict, name: str, mode: str) -> None:
    """The forward pass and ``predict_step``: scores, metadata scores, tag probabilities and spans."""
    golden = _golden(name)["modes"][mode]
    model = _load(models, name)
    rows = golden["rows"]
    with torch.inference_mode():
        outs = [model.predict(rows[i:i + 8]) for i in range(0, len(rows), 8)]  # comet's batches of 8, in order
    scores = torch.cat([o.scores for o in outs]).tolist()
    assert scores == pytest.approx(golden["scores"], abs=1e-5)
    assert len({round(s, 5) for s in scores}) > len(rows) // 2  # rows differ by more than the tolerance
    for key, values in golden["metadata"].items():
        assert torch.cat([o.metadata[key] for o in outs]).tolist() == pytest.approx(values, abs=1e-5), key
    if "error_spans" not in golden:
        assert all(o.error_spans is None for o in outs)
        return
    probs = [p for o in outs for p in o.tag_probs]
    spans = [s for o in outs for s in o.error_spans]
    for got, want in zip(probs, golden["tag_probs"], strict=True):
        assert got.shape == (len(want), len(want[0]))
        assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    assert [_spans(s) for s in spans] == [_spans(s) for s in golden["error_spans"]]
    assert sum(map(len, spans)) > 20
    for got, want in zip(spans, golden["error_spans"], strict=True):
        assert [s["confidence"] for s in got] == pytest.approx([s["confidence"] for s in want], abs=1e-5)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_bucketed_predict_matches_comet(models: dict, name: str, mode: str) -> None:
    """:func:`mtrl.comet.predict` (length-sorted batches under a token budget) gives the same rows."""
    golden = _golden(name)["modes"][mode]
    got = predict(_load(models, name), golden["rows"], batch_size=5, max_tokens=300)
    assert [r.score for r in got] == pytest.approx(golden["scores"], abs=1e-5)
    if "error_spans" in golden:
        assert [_spans(r.error_spans) for r in got] == [_spans(s) for s in golden["error_spans"]]
    for key, values in golden["metadata"].items():
        assert [r.extra[key.removesuffix("s")] for r in got] == pytest.approx(values, abs=1e-5)


def test_truncated_rows_are_in_the_golden_files(models: dict) -> None:
    """The 64-position model cuts long rows: the parity above covers comet's cut as well."""
    model = _load(models, "xcomet-xl")
    rows = _golden("xcomet-xl")["modes"]["ref"]["rows"]
    assert model.encoder.max_positions == 64
    assert max(model.input_lengths(model.encode(rows))) == 64


def test_decode_spans_follows_comet_rules() -> None:
    """First subword's severity, mean top probability, a span open at the end is dropped."""
    labels = ["O", "minor", "major"]
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.7, 0.2], [0.2, 0.1, 0.7], [0.8, 0.1, 0.1],
                          [0.1, 0.1, 0.8]])
    offsets = [(0, 0), (0, 3), (3, 7), (8, 10), (11, 15)]
    spans = decode_spans(probs, offsets, labels)
    assert [(s["start"], s["end"], s["severity"]) for s in spans] == [(0, 7, "minor")]
    assert spans[0]["confidence"] == pytest.approx(0.7)
    assert mqm_scores([[{"severity": "major"}] * 6, [{"severity": "minor"}], []]).tolist() == \
        pytest.approx([0.0, 0.96, 1.0])
