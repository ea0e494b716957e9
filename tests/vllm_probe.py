"""vLLM as a causal policy's sampler, on vLLM's CPU build. Run by ``tests/test_vllm_engine.py`` in a process of
its own: vLLM sets torch's thread count for the whole process and patches its CPU layers
(:func:`mtrl.vllm_engine._keep_cpu_weights`), which the rest of the suite must not inherit.

Usage: python tests/vllm_probe.py OUT_DIR  -> OUT_DIR/result.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mtrl.policy import GenerationConfig, PolicyConfig, build_policy
from mtrl.testing import build_tiny_causal
from mtrl.vllm_engine import VLLMConfig, VLLMEngine

out = Path(sys.argv[1])
model_dir = build_tiny_causal(out / "model", hidden_size=128, heads=2, kv_heads=1)  # vLLM's CPU attention: head 64
policy = build_policy(PolicyConfig(model=str(model_dir)), str(model_dir), "English", "German")
gen = GenerationConfig(max_new_tokens=12, temperature=0.7)
engine = VLLMEngine(policy, VLLMConfig(kv_cache_memory_bytes=64 << 20), gen.max_new_tokens, seed=0)
queries, qmask = policy.encode_sources(["A dog runs.", "Two cats sleep on a mat in the sun.", "Hello.", "A man."])


def gap(responses: torch.Tensor, mask: torch.Tensor, engine_logprobs: torch.Tensor) -> float:
    """The largest |trainer - engine| log-prob over the sampled tokens (the trainer teacher-forced)."""
    with torch.no_grad():
        trainer = policy(queries, qmask, responses, mask, gen.temperature, with_values=False, with_entropy=False)
    return float(((trainer.logprobs - engine_logprobs).abs() * mask).max())


first, mask, logprobs = engine.sample(queries, qmask, gen, [1, 2, 3, 4])
again, _, _ = engine.sample(queries, qmask, gen, [1, 2, 3, 4])
other, _, _ = engine.sample(queries, qmask, gen, [5, 6, 7, 8])
eos = policy.eos_token_id
ended = [bool((row[m.bool()] == eos).any()) or int(m.sum()) == gen.max_new_tokens for row, m in zip(first, mask)]
result = {"shape": list(first.shape), "same_seeds_same_samples": torch.equal(first, again),
          "other_seeds_differ": not torch.equal(first, other), "rows_end_with_eos_or_the_limit": all(ended),
          "logprobs_zero_on_padding": float((logprobs * (1 - mask)).abs().max()),
          "gap_before_update": gap(first, mask, logprobs)}

with torch.no_grad():  # an update: the trainer's weights move
    for p in policy.model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
stale, stale_mask, stale_logprobs = engine.sample(queries, qmask, gen, [1, 2, 3, 4])
result["gap_before_sync"] = gap(stale, stale_mask, stale_logprobs)  # the engine still samples the old weights
engine.load_weights(policy.model)
fresh, fresh_mask, fresh_logprobs = engine.sample(queries, qmask, gen, [1, 2, 3, 4])
result["gap_after_sync"] = gap(fresh, fresh_mask, fresh_logprobs)
(out / "result.json").write_text(json.dumps(result))
