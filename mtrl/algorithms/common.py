"""What the online algorithms share: masked statistics, the KL penalty, the optimiser, the state every one of
them holds around its own update (:class:`OnlineState`), sharded parameters gathered for a rollout, the step's
metrics.

Each algorithm file (``ppo.py``, ``reinforce.py``, ``grpo.py``) reads top to bottom on its own: its config, its
advantages and its update; this module holds only the pieces they would otherwise copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch

from mtrl.detectors.spans import SEVERITIES
from mtrl.policy import ReferencePolicy
from mtrl.rollout import Rollout, clock, collect_rollout
from mtrl.schema import Range
from mtrl.vllm_engine import VLLMEngine


@dataclass
class OnPolicyConfig:
    """Keys every on-policy algorithm reads (``algorithm:`` section); PPO adds its own."""

    lr: Annotated[float, Range(gt=0)] = 1e-5
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: Annotated[int, Range(ge=0)] = 0
    batch_size: Annotated[int, Range(ge=1)] = 32  # sources per step PER PROCESS (global: x the process count)
    samples_per_prompt: Annotated[int, Range(ge=1)] = 1  # rloo needs >= 2
    minibatch_size: Annotated[int, Range(ge=1)] = 16
    ent_coef: Annotated[float, Range(ge=0)] = 0.0
    gamma: Annotated[float, Range(ge=0, le=1)] = 1.0
    whiten_advantages: bool = True
    max_grad_norm: Annotated[float, Range(gt=0)] = 1.0
    kl_coef: Annotated[float, Range(ge=0)] = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: Annotated[float, Range(gt=0)] | None = None  # adaptive KL controller (Ziegler et al. 2019) when set
    kl_horizon: Annotated[int, Range(ge=1)] = 10000
    weight_decay: Annotated[float, Range(ge=0)] = 0.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, accelerator: Any = None
                  ) -> torch.Tensor:
    """(x - mean) / std over the valid entries; padding stays 0. With several processes (``accelerator``),
    the mean and std are those of the global batch."""
    if accelerator is not None and accelerator.num_processes > 1:
        m = mask.to(x.dtype)
        total = accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]), "sum")
        n = total[1].clamp(min=1)
        mean = total[0] / n
        var = accelerator.reduce(((x - mean) ** 2 * m).sum(), "sum") / n
        var = var * n / (n - 1) if n > 1 else var
    else:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: ``k1`` = log-ratio, ``k3`` = Schulman's."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: k1, k3")


class AdaptiveKLController:
    """Ziegler et al. (2019): move kl_coef so that the observed KL tracks ``target`` (fixed when None)."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon

    def update_global(self, sequence_kl: torch.Tensor, n_sources: int, accelerator: Any = None) -> None:
        """:meth:`update` from the whole step: the mean KL per sequence and the sources of every process, so
        that all processes keep one coefficient (each shapes its rewards with it)."""
        total = torch.tensor([float(sequence_kl.sum()), float(sequence_kl.numel()), float(n_sources)],
                             dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
        self.update(float(total[0] / total[1].clamp(min=1)), int(total[2]))


def make_optimizer(groups: list[dict[str, Any]], cfg: OnPolicyConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the parameter groups and the recipe's LR schedule."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler


class OnlineState:
    """What an online algorithm holds and does around its own update.

    :meth:`setup` builds the frozen reference, the optimiser over ``groups`` and its LR schedule, the model as
    accelerate prepared it, the KL coefficient and, with ``generation.engine: vllm``, the engine that samples;
    :meth:`rollout` starts a step, :meth:`end_step` ends it; ``state_dict`` is what a checkpoint keeps.
    """

    def setup(self, cfg: OnPolicyConfig, policy: Any, rewarder: Any, gen: Any, accelerator: Any,
              total_steps: int, groups: list[dict[str, Any]]) -> None:
        self.cfg, self.policy, self.rewarder, self.gen, self.accelerator = cfg, policy, rewarder, gen, accelerator
        self.reference = ReferencePolicy(policy)
        self.optimizer, self.scheduler = make_optimizer(groups, cfg, total_steps)
        # the scheduler is not prepared: accelerate would step it once per process
        self.model, self.optimizer = accelerator.prepare(policy, self.optimizer)
        # half/mixed precision: old log-probs from the update's own forward (see collect_rollout)
        self.recompute = self.model if half_precision(policy, accelerator) else None
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        # generation.engine vllm: an engine in this process samples the rollouts (mtrl.vllm_engine)
        self.engine = VLLMEngine(policy, gen.vllm, gen.max_new_tokens, torch.initial_seed() % 2**31) \
            if gen.engine == "vllm" else None

    def rollout(self, sources: Any, references: Any, with_values: bool, span_rewards: bool = False) -> Rollout:
        """Sample, reward and reference-score this step's sources (sharded parameters gathered once)."""
        with full_parameters(self.model, self.accelerator):
            return collect_rollout(self.policy, self.reference, self.rewarder, sources, references, self.gen,
                                   self.cfg.samples_per_prompt, with_values=with_values, recompute=self.recompute,
                                   engine=self.engine, span_rewards=span_rewards)

    def end_step(self, kl: torch.Tensor, n_sources: int) -> None:
        """After the update: the LR schedule, the engine's weights, the KL coefficient from the step's KL."""
        self.scheduler.step()
        if self.engine is not None:  # the engine samples the next step from the updated weights
            with full_parameters(self.model, self.accelerator):
                self.engine.load_weights(self.policy.model)
        self.kl_ctl.update_global(kl.sum(1), n_sources, self.accelerator)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.value = state["kl_coef"]


@contextmanager
def full_parameters(model: Any, accelerator: Any) -> Iterator[None]:
    """Sharded parameters (DeepSpeed ZeRO-3, FSDP) gathered once for a whole rollout, not once per token.

    ``model``: what ``accelerator.prepare`` returned. Without sharding (one process, DDP) this does nothing.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            remove_hooks(model)  # ZeRO-3's per-module hooks would re-gather at every forward
            try:
                yield
            finally:
                add_hooks(model)
    elif kind == DistributedType.FSDP:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):  # FSDP1
            with FSDP.summon_full_params(model, writeback=False):
                yield
        else:  # FSDP2 (fully_shard): unshard every sharded module and keep it so until the rollout ends
            mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
            # generate calls submodules (the encoder) before the root: the root's lazy set-up must come first
            # (private API: torch has no public one for this, as of 2.13)
            mods[0]._get_fsdp_state()._lazy_init()
            for m in mods:
                m.set_reshard_after_forward(False)
                m.unshard()
            try:
                yield
            finally:
                for m in mods:
                    m.reshard()
                    m.set_reshard_after_forward(True)
    else:
        yield


def half_precision(policy: Any, accelerator: Any) -> bool:
    """Whether the sampling pass and the update's pass may round differently (bf16/fp16 weights or autocast):
    the old log-probs are then recomputed by the update's own forward (see ``collect_rollout``)."""
    return accelerator.mixed_precision != "no" or next(policy.parameters()).dtype != torch.float32


def rollout_metrics(rollout: Any, rewards: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                    t0: float, update_s: float = 0.0) -> dict[str, float]:
    """The per-step numbers every on-policy algorithm logs (``metrics.jsonl``), with the step's time split:
    sampling, the rewarder (detector), teacher-forced forwards (reference, recompute) and the update."""
    seq_reward = rollout.rewards.sum(1)
    elapsed = clock() - t0
    return {
        "reward_mean": float(seq_reward.mean()),
        "reward_std": float(seq_reward.std()) if len(seq_reward) > 1 else 0.0,
        "total_reward_mean": float(rewards.sum(1).mean()),
        "sentence_score_mean": float(np.mean(rollout.scores)),
        **{f"spans_{s}": sum(sp.severity == s for d in rollout.detections for sp in d.spans) for s in SEVERITIES},
        "kl": float(kl.sum(1).mean()),
        "kl_coef": kl_coef,
        "tokens_per_s": rollout.stats["response_tokens"] / elapsed,
        "step_time_s": elapsed,
        "response_length_mean": rollout.stats["response_length_mean"],
        "time_generate_s": rollout.stats["generate_s"],
        "time_reward_s": rollout.stats["score_s"],
        "time_forward_s": rollout.stats["forward_s"],
        "time_update_s": update_s,
        **{k: v for k, v in rollout.stats.items() if k.startswith("engine_logprob_gap")},
        **rollout.guard_stats,
    }
