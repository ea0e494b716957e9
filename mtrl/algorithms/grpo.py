"""Sequence-level baseline for causal policies: TRL's ``GRPOTrainer`` with mtrl's rewarder.

GRPO (Shao et al. 2024) samples ``samples_per_prompt`` completions per prompt and uses the
group-normalised sequence reward as every token's advantage: no value head, no token-level credit.
It is the baseline the token-level schemes are compared with, through TRL's own implementation
(decoder-only, as GRPO is in TRL). The sequence reward is the sum of the rewarder's token rewards
for the completion's own token ids, so ``reward.mode`` means what it means for PPO (``sentence``:
the detector's score; ``token``: the span penalties; ``hybrid``/``r3hf``: their sums).
TRL's per-step logs are appended to the run's ``metrics.jsonl`` (``reward`` -> ``reward_mean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from mtrl.algorithms.protocols import FitResult, OfflineData, RunLog
from mtrl.errors import MtrlError
from mtrl.policy import GenerationConfig, Policy, trainer_checkpointing
from mtrl.rewards import Rewarder
from mtrl.schema import Range


@dataclass
class GRPOConfig:
    name: Literal["grpo"] = "grpo"
    lr: Annotated[float, Range(gt=0)] = 1e-5
    batch_size: Annotated[int, Range(ge=1)] = 8  # prompts per step (each with samples_per_prompt completions)
    samples_per_prompt: Annotated[int, Range(ge=2)] = 4  # a group to compare
    kl_coef: Annotated[float, Range(ge=0)] = 0.05  # TRL's beta
    max_grad_norm: Annotated[float, Range(gt=0)] = 1.0


class GRPO:
    """Runs TRL's GRPOTrainer on the recipe's train pairs for ``train.steps`` steps: TRL owns the loop, so to
    the runner it is one ``fit`` call (see :mod:`mtrl.algorithms.protocols`)."""

    def __init__(self, cfg: GRPOConfig, policy: Policy, rewarder: Rewarder, gen: GenerationConfig,
                 accelerator: Any, total_steps: int):
        if policy.kind != "causal":
            raise MtrlError("algorithm.name grpo needs a causal (decoder-only) policy: TRL's GRPOTrainer has no "
                            "encoder-decoder support; use ppo, reinforce or rloo for seq2seq models")
        self.cfg, self.policy, self.rewarder, self.gen = cfg, policy, rewarder, gen
        self.total_steps, self.cpu = total_steps, accelerator.device.type == "cpu"

    def fit(self, data: OfflineData, log: RunLog) -> FitResult:
        import tempfile

        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer

        cfg, gen, policy, train_pairs, log_metrics = self.cfg, self.gen, self.policy, data.pairs, log.metrics
        n = self.total_steps * cfg.batch_size
        pairs = [train_pairs[i % len(train_pairs)] for i in range(n)]
        ds = Dataset.from_dict({"prompt": [policy.prompt_text(s) for s, _ in pairs],
                                "source": [s for s, _ in pairs], "reference": [r for _, r in pairs]})

        def reward(prompts, completions, completion_ids, source, reference, **kwargs) -> list[float]:
            out = self.rewarder(list(source), None, list(reference), completion_ids)
            return [float(sum(r)) for r in out.token_rewards]

        class AppendMetrics(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "reward" in logs:
                    log_metrics({"step": state.global_step, **logs, "reward_mean": logs["reward"],
                         "reward_std": logs.get("reward_std", 0.0)})

        output_dir = tempfile.TemporaryDirectory(prefix="mtrl-grpo-")  # TRL wants one; save_strategy "no" keeps it empty
        args = TRLConfig(output_dir=output_dir.name, per_device_train_batch_size=cfg.batch_size * cfg.samples_per_prompt,
                         num_generations=cfg.samples_per_prompt, max_completion_length=gen.max_new_tokens,
                         learning_rate=cfg.lr, beta=cfg.kl_coef, temperature=gen.temperature, top_p=gen.top_p,
                         top_k=gen.top_k or None, max_steps=self.total_steps, logging_steps=1, save_strategy="no",
                         report_to="none", bf16=False, use_cpu=self.cpu or not torch.cuda.is_available(),
                         **trainer_checkpointing(False), seed=data.seed, max_grad_norm=cfg.max_grad_norm,
                         disable_tqdm=not log.progress)
        trainer = GRPOTrainer(model=policy.model, reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=policy.tokenizer, callbacks=[AppendMetrics()])
        with output_dir:
            trainer.train()
        return FitResult()
