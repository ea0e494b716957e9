"""Shared fixtures: tiny local models, small data files, the shared/ data folder when present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED / "data"


@pytest.fixture(scope="session")
def tiny_seq2seq(tmp_path_factory) -> Path:
    from tests.fixtures.models import build_tiny_seq2seq

    return build_tiny_seq2seq(tmp_path_factory.mktemp("tiny-seq2seq"))


@pytest.fixture(scope="session")
def tiny_nllb(tmp_path_factory) -> Path:
    from tests.fixtures.models import build_tiny_seq2seq

    return build_tiny_seq2seq(tmp_path_factory.mktemp("tiny-nllb"), lang_codes=("eng_Latn", "deu_Latn"))


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory) -> Path:
    from tests.fixtures.models import build_tiny_causal

    return build_tiny_causal(tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="session")
def tiny_xcomet_ckpt(tmp_path_factory) -> Path:
    from tests.fixtures.xcomet import build_tiny_xcomet

    return build_tiny_xcomet(tmp_path_factory.mktemp("tiny-xcomet"))


PAIRS = [
    ("A man is riding a bike.", "Ein Mann fährt Fahrrad."),
    ("Two dogs play in the snow.", "Zwei Hunde spielen im Schnee."),
    ("A woman is reading a book.", "Eine Frau liest ein Buch."),
    ("Children are running on the beach.", "Kinder rennen am Strand."),
    ("A little girl climbs a tree.", "Ein kleines Mädchen klettert auf einen Baum."),
    ("The man wears a red hat.", "Der Mann trägt einen roten Hut."),
    ("Three people sit on a bench.", "Drei Leute sitzen auf einer Bank."),
    ("A cat sleeps on the sofa.", "Eine Katze schläft auf dem Sofa."),
]


@pytest.fixture()
def small_data(tmp_path: Path) -> tuple[Path, Path]:
    """A train and an eval JSONL file of (src, ref) pairs."""
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"src": s, "ref": r}) + "\n" for s, r in PAIRS * 2))
    ev.write_text("".join(json.dumps({"src": s, "ref": r}) + "\n" for s, r in PAIRS[:4]))
    return train, ev
