"""PPO steps of real-size translation models on one GPU: where a step's time goes, and how well the update
uses the chip. No downloads.

Every model is built from a config with its real dimensions and **random weights**, in memory (no hub, no
checkpoint written):

* ``marian``: Marian-base (opus-mt-en-de): d_model 512, 6+6 layers, 8 heads, FFN 2048, vocabulary 58,101;
  full fine-tuning;
* ``nllb``: NLLB-600M (M2M100): d_model 1024, 12+12 layers, 16 heads, FFN 4096, vocabulary 256,206,
  language codes as forced BOS; full fine-tuning;
* ``qwen``: Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads / 2 KV heads, intermediate 8960, vocabulary
  151,936, tied embeddings; with LoRA (mtrl's default ``PolicyConfig.lora``: r 8, all linear layers);
* the detector, once, shared by all three: mtrl's xCOMET (:mod:`mtrl.comet`) on XLM-R-XL dimensions (hidden 2560,
  36 layers, 32 heads, intermediate 10240, vocabulary 250,880; 3.5B parameters), built directly on its
  device in bf16 (a CPU init in fp32 would take minutes) and wrapped by ``XCometDetector.from_model``.

Tokenizers are mtrl's tiny ones (:mod:`mtrl.testing`: Unigram for the seq2seq models, byte-level BPE with a
chat template for Qwen, the tiny xCOMET's XLM-R-style one for the detector); their ids are a small part of
each model's vocabulary, so sampling is restricted to them (``generation_config.suppress_tokens``) and
every hypothesis decodes to text the detector reads. Random weights give random tokens; EOS is held back
until ``--max-new-tokens`` (``min_new_tokens``), so every row has the same, known length, which is what a
timing needs. Text quality is irrelevant here.

Each model runs through mtrl's own code path in bf16 on one GPU: :class:`~mtrl.policy.Policy` ->
:class:`~mtrl.rewards.Rewarder` (token-level span rewards, xCOMET in QE mode) -> ``build_online(PPOConfig)``
-> ``algo.step(sources, references)`` on Multi30k training sources, one warm-up step and ``--steps`` timed
ones (each between ``torch.cuda.synchronize()`` calls).

It prints ``name: value`` lines as it goes (build and warm-up times first, so a user sees progress), then
per model, as means over the timed steps:

* ``<model>.step_s``: one PPO step, wall clock; ``generate_s`` (sampling), ``reward_s`` (decode +
  detector + span-to-token rewards; ``detector_s`` of it is xCOMET's ``detect``), ``forward_s`` (the
  teacher-forced reference pass, and the policy's recompute of the old log-probs in bf16), ``update_s``
  (GAE and the PPO epochs): PPO's own ``time_*`` step metrics; ``other_s`` is the rest (KL shaping,
  bookkeeping);
* ``<model>.tokens_per_s``: sampled tokens per second of the whole step; ``generate_tokens_per_s``: of
  sampling alone;
* ``<model>.update_tflops``, ``<model>.mfu``: the update's model-FLOPs utilisation, over ``update_s`` and
  the GPU's bf16 dense peak (H200 / H100 SXM 989, H100 NVL 835, H100 PCIe 756, A100 312 TFLOP/s, found
  from the device name; ``--peak-tflops`` overrides; ``n/a`` on a CPU)::

      FLOPs = k * epochs * batch * (N_enc * S + N_dec * T + N_head * T)       (seq2seq)
      FLOPs = k * epochs * batch * (N_body * (S + T) + N_head * T)            (causal)

  k = 6 for full fine-tuning (forward 2, backward 4 per weight and token), k = 4 for LoRA (forward 2 +
  activation gradients 2 through the frozen base; the adapters' own weight gradients are negligible).
  N_*: weights of the ``nn.Linear`` layers of the part that sees those tokens (embedding lookups
  excluded, the LM head counted once even when tied); S the padded source / prompt length, T the response
  length. Attention-score FLOPs (quadratic in length) are left out, as usual: they are a few percent at
  these lengths;
* ``<model>.peak_memory_gb``: ``torch.cuda.max_memory_allocated`` on the policy's GPU, reset per model
  (the detector's weights are included when it shares that GPU; ``detector.memory_gb`` says how much; on
  a GPU of its own, ``detector.peak_memory_gb`` at the end covers the whole run); on a CPU the process'
  peak RSS (not reset per model).

Then, per model, in the same run and on the same model object (after the PPO steps), a **sampling sweep** over
``--batch-sizes`` (default 32 and 256; ``--tiny``: 4 and 8): for each batch size B, one warm-up and
``--sweep-repeats`` timed rounds, the samplers interleaved within each round:

* ``rollout``: mtrl's rollout, :func:`mtrl.rollout.collect_rollout` (values too, as PPO samples), timed by its
  own ``generate_s`` (encoding the sources + :meth:`~mtrl.policy.Policy.sample`), the part a PPO step spends
  sampling; its rewarder here is a cheap chrF one, outside that time;
* ``hf_generate``: plain ``model.generate`` of the same model (LoRA adapter and all) on the same encoded batch,
  multinomial sampling (``do_sample=True``, temperature 1, no top-k/top-p), the same length limit and the same
  generation config (``min_new_tokens``, ``suppress_tokens``; NLLB's forced BOS);
* ``vllm`` (the causal model only): :class:`mtrl.vllm_engine.VLLMEngine` built from the policy (after the PPO
  steps; ``vllm_build_s``), sleep mode off, one seed per row; ``n/a (reason)`` when vLLM is not usable or
  ``--no-vllm``. vLLM sees neither ``min_new_tokens`` nor ``suppress_tokens``: a row may stop at EOS, and its
  tokens are counted up to it.

Lines ``<model>.b<B>.<sampler>_tokens_per_s`` (generated tokens / wall time, sums over the timed rounds) and
``<model>.b<B>.<sampler>_limit_fraction``, the fraction of the **decode limit**: a decoding step must read the
weights it uses and the KV cache once from GPU memory, so with bandwidth W (bytes/s)::

      bytes_per_step = weight_bytes + kv_bytes
      kv_bytes       = 2 * L * H_kv * d_head * e * (S + (T - 1) / 2) * B
      limit tokens/s = B / (bytes_per_step / W);   limit_fraction = achieved tokens/s / limit tokens/s

2 for K and V; L layers (seq2seq: decoder layers), H_kv key/value heads, d_head the head size, e bytes per
element (the model's dtype); S the padded source/prompt length (seq2seq: read through cross-attention), and the
step that makes response token i reads the i - 1 tokens before it, (T - 1) / 2 on average over a response of T
tokens; B the batch. ``weight_bytes`` (``<model>.decode_weights_gb``): every ``nn.Linear`` weight and bias on
the decoding path (the causal stack or the decoder, LoRA adapters, the LM head once even when tied), not the
encoder (run once per source) nor the cross-attention's key/value projections (applied once to the encoder's
output), nor the embedding tables (B rows gathered) and norms. Also printed: ``<model>.b<B>.src_len`` (S),
``kv_cache_gb`` (kv_bytes), ``limit_tokens_per_s``. W: the GPU's memory bandwidth by name (H200 4.8, H100 NVL
3.9, H100 SXM 3.35, H100 PCIe 2.0, A100 80GB 2.0, A100 40GB 1.55 TB/s) or ``--bandwidth-gbs``; ``n/a`` for an
unlisted GPU or a CPU unless given. The limit ignores compute, the prefill and the encoder: no sampler reaches it,
and the fraction says how far from it each one is.

Usage (108 s on one H200 before the sampling sweep was added; with it, not yet measured on a GPU; ``total_s``
says)::

    python eval/gpu_check.py
    python eval/gpu_check.py --models qwen --steps 5 --batch-size 32 --max-new-tokens 128
    python eval/gpu_check.py --detector-device cuda:1      # xCOMET on a second GPU
    python eval/gpu_check.py --batch-sizes 32,256,1024 --models qwen   # the sampling sweep's batch sizes
    python eval/gpu_check.py --bandwidth-gbs 3350          # an unlisted GPU: its memory bandwidth, GB/s
    python eval/gpu_check.py --tiny                        # the same code, tiny models, CPU, fp32, seconds

``--tiny`` is what ``tests/test_gpu_check.py`` runs, so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrl.algorithms import PPOConfig, build_online
from mtrl.datasets import load_pairs
from mtrl.detectors import load_detector
from mtrl.detectors.xcomet import XCometDetector
from mtrl.errors import one_line
from mtrl.policy import GenerationConfig, LoraConfig, Policy, PolicyConfig, ReferencePolicy, apply_lora
from mtrl.rewards import RewardConfig, Rewarder
from mtrl.rollout import collect_rollout
from mtrl.testing import CHAT_TEMPLATE, ENCODER_DIR, build_tiny_xcomet, get_tokenizer

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout holds only the name: value lines

# bf16 dense peak, TFLOP/s, by a part of the CUDA device name (first match wins)
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.0), ("A100", 312.0))
# memory bandwidth, GB/s, by parts of the CUDA device name (the first entry whose parts all occur wins)
MEMORY_BANDWIDTH_GBS = ((("H200",), 4800.0), (("H100", "NVL"), 3900.0), (("H100", "PCIe"), 2000.0),
                        (("H100",), 3350.0), (("A100", "80GB"), 2000.0), (("A100", "40GB"), 1550.0))
# PPO's step metrics that split the step's time (mtrl.algorithms.common.rollout_metrics)
TIME_KEYS = ("time_generate_s", "time_reward_s", "time_forward_s", "time_update_s")
XLMR_XL = dict(vocab_size=250880, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
               intermediate_size=10240, max_position_embeddings=514)


def say(key: str, value: Any) -> None:
    """One ``name: value`` line, flushed at once (the user watches progress)."""
    print(f"{key}: {f'{value:.6g}' if isinstance(value, float) else value}", flush=True)


# --------------------------------------------------------------------------- the models
def marian_config(tok: Any, vocab: int, tiny: bool) -> Any:
    from transformers import MarianConfig

    d, layers, heads, ffn = (32, 1, 2, 64) if tiny else (512, 6, 8, 2048)
    return MarianConfig(vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                        decoder_ffn_dim=ffn, activation_function="swish", max_position_embeddings=512,
                        scale_embedding=True, share_encoder_decoder_embeddings=True, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                        forced_eos_token_id=None)


def nllb_config(tok: Any, vocab: int, tiny: bool) -> Any:
    from transformers import M2M100Config

    d, layers, heads, ffn = (32, 1, 2, 64) if tiny else (1024, 12, 16, 4096)
    return M2M100Config(vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                        decoder_ffn_dim=ffn, activation_function="relu", max_position_embeddings=1024,
                        scale_embedding=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                        forced_eos_token_id=None)


def qwen_config(tok: Any, vocab: int, tiny: bool) -> Any:
    from transformers import Qwen2Config

    # tiny: head size 64, the smallest that vLLM's CPU attention takes
    hidden, layers, heads, kv, inter = (128, 2, 2, 1, 256) if tiny else (1536, 28, 12, 2, 8960)
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=None)


@dataclass
class ModelSpec:
    title: str
    kind: str  # "seq2seq" or "causal"
    model_class: str  # in transformers
    config: Callable[[Any, int, bool], Any]  # (tokenizer, vocabulary size, tiny) -> the model's config
    vocab_size: int  # the real model's
    tokenizer: str  # an mtrl.testing tokenizer family
    lora: bool = False
    lang_codes: tuple[str, str] | None = None  # NLLB: source and target language codes (tokens)


MODELS: dict[str, ModelSpec] = {
    "marian": ModelSpec("Marian-base (opus-mt-en-de), full fine-tuning", "seq2seq", "MarianMTModel",
                        marian_config, 58101, "unigram"),
    "nllb": ModelSpec("NLLB-600M (M2M100), full fine-tuning", "seq2seq", "M2M100ForConditionalGeneration",
                      nllb_config, 256206, "unigram", lang_codes=("eng_Latn", "deu_Latn")),
    "qwen": ModelSpec("Qwen2.5-1.5B, LoRA", "causal", "Qwen2ForCausalLM", qwen_config, 151936, "bytelevel",
                      lora=True),
}


@contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New parameters are created on ``device`` in ``dtype``: a random init of billions of weights takes
    seconds on a GPU in bf16, minutes on a CPU in fp32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_policy(name: str, tiny: bool, max_new_tokens: int, device: torch.device, dtype: torch.dtype) -> Policy:
    """The policy as ``mtrl.policy.build_policy`` makes it, from a config instead of a checkpoint."""
    import transformers

    spec = MODELS[name]
    tok = copy.deepcopy(get_tokenizer(spec.tokenizer))
    if spec.lang_codes:
        tok.add_special_tokens({"additional_special_tokens": list(spec.lang_codes)})
    if spec.kind == "causal":
        tok.chat_template = CHAT_TEMPLATE
    vocab = len(tok) + 64 if tiny else spec.vocab_size  # tiny: a few ids past the tokenizer's, as in real size
    torch.manual_seed(0)
    with built_on(device, dtype):
        model = getattr(transformers, spec.model_class)(spec.config(tok, vocab, tiny))  # rotary freqs stay fp32
    tok.model_input_names = ["input_ids", "attention_mask"]
    # sample only ids the tokenizer can decode, and every row to max_new_tokens (see the module docstring)
    gc_ = model.generation_config
    gc_.suppress_tokens = list(range(len(tok), vocab)) or None
    gc_.min_new_tokens = max_new_tokens
    gc_.bad_words_ids = None
    cfg = PolicyConfig(model=f"{name} (random weights)", kind=spec.kind, lora=LoraConfig() if spec.lora else None,
                       dtype="fp32" if dtype == torch.float32 else "bf16",
                       src_lang_code=spec.lang_codes[0] if spec.lang_codes else None,
                       tgt_lang_code=spec.lang_codes[1] if spec.lang_codes else None)
    if cfg.lora is not None:
        model = apply_lora(model, spec.kind, cfg.lora)
    model.eval()  # no dropout: rollout and update log-probs must agree
    return Policy(model, tok, spec.kind, cfg, "English", "German")


def build_detector(tmp: Path, tiny: bool, device: torch.device, dtype: torch.dtype, batch_size: int) -> Any:
    """xCOMET with random weights, built in memory: XLM-R-XL dimensions (or the tiny xCOMET's with ``tiny``),
    the tiny xCOMET's tokenizer. Only the tiny encoder's files are written (its checkpoint is a few hundred KB)."""
    from transformers import AutoConfig, XLMRobertaXLConfig

    from mtrl.comet import UnifiedMetric
    from mtrl.comet.checkpoint import load_tokenizer
    from mtrl.comet.encoder import CometEncoder

    encoder = build_tiny_xcomet(tmp / "tiny-xcomet", train_steps=0).parents[1] / ENCODER_DIR
    if tiny:
        config = AutoConfig.from_pretrained(encoder)
        hparams: dict[str, Any] = dict(hidden_sizes=[64, 32], word_layer=2)  # the tiny encoder has 2 layers
    else:  # XCOMETMetric's defaults are XCOMET-XL's head (hidden_sizes 2560/1280, word_layer 36)
        config = XLMRobertaXLConfig(**XLMR_XL, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        hparams = {}
    torch.manual_seed(0)
    with built_on(device, dtype):
        model = UnifiedMetric(CometEncoder("XLM-RoBERTa-XL", config, load_tokenizer(str(encoder))), hparams,
                              xcomet=True)
    return XCometDetector.from_model(model, device=str(device), dtype="fp32" if dtype == torch.float32 else "bf16",
                                     batch_size=batch_size, use_reference=False, name="xcomet (random weights)")


# --------------------------------------------------------------------------- measuring
def linear_weights(model: nn.Module) -> dict[str, int]:
    """Weights of the ``nn.Linear`` layers by the tokens they see: the encoder's (source tokens), the LM head's
    (response tokens) and the rest (``body``: decoder or causal stack). A tied LM head is one module, counted once."""
    parts = {"encoder": 0, "body": 0, "head": 0}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            path = name.split(".")
            part = "head" if "lm_head" in path else "encoder" if "encoder" in path else "body"
            parts[part] += module.weight.numel()
    return parts


def update_flops(weights: dict[str, int], kind: str, lora: bool, epochs: int, batch: int, src_len: int,
                 resp_len: int) -> float:
    """Model FLOPs of PPO's update (see the module docstring)."""
    k = 4 if lora else 6
    body_tokens = resp_len if kind == "seq2seq" else src_len + resp_len
    per_row = weights["encoder"] * src_len + weights["body"] * body_tokens + weights["head"] * resp_len
    return float(k * epochs * batch * per_row)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The GPU's bf16 dense peak in TFLOP/s; None when unknown (a CPU, an unlisted GPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def memory_bandwidth_gbs(device: torch.device, override: float | None) -> float | None:
    """The GPU's memory bandwidth in GB/s; None when unknown (a CPU, an unlisted GPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((gbs for parts, gbs in MEMORY_BANDWIDTH_GBS if all(p.lower() in name for p in parts)), None)


def base_model(model: nn.Module) -> Any:
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights one decoding step reads (see the module docstring): the ``nn.Linear`` weights and
    biases of the decoding path, each tensor once; not the encoder's, nor the cross-attention's key/value
    projections."""
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        path = name.split(".")
        if "encoder" in path or any(a == "encoder_attn" and b in ("k_proj", "v_proj") for a, b in zip(path, path[1:])):
            continue
        for p in (module.weight, module.bias):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def kv_cache_shape(model: nn.Module, kind: str) -> tuple[int, int, int, int]:
    """(layers, key/value heads, head size, bytes per element) of the KV cache a decoding step reads."""
    base = base_model(model)
    cfg = base.config
    if kind == "seq2seq":
        layers, heads = cfg.decoder_layers, cfg.decoder_attention_heads
        kv, head_dim = heads, cfg.d_model // heads
    else:
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv, head_dim, base.get_input_embeddings().weight.element_size()


def kv_bytes_per_step(shape: tuple[int, int, int, int], src_len: int, resp_len: int, batch: int) -> float:
    """2 (K and V) x layers x kv_heads x head_dim x bytes per element x (S + (T - 1) / 2) x B."""
    layers, kv, head_dim, elem = shape
    return 2.0 * layers * kv * head_dim * elem * (src_len + (resp_len - 1) / 2) * batch


def decode_limit_tokens_per_s(bytes_per_step: float, bandwidth_gbs: float | None, batch: int) -> float | None:
    """Tokens/s if every decoding step took only the time to read ``bytes_per_step`` at the GPU's bandwidth."""
    if not bandwidth_gbs:
        return None
    return batch / (bytes_per_step / (bandwidth_gbs * 1e9))


def vllm_unusable() -> str | None:
    """None when :class:`mtrl.vllm_engine.VLLMEngine` can run here, else why not (one line)."""
    try:
        from mtrl.vllm_engine import vllm_available

        return vllm_available()
    except Exception as e:  # noqa: BLE001 - an engine module that cannot even be asked is one reason more
        return f"mtrl.vllm_engine: {type(e).__name__}: {one_line(e)}"


def sync(devices: list[torch.device]) -> None:
    """Wait for the GPUs, so that a wall-clock time covers the kernels launched before it."""
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed(fn: Callable[..., Any], totals: dict[str, float], key: str) -> Callable[..., Any]:
    """``fn`` that adds its wall time to ``totals[key]``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0
    return wrapper


def check_model(name: str, args: argparse.Namespace, accelerator: Any, detector: Any, pairs: list[tuple[str, str]],
                devices: list[torch.device], peak: float | None, bandwidth: float | None,
                no_vllm: str | None) -> None:
    """Build one policy, run a warm-up and ``args.steps`` timed PPO steps, print its lines."""
    spec, device, B, T = MODELS[name], accelerator.device, args.batch_size, args.max_new_tokens
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    policy = build_policy(name, args.tiny, T, device, dtype)
    rewarder = Rewarder(RewardConfig(), detector, policy.tokenizer, use_reference=False, language="German")
    ppo = PPOConfig(batch_size=B, minibatch_size=max(1, B // 2))  # epochs 2, mtrl's defaults otherwise
    algo = build_online(ppo, policy, rewarder, GenerationConfig(max_new_tokens=T), accelerator,
                           total_steps=args.steps + 1)
    weights = linear_weights(policy.model)
    sync(devices)
    say(f"{name}.model", spec.title)
    say(f"{name}.params_m", sum(p.numel() for p in policy.model.parameters()) / 1e6)
    say(f"{name}.trainable_params_m", sum(p.numel() for p in policy.model.parameters() if p.requires_grad) / 1e6)
    say(f"{name}.build_s", time.perf_counter() - t0)

    totals = {"detector_s": 0.0}
    detector.detect = timed(detector.detect, totals, "detector_s")  # an instance attribute: the rewarder calls it
    rows: list[dict[str, float]] = []
    try:
        for i in range(args.steps + 1):
            batch = pairs[i * B:(i + 1) * B]
            sources, refs = [p[0] for p in batch], [p[1] for p in batch]
            src_len = policy.encode_sources(sources)[0].shape[1]
            rewarder.detections.clear()  # every step scores afresh
            totals["detector_s"] = 0.0
            sync(devices)
            t0 = time.perf_counter()
            metrics = algo.step(sources, refs)
            sync(devices)
            step_s = time.perf_counter() - t0
            if i == 0:
                missing = [k for k in TIME_KEYS if k not in metrics]
                if missing:
                    raise SystemExit(f"gpu_check: PPO.step's metrics lack {', '.join(missing)}; this script needs "
                                     f"mtrl's step-time split ({', '.join(TIME_KEYS)})")
                say(f"{name}.warmup_s", step_s)
                continue
            say(f"{name}.step{i}_s", step_s)
            flops = update_flops(weights, spec.kind, spec.lora, ppo.epochs, B, src_len, T)
            rows.append({"step_s": step_s, **{k.removeprefix("time_"): metrics[k] for k in TIME_KEYS},
                         "detector_s": totals["detector_s"], "update_tflops": flops / metrics["time_update_s"] / 1e12})
    finally:
        del detector.detect  # the class's method again
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    for k in ("step_s", "generate_s", "reward_s", "detector_s", "forward_s", "update_s"):
        say(f"{name}.{k}", mean[k])
    say(f"{name}.other_s", mean["step_s"] - sum(mean[k] for k in ("generate_s", "reward_s", "forward_s", "update_s")))
    say(f"{name}.tokens_per_s", B * T / mean["step_s"])
    say(f"{name}.generate_tokens_per_s", B * T / mean["generate_s"])
    say(f"{name}.update_tflops", mean["update_tflops"])
    say(f"{name}.mfu", mean["update_tflops"] / peak if peak else "n/a")
    say(f"{name}.peak_memory_gb", peak_memory_gb(device))

    sweep_sampling(name, policy, getattr(algo, "reference", None), args, pairs, devices, bandwidth, no_vllm)
    del algo, policy, rewarder
    accelerator.free_memory()  # the prepared model and optimiser, before the next model's peak is measured
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep_sampling(name: str, policy: Policy, reference: Any, args: argparse.Namespace, pairs: list[tuple[str, str]],
                   devices: list[torch.device], bandwidth: float | None, no_vllm: str | None) -> None:
    """mtrl's rollout, HF ``generate`` and (causal) vLLM on the same model, per batch size: tokens/s and the
    fraction of the decode limit (see the module docstring)."""
    spec, T, device = MODELS[name], args.max_new_tokens, policy.device
    reference = reference or ReferencePolicy(policy)
    # cheap rewards (chrF against the reference): the rollout's generate_s leaves them out anyway
    rewarder = Rewarder(RewardConfig(mode="sentence"), load_detector("chrf"), policy.tokenizer)
    weight_bytes = decode_weight_bytes(policy.model)
    kv_shape = kv_cache_shape(policy.model, spec.kind)
    say(f"{name}.decode_weights_gb", weight_bytes / 1e9)

    engine, reason = None, (no_vllm if spec.kind == "causal" else None)
    if spec.kind == "causal" and reason is None:
        from mtrl.vllm_engine import VLLMConfig, VLLMEngine

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # vLLM sizes its share from the free memory
        cfg = (VLLMConfig(gpu_memory_utilization=args.vllm_gpu_memory_utilization, sleep=False)
               if device.type == "cuda" else VLLMConfig(kv_cache_memory_bytes=256 * 2**20, sleep=False))
        t0 = time.perf_counter()
        try:
            engine = VLLMEngine(policy, cfg, T, seed=0)
            say(f"{name}.vllm_build_s", time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - the rest of a GPU run is worth keeping; the line says why
            reason = f"the engine did not start: {type(e).__name__}: {one_line(e)}"

    for B in args.batch_sizes:
        sample_batch(f"{name}.b{B}", policy, reference, rewarder, engine, reason, pairs[:B] * (B // len(pairs) + 1),
                     B, args, devices, bandwidth, weight_bytes, kv_shape)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    engine = None  # vLLM's memory goes back before the next model
    gc.collect()


def sample_batch(key: str, policy: Policy, reference: Any, rewarder: Rewarder, engine: Any, reason: str | None,
                 pairs: list[tuple[str, str]], B: int, args: argparse.Namespace, devices: list[torch.device],
                 bandwidth: float | None, weight_bytes: int, kv_shape: tuple[int, int, int, int]) -> None:
    """One batch size of :func:`sweep_sampling`: time each sampler, print its lines under ``key``."""
    T, kind, tok = args.max_new_tokens, policy.kind, policy.tokenizer
    gen = GenerationConfig(max_new_tokens=T)
    sources, refs = [p[0] for p in pairs[:B]], [p[1] for p in pairs[:B]]
    queries, qmask = policy.encode_sources(sources)
    S = queries.shape[1]
    hf_kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                     pad_token_id=tok.pad_token_id, **policy.length_kwargs(queries, T))
    if policy.forced_bos_token_id is not None:
        hf_kwargs["forced_bos_token_id"] = policy.forced_bos_token_id
    prefix = 1 if kind == "seq2seq" else S  # generate's output starts with the decoder start token / the prompt

    def rollout(r: int) -> tuple[float, int]:
        rewarder.detections.clear()
        rewarder.sentence.clear()
        ro = collect_rollout(policy, reference, rewarder, sources, refs, gen, with_values=policy.value_head is not None)
        return ro.stats["generate_s"], ro.responses.numel()

    def hf_generate(r: int) -> tuple[float, int]:
        sync(devices)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = policy.model.generate(input_ids=queries, attention_mask=qmask, **hf_kwargs)
        sync(devices)
        return time.perf_counter() - t0, B * (out.shape[1] - prefix)

    def vllm(r: int) -> tuple[float, int]:
        sync(devices)
        t0 = time.perf_counter()
        _, mask, _ = engine.sample(queries, qmask, gen, seeds=[r * B + i for i in range(B)])
        sync(devices)
        return time.perf_counter() - t0, int(mask.sum())

    samplers: dict[str, Callable[[int], tuple[float, int]]] = {"rollout": rollout, "hf_generate": hf_generate}
    if engine is not None:
        samplers["vllm"] = vllm
    for fn in samplers.values():
        fn(0)  # warm-up
    sums = {k: [0.0, 0] for k in samplers}
    for r in range(1, args.sweep_repeats + 1):
        for k, fn in samplers.items():  # interleaved: drifts of the machine hit all alike
            s, n = fn(r)
            sums[k][0] += s
            sums[k][1] += n

    kv = kv_bytes_per_step(kv_shape, S, T, B)
    limit = decode_limit_tokens_per_s(weight_bytes + kv, bandwidth, B)
    say(f"{key}.src_len", S)
    say(f"{key}.kv_cache_gb", kv / 1e9)
    say(f"{key}.limit_tokens_per_s", limit if limit else "n/a")
    for k in ("rollout", "hf_generate") + (("vllm",) if kind == "causal" else ()):
        if k not in sums:
            say(f"{key}.{k}_tokens_per_s", f"n/a ({reason})")
            say(f"{key}.{k}_limit_fraction", f"n/a ({reason})")
            continue
        tps = sums[k][1] / sums[k][0]
        say(f"{key}.{k}_tokens_per_s", tps)
        say(f"{key}.{k}_limit_fraction", tps / limit if limit else "n/a")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="marian,nllb,qwen", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=3, help="timed PPO steps per model (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=None, help="sources per step (default 32; --tiny: 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response length (default 128; --tiny: 8)")
    ap.add_argument("--detector-device", default=None, help="e.g. cuda:1 (default: the policy's device)")
    ap.add_argument("--detector-batch-size", type=int, default=16, help="rows per xCOMET forward pass")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak (default: by name)")
    ap.add_argument("--batch-sizes", default=None,
                    help="the sampling sweep's batch sizes, comma-separated (default 32,256; --tiny: 4,8)")
    ap.add_argument("--sweep-repeats", type=int, default=1, help="timed rounds per batch size (after one warm-up)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="the GPU's memory bandwidth in GB/s (default: by name; n/a on a CPU)")
    ap.add_argument("--no-vllm", action="store_true", help="leave vLLM out of the sampling sweep")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                    help="vLLM's share of the GPU's memory (its engine sits next to the policy and the detector)")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU in fp32 (seconds; the test)")
    args = ap.parse_args()
    args.batch_size = args.batch_size or (4 if args.tiny else 32)
    args.max_new_tokens = args.max_new_tokens or (8 if args.tiny else 128)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names or args.steps < 1:
        ap.error(f"--models: choose from {', '.join(MODELS)} (got {args.models!r}); --steps >= 1")
    try:
        args.batch_sizes = [int(b) for b in (args.batch_sizes or ("4,8" if args.tiny else "32,256")).split(",")]
    except ValueError:
        args.batch_sizes = []
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.sweep_repeats < 1:
        ap.error("--batch-sizes: positive integers, comma-separated; --sweep-repeats >= 1")
    if not args.tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: this check is for a GPU (--tiny runs the same code on the CPU)")

    from accelerate import Accelerator

    t_start = time.perf_counter()
    if args.tiny:
        torch.set_num_threads(1)
    accelerator = Accelerator(cpu=args.tiny, mixed_precision="no")  # the weights themselves are bf16
    device = accelerator.device
    det_device = torch.device(args.detector_device) if args.detector_device else device
    devices = list(dict.fromkeys([device, det_device]))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    peak = peak_tflops(device, args.peak_tflops)
    bandwidth = memory_bandwidth_gbs(device, args.bandwidth_gbs)
    no_vllm = "--no-vllm" if args.no_vllm else vllm_unusable() if "qwen" in names else "no causal model"
    say("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    say("dtype", str(dtype).removeprefix("torch."))
    say("peak_tflops", peak if peak else "n/a")
    say("bandwidth_gbs", bandwidth if bandwidth else "n/a")
    say("batch_size", args.batch_size)
    say("max_new_tokens", args.max_new_tokens)
    say("steps", args.steps)
    say("sweep_batch_sizes", ",".join(map(str, args.batch_sizes)))
    say("sweep_repeats", args.sweep_repeats)
    say("vllm", f"n/a ({no_vllm})" if no_vllm else "yes")
    pairs = load_pairs("multi30k:train", limit=max(args.batch_size * (args.steps + 1), *args.batch_sizes))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        before = torch.cuda.memory_allocated(det_device) if det_device.type == "cuda" else 0
        detector = build_detector(Path(tmp), args.tiny, det_device, dtype, args.detector_batch_size)
        sync(devices)
        say("detector.model", "xCOMET, " + ("tiny" if args.tiny else "XLM-R-XL dimensions") + ", random weights")
        say("detector.device", str(det_device))
        say("detector.params_m", sum(p.numel() for p in detector.load().parameters()) / 1e6)
        say("detector.build_s", time.perf_counter() - t0)
        if det_device.type == "cuda":
            say("detector.memory_gb", (torch.cuda.memory_allocated(det_device) - before) / 2**30)
        for name in names:
            check_model(name, args, accelerator, detector, pairs, devices, peak, bandwidth, no_vllm)
        if det_device != device and det_device.type == "cuda":
            say("detector.peak_memory_gb", peak_memory_gb(det_device))
    say("total_s", time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
