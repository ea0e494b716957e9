"""``eval/bench_rollout.py --quick``: the benchmark's own code, small, so that it cannot rot. Checks what it
prints (every line ``name: value``, the machine first, the ratios positive numbers; vLLM's ``n/a (reason)``
only where vLLM is not usable here), not how fast anything is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrl.vllm_engine import vllm_available

ROOT = Path(__file__).resolve().parents[1]
RATIOS = ("rollout_vs_generate_seq2seq", "rollout_vs_generate_causal")


@pytest.fixture(scope="module")
def run() -> tuple[list[tuple[str, str]], str]:
    """The script's ``(name, value)`` lines in order, and its stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "bench_rollout.py"), "--quick"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.partition(": ") for line in proc.stdout.splitlines()]
    assert lines and all(sep and value for _, sep, value in lines), proc.stdout
    return [(key, value) for key, _, value in lines], proc.stderr


@pytest.mark.slow
def test_machine_line_comes_first(run):
    lines, _ = run
    key, value = lines[0]
    assert key == "machine" and "nproc" in value and "torch" in value and "transformers" in value
    printed = dict(lines)
    assert int(printed["batch_size"]) == 4 and int(printed["max_new_tokens"]) == 8 and int(printed["repeats"]) == 1


@pytest.mark.slow
def test_rollout_ratios_are_positive_numbers(run):
    printed = dict(run[0])
    for name in RATIOS:
        assert float(printed[name]) > 0, name
    for model in ("seq2seq", "causal"):
        for k in ("rollout", "hf_generate"):
            assert float(printed[f"{model}.{k}_s"]) > 0 and float(printed[f"{model}.{k}_tokens_per_s"]) > 0
    # the ratio is of the two medians printed beside it (rounded to 4 significant digits)
    for model in ("seq2seq", "causal"):
        ratio = float(printed[f"{model}.rollout_s"]) / float(printed[f"{model}.hf_generate_s"])
        assert float(printed[f"rollout_vs_generate_{model}"]) == pytest.approx(ratio, rel=2e-3)


@pytest.mark.slow
def test_vllm_ratio_or_the_reason(run):
    printed = dict(run[0])
    reason = vllm_available()
    value = printed["vllm_vs_hf_generate"]
    if reason:
        assert value == f"n/a ({reason})"
    else:  # usable here: a number, from an engine that started and sampled
        assert float(value) > 0
        assert float(printed["causal.vllm_tokens_per_s"]) > 0 and float(printed["causal.vllm_build_s"]) > 0
        assert 0 < float(printed["causal.vllm_tokens_per_row"]) <= int(printed["max_new_tokens"])
