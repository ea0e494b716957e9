"""The xcomet detector through the real comet code path, on a tiny trained xCOMET checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtrl.detectors import load_detector
from mtrl.detectors.xcomet import XCometDetector, spans_from_comet, truncation
from mtrl.errors import MtrlError
from mtrl.spans import ErrorSpan
from tests.fixtures.xcomet import ERROR_SEVERITY, ERROR_WORD

SRCS = ["Two dogs are playing in the snow.", "A man is reading a newspaper.",
        "A woman is sitting on a bench."]
HYPS = [f"Zwei {ERROR_WORD} Hunde spielen im Schnee.", "Ein Mann liest eine Zeitung.",
        f"Eine Frau {ERROR_WORD} sitzt auf einer Bank."]
REFS = ["Zwei Hunde spielen im Schnee.", "Ein Mann liest eine Zeitung.", "Eine Frau sitzt auf einer Bank."]


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_xcomet_ckpt: Path) -> Path:
    """The tiny xCOMET of conftest.py (tests/fixtures/xcomet.py, built once per session, ~3 s)."""
    return tiny_xcomet_ckpt


@pytest.fixture(scope="session")
def detector(tiny_ckpt: Path) -> XCometDetector:
    det = XCometDetector(str(tiny_ckpt), gpus=0)
    det.load()
    return det


# --- comet metadata -> ErrorSpan (no model) ------------------------------------------------

def test_spans_from_comet_repairs_quirks() -> None:
    hyp = "Zwei KAPUTT Hunde spielen."  # len 26; "KAPUTT" = [5, 11), "spielen." = [18, 26)
    raw = [
        {"text": "KAPUTT", "start": 4, "end": 11, "severity": "major", "confidence": 0.9},  # leading space
        {"text": "<s>", "start": 0, "end": 0, "severity": "minor", "confidence": 0.5},  # <s> alone
        {"text": "<s> Zwei", "start": 0, "end": 4, "severity": "Critical", "confidence": 0.7},  # <s> + word
        {"text": "spielen.</s>", "start": 17, "end": 0, "severity": "minor", "confidence": 0.6},  # ran into </s>
    ]
    assert spans_from_comet(hyp, raw) == [
        ErrorSpan(0, 4, "critical", confidence=0.7),
        ErrorSpan(5, 11, "major", confidence=0.9),
        ErrorSpan(18, 26, "minor", confidence=0.6),
    ]
    # A span into </s> of a truncated hypothesis ends where scoring stopped.
    assert spans_from_comet(hyp, raw[3:], scored_chars=21) == [ErrorSpan(18, 21, "minor", confidence=0.6)]


def test_spans_from_comet_clips_and_drops() -> None:
    hyp = "Ein Hund."
    raw = [
        {"start": 3, "end": 40, "severity": "major"},  # end past the string
        {"start": 6, "end": 4, "severity": "minor"},  # end < start, not from </s>
        {"start": 3, "end": 4, "severity": "minor"},  # whitespace only
        {"start": 50, "end": 60, "severity": "minor"},  # entirely outside
    ]
    assert spans_from_comet(hyp, raw) == [ErrorSpan(4, 9, "major")]
    assert spans_from_comet(hyp, []) == []


def test_truncation_mirrors_comet_limits(detector: XCometDetector) -> None:
    tok = detector.load().encoder.tokenizer
    short, long_ = "Ein Hund.", " ".join(["Ein Mann liest eine Zeitung."] * 8)
    n_long = len(tok(long_)["input_ids"])
    max_pos = n_long  # the long text alone is over max_pos - 2 subwords
    res = truncation(tok, max_pos, [short, long_, short], [[short, short, long_]])
    assert res[0] == (False, None)
    cut, scored = res[1]
    limit = max_pos - 2  # subwords kept, <s> and </s> included
    kept = tok(long_[:scored])["input_ids"]
    assert cut and 0 < scored < len(long_.rstrip())
    assert len(kept) == limit  # the kept text re-tokenizes to exactly the limit
    assert res[2] == (True, None)  # only the source was cut: hypothesis fully scored
    # Segments that each fit: <s> a </s></s> b </s> is cut only when longer than max_positions.
    assert truncation(tok, n_long + 2, [long_], [[long_]])[0] == (True, None)
    assert truncation(tok, 2 * n_long, [long_], [[long_]])[0] == (False, None)


# --- real comet path ------------------------------------------------------------------------

def _check(dets, hyps, mode: str) -> None:
    assert len(dets) == len(hyps)
    for det, hyp in zip(dets, hyps, strict=True):
        assert isinstance(det.score, float) and 0.0 <= det.score <= 1.0
        assert det.extra["mode"] == mode and not det.truncated
        for s in det.spans:
            assert 0 <= s.start < s.end <= len(hyp)
            assert isinstance(s.confidence, float)
        words = [(hyp[s.start:s.end], s.severity) for s in det.spans]
        assert words == ([(ERROR_WORD, ERROR_SEVERITY)] if ERROR_WORD in hyp else [])


def test_detect_with_references(detector: XCometDetector) -> None:
    dets = detector.detect(SRCS, HYPS, REFS)
    _check(dets, HYPS, "ref")
    assert dets[1].score > max(dets[0].score, dets[2].score)  # the tiny model learned the error
    assert {"src_score", "ref_score", "unified_score", "mqm_score"} <= set(dets[0].extra)
    assert detector.last_truncated == 0


def test_detect_reference_free(detector: XCometDetector) -> None:
    dets = detector.detect(SRCS, HYPS)
    _check(dets, HYPS, "qe")
    assert "ref_score" not in dets[0].extra
    no_ref = XCometDetector(str(detector.model_name), gpus=0, use_reference=False)
    no_ref._model = detector.load()  # share the loaded model
    _check(no_ref.detect(SRCS, HYPS, REFS), HYPS, "qe")


def test_mixed_references_split_by_mode(detector: XCometDetector) -> None:
    refs = [REFS[0], None, ""]  # "" counts as missing
    mixed = detector.detect(SRCS, HYPS, refs)
    assert [d.extra["mode"] for d in mixed] == ["ref", "qe", "qe"]
    with_ref, without = detector.detect(SRCS, HYPS, REFS), detector.detect(SRCS, HYPS)
    assert mixed[0].score == pytest.approx(with_ref[0].score, abs=1e-5)
    assert mixed[1].score == pytest.approx(without[1].score, abs=1e-5)
    assert [(s.start, s.end, s.severity) for s in mixed[2].spans] == \
        [(s.start, s.end, s.severity) for s in without[2].spans] != []


def test_truncated_input_is_reported(detector: XCometDetector) -> None:
    long_hyp = " ".join(["Ein Mann liest eine Zeitung."] * 120)  # ~800 subwords > 510
    srcs, hyps, refs = [SRCS[1], SRCS[1], " ".join([SRCS[1]] * 120)], [long_hyp, HYPS[1], HYPS[1]], REFS[1:2] * 3
    dets = detector.detect(srcs, hyps, refs)
    assert [d.truncated for d in dets] == [True, False, True]
    assert detector.last_truncated == 2
    scored = dets[0].extra["scored_chars"]
    assert 0 < scored < len(long_hyp)
    assert all(s.end <= scored for s in dets[0].spans)
    assert "scored_chars" not in dets[2].extra  # only the source was cut


def test_empty_and_mismatched_input(detector: XCometDetector) -> None:
    assert detector.detect([], []) == []
    with pytest.raises(MtrlError):
        detector.detect(SRCS, HYPS[:2])


_SILENT_SCRIPT = """
import sys
from mtrl.detectors.xcomet import XCometDetector
det = XCometDetector(sys.argv[1], gpus=0)
for refs in (["Ein Hund rennt."], None, ["Ein Hund rennt."]):
    det.detect(["A dog runs."], ["Ein Hund KAPUTT rennt."], refs)
"""


def test_detect_prints_nothing(tiny_ckpt: Path) -> None:
    """Load and three calls in a fresh process: no Lightning banners, tips, warnings or bars.

    A subprocess because Lightning's log handler holds the stderr that pytest swapped in
    at import time, which capfd cannot see.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-c", _SILENT_SCRIPT, str(tiny_ckpt)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and proc.stderr == ""


def test_hub_id_offline_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    det = load_detector("xcomet", model="Unbabel/XCOMET-XL")
    with pytest.raises(MtrlError) as e:
        det.detect(["A dog."], ["Ein Hund."])
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg and "--model /path/to/XCOMET-XL/checkpoints/model.ckpt" in msg


def test_missing_local_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(MtrlError, match="checkpoint not found"):
        XCometDetector(str(tmp_path / "nope" / "model.ckpt")).load()


def test_moved_checkpoint_loads(tiny_ckpt: Path, detector: XCometDetector, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [d.score for d in detector.detect(SRCS, HYPS, REFS)]
    monkeypatch.chdir(tmp_path)  # the relative encoder path must not resolve against the cwd

    # 1. The builder's relative encoder path, model folder given as a directory.
    copy = shutil.copytree(tiny_ckpt.parents[1], tmp_path / "copied")
    got = [d.score for d in XCometDetector(str(copy), gpus=0).detect(SRCS, HYPS, REFS)]
    assert got == pytest.approx(expected, abs=1e-5)

    # 2. comet's own layout: an absolute encoder path that no longer exists after a move.
    moved = shutil.copytree(tiny_ckpt.parents[1], tmp_path / "moved")
    gone = str(tmp_path / "old-home" / "encoder")
    ckpt_file = moved / "checkpoints" / "model.ckpt"
    state = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    state["hyper_parameters"]["pretrained_model"] = gone
    torch.save(state, ckpt_file)
    hp = yaml.safe_load((moved / "hparams.yaml").read_text())
    (moved / "hparams.yaml").write_text(yaml.safe_dump({**hp, "pretrained_model": gone}))
    got = [d.score for d in XCometDetector(str(ckpt_file), gpus=0).detect(SRCS, HYPS, REFS)]
    assert got == pytest.approx(expected, abs=1e-5)


def test_hub_id_found_in_local_cache(tiny_ckpt: Path, detector: XCometDetector, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id already in the HF cache loads offline; the cache's checkpoint is a symlink into blobs/."""
    import huggingface_hub.constants

    expected = [d.score for d in detector.detect(SRCS, HYPS)]
    repo = tmp_path / "hub" / "models--Unbabel--tiny-xcomet"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_ckpt.parents[1] / "encoder", snap / "encoder")
    shutil.copy(tiny_ckpt.parents[1] / "hparams.yaml", snap / "hparams.yaml")
    (repo / "blobs").mkdir()
    shutil.copy(tiny_ckpt, repo / "blobs" / "f00d")
    (snap / "checkpoints").mkdir()
    (snap / "checkpoints" / "model.ckpt").symlink_to(Path("../../../blobs/f00d"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    got = [d.score for d in XCometDetector("Unbabel/tiny-xcomet", gpus=0).detect(SRCS, HYPS)]
    assert got == pytest.approx(expected, abs=1e-5)
