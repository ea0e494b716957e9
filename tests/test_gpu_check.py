"""``eval/gpu_check.py --tiny``: the GPU check's own code, run on the CPU with tiny models, so that it cannot rot
between the rare runs on a GPU. Checks what it prints, not how fast it is; and the decode limit's arithmetic
(weights and KV-cache bytes per decoding step, the bandwidth table) on models small enough to count by hand."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "gpu_check.py"
MODELS = ("marian", "nllb", "qwen")
PARTS = ("generate_s", "reward_s", "forward_s", "update_s")
SWEEP = (4, 8)  # --tiny's sampling sweep
BANDWIDTH = 50.0  # GB/s, given: a CPU has none of its own, and the fractions need one


@pytest.fixture(scope="module")
def printed() -> dict[str, str]:
    """The script's ``name: value`` lines."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--sweep-repeats", "1",
                           "--bandwidth-gbs", str(BANDWIDTH)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
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
    assert printed["sweep_batch_sizes"] == ",".join(map(str, SWEEP)) and int(printed["sweep_repeats"]) == 1
    assert float(printed["bandwidth_gbs"]) == BANDWIDTH
    assert printed["vllm"] == "yes" or printed["vllm"].startswith("n/a (")
    assert float(printed["detector.params_m"]) > 0 and float(printed["detector.build_s"]) > 0
    assert float(printed["total_s"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", SWEEP)
def test_sampling_sweep_against_the_decode_limit(printed: dict[str, str], model: str, batch: int):
    """mtrl's rollout and HF generate on the same model and batch: tokens/s, and the fraction of the limit that
    the given bandwidth sets, consistent with each other; vLLM (causal only) when it is usable here."""
    key = f"{model}.b{batch}"
    value = lambda name: float(printed[f"{key}.{name}"])  # noqa: E731
    assert float(printed[f"{model}.decode_weights_gb"]) > 0
    assert int(printed[f"{key}.src_len"]) > 0 and value("kv_cache_gb") > 0
    limit = value("limit_tokens_per_s")
    weights = float(printed[f"{model}.decode_weights_gb"])
    assert limit == pytest.approx(batch * BANDWIDTH / (weights + value("kv_cache_gb")), rel=1e-4)
    samplers = ["rollout", "hf_generate"]
    if model == "qwen":
        if printed["vllm"] == "yes":
            samplers.append("vllm")
        else:
            assert printed[f"{key}.vllm_tokens_per_s"].startswith("n/a (")
            assert printed[f"{key}.vllm_limit_fraction"].startswith("n/a (")
    else:
        assert f"{key}.vllm_tokens_per_s" not in printed  # vLLM has no encoder-decoder models
    for s in samplers:
        assert value(f"{s}_tokens_per_s") > 0
        assert value(f"{s}_limit_fraction") == pytest.approx(value(f"{s}_tokens_per_s") / limit, rel=1e-4)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("name, gbs", [("NVIDIA H200", 4800), ("NVIDIA H200 NVL", 4800), ("NVIDIA H100 80GB HBM3", 3350),
                                       ("NVIDIA H100 PCIe", 2000), ("NVIDIA H100 NVL", 3900),
                                       ("NVIDIA A100-SXM4-80GB", 2000), ("NVIDIA A100 80GB PCIe", 2000),
                                       ("NVIDIA A100-SXM4-40GB", 1550), ("NVIDIA A100-PCIE-40GB", 1550),
                                       ("Tesla V100-SXM2-32GB", None)])
def test_bandwidth_by_gpu_name(gpu_check, monkeypatch, name: str, gbs: float | None):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_check.memory_bandwidth_gbs(torch.device("cuda:0"), None) == gbs
    assert gpu_check.memory_bandwidth_gbs(torch.device("cuda:0"), 1234.0) == 1234.0  # --bandwidth-gbs wins


def test_bandwidth_is_unknown_on_a_cpu(gpu_check):
    assert gpu_check.memory_bandwidth_gbs(torch.device("cpu"), None) is None
    assert gpu_check.decode_limit_tokens_per_s(1e6, None, 8) is None
    assert gpu_check.decode_limit_tokens_per_s(2e9, 4000.0, 32) == pytest.approx(32 / 0.5e-3)  # 0.5 ms a step


def test_decode_bytes_of_a_causal_model(gpu_check):
    """Tiny Qwen2 (--tiny's shape): every Linear of the stack and the tied head once; KV of 1 head of 64."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    V, H, F, L = 300, 128, 256, 2
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    per_layer = (H * H + H) + 2 * (64 * H + 64) + H * H + 3 * H * F  # q (bias), k and v (bias), o, gate/up/down
    assert gpu_check.decode_weight_bytes(model) == 4 * (L * per_layer + V * H)
    shape = gpu_check.kv_cache_shape(model, "causal")
    assert shape == (L, 1, 64, 4)
    S, T, B = 10, 9, 3  # 10 prompt tokens, then on average (9 - 1) / 2 = 4 response tokens before each step
    assert gpu_check.kv_bytes_per_step(shape, S, T, B) == 2 * L * 1 * 64 * 4 * 14 * B


def test_decode_bytes_of_a_seq2seq_model(gpu_check):
    """Tiny Marian: the decoder's Linears and the LM head; not the encoder, nor cross-attention's k/v."""
    from transformers import MarianConfig, MarianMTModel

    V, D, F = 200, 32, 64
    model = MarianMTModel(MarianConfig(vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=F,
                                       decoder_ffn_dim=F, pad_token_id=0, decoder_start_token_id=0))
    attn = D * D + D  # one projection, with bias
    decoder = 4 * attn + 2 * attn + (D * F + F) + (F * D + D)  # self q/k/v/o, cross q/o, fc1, fc2
    assert gpu_check.decode_weight_bytes(model) == 4 * (decoder + V * D)
    assert gpu_check.kv_cache_shape(model, "seq2seq") == (1, 2, 16, 4)
