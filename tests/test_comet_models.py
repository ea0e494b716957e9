"""mtrl.comet around the models: weights-only loading, clear refusals, placement per process, the COMET scorer,
and ``mtrl score``/``mtrl label``'s ``--device``/``--dtype``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mtrl.comet import load_comet, resolve_device, resolve_dtype
from mtrl.errors import MtrlError
from mtrl.rewards.scorers import CometScorer

PARITY = Path(__file__).parent / "data" / "comet-parity"


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(PARITY / name, tmp_path / name))


def _golden(name: str, mode: str) -> dict:
    import gzip

    with gzip.open(PARITY / name / "golden.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)["modes"][mode]


def test_checkpoint_that_runs_code_is_refused(tmp_path: Path) -> None:
    model = _copy("comet-da", tmp_path)
    ckpt = model / "checkpoints" / "model.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["callback"] = Path("/")  # any object beyond tensors and plain values needs pickle to run code
    torch.save(state, ckpt)
    with pytest.raises(MtrlError) as e:
        load_comet(str(model))
    assert "holds more than weights" in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unknown_weights_are_named(tmp_path: Path) -> None:
    model = _copy("comet-da", tmp_path)
    ckpt = model / "checkpoints" / "model.ckpt"
    state = torch.load(ckpt, weights_only=True)
    del state["state_dict"]["estimator.ff.0.weight"]
    torch.save(state, ckpt)
    with pytest.raises(MtrlError, match="misses weights for this model type: estimator.ff.0.weight"):
        load_comet(str(model))
    state["state_dict"]["estimator.ff.0.weight"] = torch.zeros(1)
    torch.save(state, ckpt)
    with pytest.raises(MtrlError, match=r"size mismatch for estimator.ff.0.weight"):
        load_comet(str(model))
    state["state_dict"]["estimator.ff.0.weight"] = torch.zeros(64, 192)
    state["state_dict"]["extra.head.weight"] = torch.zeros(1)
    torch.save(state, ckpt)
    with pytest.raises(MtrlError, match="unknown weights for this model type: extra.head.weight"):
        load_comet(str(model))


def test_unsupported_model_type_is_one_line(tmp_path: Path) -> None:
    model = _copy("comet-da", tmp_path)
    (model / "hparams.yaml").write_text("class_identifier: ranking_metric\n")
    with pytest.raises(MtrlError, match="class_identifier 'ranking_metric' is not supported"):
        load_comet(str(model))


def test_sparsemax_patch_runs_as_softmax() -> None:
    """comet >= 2.2.4 reads ``layer_transformation: sparsemax_patch`` in hparams.yaml as softmax (the golden
    files of ``xcomet-softmax`` were written that way)."""
    model = load_comet(str(PARITY / "xcomet-softmax"))
    assert model.layerwise_attention.transform is torch.softmax
    assert load_comet(str(PARITY / "xcomet-xl")).layerwise_attention.transform is not torch.softmax


def test_each_process_gets_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` and ``cuda`` follow LOCAL_RANK (one detector per GPU); ``cuda:N`` is taken as given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16
    with pytest.raises(MtrlError, match="'cuda:2' asked for, but 2 CUDA device"):
        resolve_device("cuda:2")


def test_auto_is_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_comet_scorer_runs_the_resident_model() -> None:
    """COMET-DA through the scorer: the golden scores; it refuses rows without a reference."""
    golden = _golden("comet-da", "ref")
    rows = golden["rows"][:12]
    scorer = CometScorer(str(PARITY / "comet-da"), batch_size=4, device="cpu", dtype="fp32")
    assert scorer.needs_reference
    got = scorer.score([r["src"] for r in rows], [r["mt"] for r in rows], [r["ref"] for r in rows])
    assert got == pytest.approx(golden["scores"][:12], abs=1e-5)
    with pytest.raises(MtrlError, match="needs a reference for every row"):
        scorer.score(["a"], ["b"], [None])


def test_comet_scorer_mixes_modes_per_row() -> None:
    """COMET-Kiwi / xCOMET: rows with and without references are scored in their own mode."""
    ref, qe = _golden("xcomet-xl", "ref"), _golden("xcomet-xl", "qe")
    scorer = CometScorer(str(PARITY / "xcomet-xl"), device="cpu", dtype="fp32")
    rows = ref["rows"][:6]
    refs = [r["ref"] if i % 2 else None for i, r in enumerate(rows)]
    got = scorer.score([r["src"] for r in rows], [r["mt"] for r in rows], refs)
    expected = [ref["scores"][i] if i % 2 else qe["scores"][i] for i in range(6)]
    assert got == pytest.approx(expected, abs=1e-5)


def _mtrl(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``mtrl ARGS`` in this process (the CLI's own entry point): exit status and stderr."""
    from mtrl.cli import main

    status = main(list(args))
    return status, capsys.readouterr().err


def test_score_takes_device_and_dtype(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = _golden("xcomet-xl", "ref")["rows"][:4]
    src, hyp = tmp_path / "src.txt", tmp_path / "hyp.txt"
    src.write_text("".join(r["src"] + "\n" for r in rows))
    hyp.write_text("".join(r["mt"] + "\n" for r in rows))
    out = {}
    for dtype in ("fp32", "bf16"):
        status, err = _mtrl(capsys, "score", "--src", str(src), "--hyp", str(hyp), "--detector", "xcomet", "--model",
                            str(PARITY / "xcomet-xl"), "--device", "cpu", "--dtype", dtype, "--guards", "none",
                            "--output", str(tmp_path / dtype))
        assert status == 0, err
        out[dtype] = [json.loads(line)["score"] for line in (tmp_path / dtype).read_text().splitlines()]
    qe = _golden("xcomet-xl", "qe")["scores"][:4]
    assert out["fp32"] == pytest.approx(qe, abs=1e-5)
    assert out["bf16"] != out["fp32"] and out["bf16"] == pytest.approx(qe, abs=0.1)


@pytest.mark.parametrize(("args", "message"), [
    (["--detector", "xcomet", "--device", "gpu"], "--device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["--detector", "xcomet", "--dtype", "half"], "--dtype: must be one of"),
    (["--device", "cpu"], "--device: only the xcomet detector runs a model (the detector is reference)"),
])
def test_bad_placement_flags_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                          message: str) -> None:
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("Ein Hund.\n")
    for command in (["score", "--hyp", str(hyp), "--ref", str(hyp)],
                    ["label", "--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "out.jsonl")]):
        status, err = _mtrl(capsys, *command, *args)
        assert status == 2 and "Traceback" not in err, err
        assert message in err and len(err.strip().splitlines()) == 1, err
