"""``eval/gpu_check.py --tiny``: the GPU check's own code, run on the CPU with tiny models, so that it cannot rot
between the rare runs on a GPU. Checks what it prints, not how fast it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("marian", "nllb", "qwen")
PARTS = ("generate_s", "reward_s", "forward_s", "update_s")


@pytest.fixture(scope="module")
def printed() -> dict[str, str]:
    """The script's ``name: value`` lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "gpu_check.py"), "--tiny", "--steps", "2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.partition(": ") for line in proc.stdout.splitlines()]
    assert all(sep for _, sep, _ in lines), proc.stdout
    return {key: value for key, _, value in lines}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_model_reports_its_time_split(printed: dict[str, str], model: str):
    value = lambda key: float(printed[f"{model}.{key}"])  # noqa: E731
    step = value("step_s")
    assert step > 0 and value("warmup_s") > 0 and value("build_s") > 0
    assert all(value(p) > 0 for p in PARTS), {p: printed[f"{model}.{p}"] for p in PARTS}
    assert sum(value(p) for p in PARTS) <= step * (1 + 1e-4)  # the parts are measured inside the step
    assert 0 < value("detector_s") <= value("reward_s") * (1 + 1e-4)
    assert abs(value("other_s") - (step - sum(value(p) for p in PARTS))) < 1e-4 * step + 1e-6
    assert value("tokens_per_s") > 0 and value("generate_tokens_per_s") > 0
    assert value("update_tflops") > 0 and value("params_m") > 0
    assert value("peak_memory_gb") > 0
    assert {f"{model}.step1_s", f"{model}.step2_s"} <= printed.keys()


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_mfu_is_a_fraction_or_na(printed: dict[str, str], model: str):
    mfu = printed[f"{model}.mfu"]
    if printed["device"] == "cpu":
        assert mfu == "n/a"  # no peak is known for a CPU
    else:
        assert 0 < float(mfu) <= 1


@pytest.mark.slow
def test_header_and_detector(printed: dict[str, str]):
    assert printed["dtype"] == "float32" and printed["device"] == "cpu"
    assert int(printed["batch_size"]) == 4 and int(printed["max_new_tokens"]) == 8 and int(printed["steps"]) == 2
    assert float(printed["detector.params_m"]) > 0 and float(printed["detector.build_s"]) > 0
    assert float(printed["total_s"]) > 0
