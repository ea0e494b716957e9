"""PPO loop cost, as ratios measured in one run (CPU, tiny models built here; no hub).

Prints ``name: value`` lines:

* ``rollout_vs_generate``: tokens/s of a full rollout (sampling through the policy
  wrapper, detokenising, reward scoring, policy + reference log-probs and values)
  over tokens/s of a plain batched ``model.generate`` (``do_sample=True``: transformers'
  multinomial sampling) with the same sampling settings, model and batch (the tiny
  seq2seq test model, 32 sources, 40 new tokens). Target >= 0.8.
* ``sampling_vs_generate``: the sampling part alone (the policy's ``generate``, which
  samples by inverse CDF, see ``mtrl/sampling.py``).
* ``ppo_step_token_s`` / ``ppo_step_r3hf_s`` / ``r3hf_vs_token_step``: one PPO step (tiny seq2seq,
  32 sources, 40 new tokens) with token-level span rewards vs R3HF rewards (the ``reference``
  detector's score on every prefix).
* ``ppo_step_vs_trl_grpo_step``: seconds of one PPO step (rollout + one optimiser
  step) over one TRL ``GRPOTrainer`` step, same tiny causal model, same number of
  completions (8 = 2 distinct prompts x 4 samples), same completion length (24 new tokens, forced), same reward
  (the ``reference`` detector's sentence score), the same KL coefficient (0.05: both run a reference
  model). Target <= 1.0. The model is the causal test model's shape (2 layers, hidden 32) with a
  5,000-token BPE vocabulary trained on Multi30k (the quickstart's vocabulary size); the same figures
  for the causal test model itself (a 700-token vocabulary, where sampling costs little) carry the
  suffix ``_vocab<N>``. PPO steps are timed before and after the GRPO run and pooled. GRPO gets the
  model as a TRL user loads it.

Usage: python eval/bench_ppo.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from mtrl.algorithms.ppo import PPO, PPOConfig
from mtrl.datasets import load_parallel
from mtrl.detectors import load_detector
from mtrl.policy import GenerationConfig, PolicyConfig, ReferencePolicy, build_policy, trainer_checkpointing
from mtrl.rewards import RewardConfig, Rewarder
from mtrl.rollout import collect_rollout
from mtrl.testing import build_tiny_causal, build_tiny_seq2seq, train_tokenizer


def fresh(rewarder: Rewarder) -> Rewarder:
    """Empty the rewarder's caches, so that every timed step scores afresh."""
    rewarder.detections.clear()
    rewarder.sentence.clear()
    if rewarder.redistributor is not None:
        rewarder.redistributor.cache.clear()
    return rewarder


def median_times(fns, repeats: int) -> list[float]:
    """Median seconds of each function, measured round-robin so machine noise hits all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def bench_rollout(model_dir: Path, pairs, repeats: int, batch: int = 32, new_tokens: int = 40) -> dict[str, float]:
    policy = build_policy(PolicyConfig(model=str(model_dir)), str(model_dir), "English", "German")
    policy.add_value_head()  # PPO's rollouts compute values too
    reference = ReferencePolicy(policy)
    rewarder = Rewarder(RewardConfig(), load_detector("reference"), policy.tokenizer)
    gen = GenerationConfig(max_new_tokens=new_tokens)
    sources, refs = [p[0] for p in pairs[:batch]], [p[1] for p in pairs[:batch]]
    q, qm = policy.encode_sources(sources)
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=policy.tokenizer.pad_token_id)
    tokens = batch * new_tokens

    def plain():
        with torch.no_grad():
            policy.model.generate(input_ids=q, attention_mask=qm, **kwargs)

    policy.model.generation_config.min_new_tokens = new_tokens  # same forced length on both paths

    def sampling():
        policy.generate(*policy.encode_sources(sources), gen)

    def rollout():
        collect_rollout(policy, reference, fresh(rewarder), sources, refs, gen, with_values=True)

    t_plain, t_sample, t_roll = median_times([plain, sampling, rollout], repeats)
    return {"generate_tokens_per_s": tokens / t_plain, "sampling_tokens_per_s": tokens / t_sample,
            "rollout_tokens_per_s": tokens / t_roll, "sampling_vs_generate": t_plain / t_sample,
            "rollout_vs_generate": t_plain / t_roll}


def ppo_stepper(model_dir: Path, algo: PPOConfig, gen: GenerationConfig, min_new_tokens: int | None = None):
    """``step(rewarder, sources, references)``: one step of mtrl's PPO (rollout, KL 0.05, update) of a fresh
    policy from ``model_dir``, with the rewarder's caches cleared so every step scores afresh."""
    from accelerate import Accelerator

    policy = build_policy(PolicyConfig(model=str(model_dir)), str(model_dir), "English", "German")
    if min_new_tokens:
        policy.model.generation_config.min_new_tokens = min_new_tokens
    ppo = PPO(algo, policy, None, gen, Accelerator(cpu=True), total_steps=1000)

    def step(rewarder: Rewarder, sources, references) -> None:
        ppo.rewarder = fresh(rewarder)
        ppo.step(sources, references)

    return step, policy.tokenizer


def bench_r3hf(model_dir: Path, pairs, repeats: int, batch: int = 32, new_tokens: int = 40) -> dict[str, float]:
    step, tok = ppo_stepper(model_dir, PPOConfig(batch_size=batch, minibatch_size=16, epochs=2),
                            GenerationConfig(max_new_tokens=new_tokens))
    sources, refs = [p[0] for p in pairs[:batch]], [p[1] for p in pairs[:batch]]
    token, r3hf = (Rewarder(RewardConfig(mode=m), load_detector("reference"), tok) for m in ("token", "r3hf"))
    t_token, t_r3hf = median_times([lambda: step(token, sources, refs), lambda: step(r3hf, sources, refs)], repeats)
    return {"ppo_step_token_s": t_token, "ppo_step_r3hf_s": t_r3hf, "r3hf_vs_token_step": t_r3hf / t_token}


def grpo_step_times(model_dir: Path, pairs, repeats: int, n: int = 8, new_tokens: int = 24) -> list[float]:
    """Seconds of each TRL GRPOTrainer step after the first (2 distinct prompts x 4 generations per step).

    The model is loaded as a TRL user loads it (``from_pretrained``).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    detector = load_detector("reference")

    def reward_fn(prompts, completions, reference, **kwargs):
        return [d.score for d in detector.detect([""] * len(completions), completions, reference)]

    policy = build_policy(PolicyConfig(model=str(model_dir)), str(model_dir), "English", "German")  # prompts
    # distinct prompts: a step's 2 prompts x 4 generations are padded like any real batch (a batch of one
    # repeated prompt has no padding, which makes generation ~3x faster on these tiny models)
    rows = pairs[: 2 * (repeats + 1)]
    ds = Dataset.from_dict({"prompt": [policy.prompt_text(p[0]) for p in rows], "reference": [p[1] for p in rows]})
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, bf16=False, use_cpu=True, **trainer_checkpointing(False),
                         per_device_train_batch_size=n, num_generations=4, max_completion_length=new_tokens,
                         max_steps=repeats + 1, report_to="none", save_strategy="no", logging_steps=1,
                         learning_rate=1e-5, temperature=1.0, top_k=0, top_p=1.0, beta=0.05,
                         generation_kwargs={"min_new_tokens": new_tokens}, disable_tqdm=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, train_dataset=ds,
                              processing_class=policy.tokenizer)
        trainer.add_callback(Timer())
        trainer.remove_callback(PrinterCallback)  # keep stdout to the name: value lines
        trainer.train()
    return step_times[1:]


def ppo_step_times(model_dir: Path, pairs, repeats: int, n: int = 8, new_tokens: int = 24) -> list[float]:
    """Seconds of PPO steps on the same completions per step (2 sources x 4 samples), length and reward as GRPO's;
    one optimiser step (epochs=1, one minibatch)."""
    step, tok = ppo_stepper(model_dir, PPOConfig(batch_size=n // 4, samples_per_prompt=4, minibatch_size=n, epochs=1,
                                                 lr=1e-5), GenerationConfig(max_new_tokens=new_tokens),
                            min_new_tokens=new_tokens)
    rewarder = Rewarder(RewardConfig(mode="sentence"), load_detector("reference"), tok)
    sources, references = [p[0] for p in pairs[: n // 4]], [p[1] for p in pairs[: n // 4]]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        step(rewarder, sources, references)
        times.append(time.perf_counter() - t0)
    return times[1:]


def bench_vs_grpo(model_dir: Path, pairs, repeats: int) -> dict[str, float]:
    """PPO steps timed before and after the GRPO runs and pooled, so that neither order is favoured."""
    ppo_times = ppo_step_times(model_dir, pairs, repeats)
    grpo_times = grpo_step_times(model_dir, pairs, repeats)
    ppo_after = ppo_step_times(model_dir, pairs, repeats)
    t_ppo, t_grpo = statistics.median(ppo_times + ppo_after), statistics.median(grpo_times)
    return {"ppo_step_s": t_ppo, "ppo_step_first_s": statistics.median(ppo_times),
            "ppo_step_after_grpo_s": statistics.median(ppo_after), "trl_grpo_step_s": t_grpo,
            "ppo_step_vs_trl_grpo_step": t_ppo / t_grpo}


def build_causal_with_vocab(out_dir: Path, pairs, vocab_size: int) -> Path:
    """The causal test model (mtrl.testing) with a BPE vocabulary of ``vocab_size`` trained on ``pairs``."""
    tok = train_tokenizer([t for p in pairs for t in p], vocab_size)
    tok.backend_tokenizer.post_processor = None  # no EOS after the prompt
    return build_tiny_causal(out_dir, chat=False, tokenizer=tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs = load_parallel("multi30k", "val")
    with tempfile.TemporaryDirectory() as tmp:
        seq2seq = build_tiny_seq2seq(Path(tmp) / "s2s")
        causal = build_tiny_causal(Path(tmp) / "causal")
        causal_5k = build_causal_with_vocab(Path(tmp) / "causal-5k", load_parallel("multi30k", "train"), 5000)
        small_vocab = AutoConfig.from_pretrained(causal).vocab_size
        results = {**bench_rollout(seq2seq, pairs, args.repeats), **bench_r3hf(seq2seq, pairs, args.repeats),
                   **bench_vs_grpo(causal_5k, pairs, args.repeats),
                   **{f"{k}_vocab{small_vocab}": v for k, v in bench_vs_grpo(causal, pairs, args.repeats).items()}}
    print(f"threads: {args.threads}")
    for k, v in results.items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
