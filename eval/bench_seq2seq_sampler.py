"""The seq2seq sampler on a CPU: the encoder once per source, and the static cache + compiled decoding step.

Prints ``name: value`` lines, all measured in this one process (same machine, same threads), for the shipped
tiny Marian (``mtrl:tiny-marian``), Multi30k validation sources, ``--max-new-tokens`` (default 64), at 32 and
256 sequences per ``generate`` call:

* ``seq<N>_k<K>_repeat_tokens_per_s`` / ``seq<N>_k<K>_once_tokens_per_s`` / ``seq<N>_k<K>_once_vs_repeat``:
  ``Policy.sample`` of N/K sources x K samples, with the encoder run on every copy of a source (the sources
  repeated, the path before issue #19) and once per source (``samples_per_prompt=K``); ``..._same_samples``:
  both drew the same tokens (same torch seed).
* ``seq<N>_dynamic_tokens_per_s`` / ``seq<N>_compiled_tokens_per_s`` / ``seq<N>_compiled_vs_dynamic``: one
  sample per source, transformers' default dynamic KV cache against ``generation.compile`` (static cache,
  ``torch.compile``'d decoding step, Inductor), after warm-up (one dynamic call, two compiled); timed runs
  alternate between the two. ``seq<N>_compiled_first_call_s`` / ``..._second_call_s``: the first two compiled
  calls (compilation included; Inductor's cache is a fresh directory); ``..._new_width_first_call_s``: the
  first call on N other sources of another padded width (a new cross-attention cache shape);
  ``seq<N>_compiled_same_samples``: both drew the same tokens.

Tokens are sampled response tokens (the mask's sum). Timings: the median of ``--repeats`` runs.

Usage: python eval/bench_seq2seq_sampler.py [--repeats 3] [--threads 2] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mtrl-inductor-"))  # a cold compile

import torch  # noqa: E402

from mtrl.datasets import load_parallel  # noqa: E402
from mtrl.policy import TINY_MARIAN, GenerationConfig, PolicyConfig, build_policy  # noqa: E402


def sample(policy, queries, qmask, gen, k: int = 1) -> tuple[float, tuple]:
    """Seconds of one ``Policy.sample`` call (torch seed 0), and what it returned."""
    torch.manual_seed(0)
    t = time.perf_counter()
    out = policy.sample(queries, qmask, gen, samples_per_prompt=k)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="samples per source for the encoder-once comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = build_policy(PolicyConfig(model=TINY_MARIAN), TINY_MARIAN, "English", "German")
    sources = [s for s, _ in load_parallel("multi30k", "val")]
    print(f"model: {TINY_MARIAN}")
    print(f"torch: {torch.__version__}")
    print(f"threads: {torch.get_num_threads()}")
    print(f"max_new_tokens: {args.max_new_tokens}")
    dynamic = GenerationConfig(max_new_tokens=args.max_new_tokens)
    compiled = GenerationConfig(max_new_tokens=args.max_new_tokens, compile=True)
    for n in (32, 256):
        # 1. the encoder once per source (K samples each) against the sources repeated
        k = args.k
        q, m = policy.encode_sources(sources[:n // k])
        rq, rm = q.repeat_interleave(k, 0), m.repeat_interleave(k, 0)
        sample(policy, q, m, dynamic, k)  # warm-up
        times: dict[str, list[float]] = {"repeat": [], "once": []}
        for _ in range(args.repeats):
            t_rep, a = sample(policy, rq, rm, dynamic)
            t_once, b = sample(policy, q, m, dynamic, k)
            times["repeat"].append(t_rep)
            times["once"].append(t_once)
        tokens = float(a[1].sum())
        rep, once = tokens / statistics.median(times["repeat"]), tokens / statistics.median(times["once"])
        print(f"seq{n}_k{k}_repeat_tokens_per_s: {rep:.0f}")
        print(f"seq{n}_k{k}_once_tokens_per_s: {once:.0f}")
        print(f"seq{n}_k{k}_once_vs_repeat: {once / rep:.3f}")
        print(f"seq{n}_k{k}_same_samples: {torch.equal(a[0], b[0])}")
        # 2. dynamic cache against the static cache with the compiled decoding step
        q, m = policy.encode_sources(sources[:n])
        sample(policy, q, m, dynamic)  # warm-up
        first, _ = sample(policy, q, m, compiled)
        second, _ = sample(policy, q, m, compiled)
        times = {"dynamic": [], "compiled": []}
        for _ in range(args.repeats):
            t_dyn, a = sample(policy, q, m, dynamic)
            t_comp, b = sample(policy, q, m, compiled)
            times["dynamic"].append(t_dyn)
            times["compiled"].append(t_comp)
        other = sorted(sources[n:], key=len, reverse=True)[:n]  # as many sources, padded wider
        q2, m2 = policy.encode_sources(other)
        new_width, _ = sample(policy, q2, m2, compiled)
        dyn = float(a[1].sum()) / statistics.median(times["dynamic"])
        comp = float(b[1].sum()) / statistics.median(times["compiled"])
        print(f"seq{n}_dynamic_tokens_per_s: {dyn:.0f}")
        print(f"seq{n}_compiled_tokens_per_s: {comp:.0f}")
        print(f"seq{n}_compiled_vs_dynamic: {comp / dyn:.3f}")
        print(f"seq{n}_compiled_first_call_s: {first:.1f}")
        print(f"seq{n}_compiled_second_call_s: {second:.1f}")
        print(f"seq{n}_compiled_new_width_first_call_s: {new_width:.1f} (source width {q.shape[1]} -> {q2.shape[1]})")
        print(f"seq{n}_compiled_same_samples: {torch.equal(a[0], b[0])}")


if __name__ == "__main__":
    main()
