"""The xcomet detector on a tiny trained xCOMET checkpoint (mtrl's own model, :mod:`mtrl.comet`).

Parity of the model itself with unbabel-comet 2.2.7 is in ``tests/test_comet_parity.py``; here:
the detector around it (modes, truncation, span repairs, batching, placement, loading).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtrl.comet import buckets, load_comet, predict
from mtrl.detectors import DetectorConfig, load_detector
from mtrl.detectors.spans import ErrorSpan
from mtrl.detectors.xcomet import XCometDetector, spans_from_comet, truncation
from mtrl.errors import MtrlError
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
    det = XCometDetector(str(tiny_ckpt), device="cpu")
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


# --- the tiny model end to end ---------------------------------------------------------------

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
    no_ref = XCometDetector.from_model(detector.load(), device="cpu", use_reference=False)  # shares the model
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
det = XCometDetector(sys.argv[1], device="cpu")
for refs in (["Ein Hund rennt."], None, ["Ein Hund rennt."]):
    det.detect(["A dog runs."], ["Ein Hund KAPUTT rennt."], refs)
long_hyp = " ".join(["Ein Hund rennt."] * 200)  # over the encoder's limit: no tokenizer warning either
assert det.detect(["A dog runs."], [long_hyp], ["Ein Hund rennt."])[0].truncated
"""


def test_detect_prints_nothing(tiny_ckpt: Path) -> None:
    """Load and three calls in a fresh process: no banners, warnings or bars (a subprocess: every
    import-time warning counts too)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-c", _SILENT_SCRIPT, str(tiny_ckpt)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and proc.stderr == ""


def test_hub_id_without_network_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    det = load_detector("xcomet", model="Unbabel/XCOMET-XL")
    with pytest.raises(MtrlError) as e:
        det.detect(["A dog."], ["Ein Hund."])
    msg = str(e.value)
    assert "\n" not in msg and "without network" in msg and "--model /path/to/XCOMET-XL/checkpoints/model.ckpt" in msg


def test_missing_local_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(MtrlError, match="checkpoint not found"):
        XCometDetector(str(tmp_path / "nope" / "model.ckpt")).load()


def test_moved_checkpoint_loads(tiny_ckpt: Path, detector: XCometDetector, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [d.score for d in detector.detect(SRCS, HYPS, REFS)]
    monkeypatch.chdir(tmp_path)  # the relative encoder path must not resolve against the cwd

    # 1. The builder's relative encoder path, model folder given as a directory.
    copy = shutil.copytree(tiny_ckpt.parents[1], tmp_path / "copied")
    got = [d.score for d in XCometDetector(str(copy), device="cpu").detect(SRCS, HYPS, REFS)]
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
    got = [d.score for d in XCometDetector(str(ckpt_file), device="cpu").detect(SRCS, HYPS, REFS)]
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

    got = [d.score for d in XCometDetector("Unbabel/tiny-xcomet", device="cpu").detect(SRCS, HYPS)]
    assert got == pytest.approx(expected, abs=1e-5)


# --- resident model: batching, placement, options ------------------------------------------------

def _rows(n: int) -> tuple[list[str], list[str], list[str]]:
    """``n`` rows of varied length, every third hypothesis with the error word."""
    from mtrl.testing import training_pairs

    pairs = training_pairs(n)
    hyps = [r.replace(" ", f" {ERROR_WORD} ", 1) if i % 3 == 0 else r for i, (_, r) in enumerate(pairs)]
    return [s for s, _ in pairs], hyps, [r for _, r in pairs]


@pytest.mark.parametrize("mode", ["ref", "qe", "mixed"])
def test_batching_does_not_change_results(tiny_ckpt: Path, mode: str) -> None:
    """fp32: small batches under a token budget give what one row at a time gives, spans repaired the same way."""
    srcs, hyps, refs = _rows(24)
    given = {"ref": refs, "qe": None, "mixed": [r if i % 2 else None for i, r in enumerate(refs)]}[mode]
    det = XCometDetector(str(tiny_ckpt), device="cpu", dtype="fp32", batch_size=3, max_tokens=120)
    got = det.detect(srcs, hyps, given)
    model = det.load()
    for i, d in enumerate(got):
        row = {"src": srcs[i], "mt": hyps[i]} | ({"ref": given[i]} if given and given[i] else {})
        alone = predict(model, [row])[0]
        assert d.score == pytest.approx(alone.score, abs=1e-5)
        expected = spans_from_comet(hyps[i], alone.error_spans)
        assert [(s.start, s.end, s.severity) for s in d.spans] == [(s.start, s.end, s.severity) for s in expected]
        assert [s.confidence for s in d.spans] == pytest.approx([s.confidence for s in expected], abs=1e-5)
    assert sum(len(d.spans) for d in got) >= 8  # the comparison covers real spans
    modes = [d.extra["mode"] for d in got]
    assert modes == ["ref" if given and given[i] else "qe" for i in range(len(hyps))]


def test_buckets_respect_rows_and_token_budget() -> None:
    lengths = [5, 40, 12, 40, 7, 30, 300, 8]
    batches = buckets(lengths, batch_size=3, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # longest first; alone over the budget, still scored
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    assert buckets([], 4, 100) == []


def test_model_stays_loaded_and_placed(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One load for many calls; moved back if something moved it."""
    import mtrl.detectors.xcomet as xc

    loads = []
    monkeypatch.setattr(xc, "load_comet", lambda ckpt, **kw: loads.append(ckpt) or load_comet(ckpt, **kw))
    det = XCometDetector(str(tiny_ckpt), device="cpu")  # dtype auto: fp32 on the CPU
    model = det.load()
    first = det.detect(SRCS, HYPS, REFS)
    det.detect(SRCS, HYPS)
    det.detect(SRCS, HYPS, [REFS[0], None, REFS[2]])
    assert len(loads) == 1 and det.load() is model
    assert not model.training and next(model.parameters()).dtype == torch.float32
    model.double().train()  # as if someone else used the object
    again = det.detect(SRCS, HYPS, REFS)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert [d.score for d in again] == pytest.approx([d.score for d in first], abs=1e-6)


def test_from_model_wraps_an_object_in_memory(tiny_ckpt: Path, detector: XCometDetector) -> None:
    model = load_comet(str(tiny_ckpt))
    det = XCometDetector.from_model(model, device="cpu", dtype="fp32", batch_size=2, max_tokens=64)
    assert det.load() is model and det.batch_size == 2 and det.max_tokens == 64
    got = det.detect(SRCS, HYPS, REFS)
    expected = detector.detect(SRCS, HYPS, REFS)
    assert [d.score for d in got] == pytest.approx([d.score for d in expected], abs=1e-5)
    assert [d.spans for d in got][0] != [] and \
        [[(s.start, s.end) for s in d.spans] for d in got] == [[(s.start, s.end) for s in d.spans] for d in expected]
    with pytest.raises(MtrlError, match="not a word-level COMET model"):
        XCometDetector.from_model(torch.nn.Linear(2, 2), device="cpu")


def test_bf16_runs_close_to_fp32(tiny_ckpt: Path, detector: XCometDetector) -> None:
    det = XCometDetector.from_model(load_comet(str(tiny_ckpt)), device="cpu", dtype="bf16")
    assert next(det.load().parameters()).dtype == torch.bfloat16
    got = det.detect(SRCS, HYPS, REFS)
    expected = detector.detect(SRCS, HYPS, REFS)
    assert all(isinstance(d.score, float) for d in got)
    assert [d.score for d in got] == pytest.approx([d.score for d in expected], abs=0.05)


@pytest.mark.parametrize(("options", "message"), [
    ({"device": "gpu"}, "detector.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ({"device": "cuda:x"}, "detector.device"),
    ({"dtype": "half"}, "detector.dtype: must be one of 'auto', 'fp32', 'fp16', 'bf16', got 'half'"),
    ({"batch_size": 0}, "detector.batch_size: must be an integer >= 1"),
    ({"max_tokens": 0}, "detector.max_tokens: must be an integer >= 1"),
])
def test_bad_options_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(MtrlError) as e:
        XCometDetector("unused", **options)  # checked before anything is loaded
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_cuda_device_fails_before_loading(tmp_path: Path) -> None:
    det = XCometDetector(str(tmp_path / "nope"), device="cuda:99")
    with pytest.raises(MtrlError, match=r"detector.device: 'cuda:99' asked for, but \d+ CUDA device"):
        det.load()  # not "checkpoint not found": the device is checked first


def test_detector_config_passes_xcomet_options() -> None:
    det = DetectorConfig(name="xcomet", model="some/model", batch_size=4, device="cpu", dtype="bf16",
                         max_tokens=512).build()
    assert isinstance(det, XCometDetector)
    assert (det.device, det.dtype, det.batch_size, det.max_tokens) == ("cpu", "bf16", 4, 512)
    default = DetectorConfig(name="xcomet").build()
    assert (default.device, default.dtype) == ("auto", "auto")
    with pytest.raises(MtrlError, match="detector.dtype"):
        DetectorConfig(name="xcomet", dtype="fp8").build()  # type: ignore[arg-type]
    for key, value in (("device", "cpu"), ("dtype", "fp16"), ("max_tokens", 100), ("model", "x")):
        with pytest.raises(MtrlError, match=f"detector.{key} is only used by the xcomet detector, not reference"):
            DetectorConfig(name="reference", **{key: value}).build()
