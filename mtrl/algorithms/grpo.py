"""Sequence-level baseline for causal policies: TRL's ``GRPOTrainer`` with the detector's sentence score.

GRPO (Shao et al. 2024) samples ``samples_per_prompt`` completions per prompt and uses the group-normalised
sentence reward as every token's advantage; no value head, no token-level credit. It is here as the
baseline the token-level schemes are compared with, through TRL's own implementation (decoder-only, as
GRPO is in TRL). The recipe maps onto ``GRPOConfig``: batch_size prompts x samples_per_prompt completions
per step, lr, kl_coef -> beta, generation temperature/top_p/max_new_tokens, train.steps -> max_steps.
``metrics.jsonl`` gets TRL's per-step logs with ``reward`` renamed ``reward_mean`` (and ``reward_std``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtrl.errors import MtrlError


def train_grpo(recipe: Any, policy: Any, train_pairs: Sequence[tuple[str, str]], rewarder: Any, run_dir: Path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if policy.kind != "causal":
        raise MtrlError("algorithm.name grpo needs a causal (decoder-only) policy: TRL's GRPOTrainer has no "
                        "encoder-decoder support; use ppo/reinforce/rloo for seq2seq models")
    a, gen = recipe.algorithm, recipe.generation
    if a.samples_per_prompt < 2:
        raise MtrlError("algorithm.samples_per_prompt must be >= 2 for grpo (rewards are normalised per group)")
    n = recipe.train.steps * a.batch_size
    pairs = [train_pairs[i % len(train_pairs)] for i in range(n)]
    ds = Dataset.from_dict({"prompt": [policy.prompt_text(s) for s, _ in pairs],
                            "source": [s for s, _ in pairs], "reference": [r for _, r in pairs]})

    def reward(prompts, completions, source, reference, **kwargs) -> list[float]:
        dets = rewarder.detect(list(source), [c.strip() for c in completions], list(reference))
        return [d.score * rewarder.scale for d in dets]

    args = GRPOConfig(output_dir=str(run_dir / "grpo"), per_device_train_batch_size=a.batch_size * a.samples_per_prompt,
                      num_generations=a.samples_per_prompt, max_completion_length=gen.max_new_tokens,
                      learning_rate=a.lr, beta=a.kl_coef, temperature=gen.temperature, top_p=gen.top_p,
                      top_k=gen.top_k or None, max_steps=recipe.train.steps, logging_steps=1, save_strategy="no",
                      report_to="none", bf16=False, use_cpu=recipe.train.cpu or not torch.cuda.is_available(),
                      gradient_checkpointing=False, seed=recipe.seed, max_grad_norm=a.max_grad_norm,
                      disable_tqdm=False)
    trainer = GRPOTrainer(model=policy.model, reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=policy.tokenizer)
    trainer.train()
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for h in trainer.state.log_history:
            if "reward" in h:
                h = {**h, "reward_mean": h["reward"], "reward_std": h.get("reward_std", 0.0),
                     "sentence_score_mean": h["reward"] / (rewarder.scale or 1.0)}
                f.write(json.dumps(h) + "\n")
