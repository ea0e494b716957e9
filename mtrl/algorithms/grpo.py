"""GRPO with optional span advantages, for seq2seq and causal policies (no value head).

GRPO (Shao et al. 2024) samples ``samples_per_prompt`` translations of each source and gives every token of a
sample the same advantage: its sequence reward minus the mean of its group (the samples of the same source),
divided by the group's std (``scale_rewards: false`` drops the division, as Dr. GRPO does, Liu et al. 2025:
the std makes groups that barely differ count as much as groups that differ a lot). The sequence reward is the
sum of the rewarder's token rewards, so ``reward.mode`` means what it means for PPO (``sentence``: the
detector's score).

``span_advantages`` (TranslateGemma, arXiv 2601.09012): each token's advantage also gets ``span_weight`` x its
span penalty (:attr:`mtrl.rewards.RewardOutput.span_rewards`: the detector's spans on the tokens they cover,
whatever ``reward.mode`` is), and the sum is normalised over the batch. A sample then learns which of its
tokens were wrong, not only that the sentence was worse than its siblings.

The KL to the frozen reference is a term of the loss (``kl_in: loss``, ``kl_coef`` x the ``kl_estimator``
estimate per token, k3 by default, as in the GRPO paper) or a per-token penalty folded into the sequence reward
before the group statistics (``kl_in: reward``). One step, top to bottom in :meth:`GRPO.step`: rollout ->
advantages -> one pass of minibatch updates (on-policy, so no ratio clipping). The loss averages over the
minibatch's tokens (Dr. GRPO's constant normaliser is not implemented), and span advantages are whitened over
the batch even with ``scale_rewards: false``. ``gamma`` is not used: every token gets its sequence's advantage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from mtrl.algorithms.common import (
    OnlineState,
    OnPolicyConfig,
    kl_penalty,
    masked_mean,
    masked_whiten,
    rollout_metrics,
)
from mtrl.policy import GenerationConfig, Policy
from mtrl.rewards import Rewarder
from mtrl.rollout import Rollout, clock
from mtrl.schema import Range


@dataclass
class GRPOConfig(OnPolicyConfig):
    name: Literal["grpo"] = "grpo"
    batch_size: Annotated[int, Range(ge=1)] = 8  # sources per step per process, each sampled samples_per_prompt times
    samples_per_prompt: Annotated[int, Range(ge=2)] = 4  # a group to compare
    scale_rewards: bool = True  # divide by the group's std; false: Dr. GRPO
    span_advantages: bool = False  # add the span penalties per token, then normalise over the batch
    span_weight: Annotated[float, Range(ge=0)] = 1.0
    kl_in: Literal["loss", "reward"] = "loss"
    kl_estimator: Literal["k1", "k3"] = "k3"
    whiten_advantages: bool = False  # the group statistics already normalise


def group_advantages(returns: torch.Tensor, group: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """Each sequence's return minus its group's mean, over the group's std when ``scale`` (one value per row)."""
    n_groups = int(group.max()) + 1
    count = torch.zeros(n_groups, dtype=returns.dtype).index_add_(0, group, torch.ones_like(returns))
    mean = torch.zeros(n_groups, dtype=returns.dtype).index_add_(0, group, returns) / count
    centred = returns - mean[group]
    if not scale:
        return centred
    var = torch.zeros(n_groups, dtype=returns.dtype).index_add_(0, group, centred ** 2) / (count - 1).clamp(min=1)
    return centred / (var.sqrt()[group] + eps)


def advantages(rewards: torch.Tensor, span_rewards: torch.Tensor | None, mask: torch.Tensor, group: torch.Tensor,
               cfg: GRPOConfig, accelerator: Any = None) -> torch.Tensor:
    """(B, T) advantages: the group-normalised sequence reward on every token, plus the span penalties
    normalised over the batch with it (``span_advantages``)."""
    mask = mask.to(rewards.dtype)
    seq = group_advantages((rewards * mask).sum(1).cpu(), group.cpu(), cfg.scale_rewards).to(rewards.device)
    adv = seq.unsqueeze(1) * mask
    if cfg.span_advantages and span_rewards is not None:
        adv = masked_whiten(adv + cfg.span_weight * span_rewards * mask, mask, accelerator=accelerator)
    elif cfg.whiten_advantages:
        adv = masked_whiten(adv, mask, shift_mean=False, accelerator=accelerator)
    return adv


class GRPO(OnlineState):
    """The policy, the frozen reference, the optimiser and the KL coefficient."""

    def __init__(self, cfg: GRPOConfig, policy: Policy, rewarder: Rewarder, gen: GenerationConfig,
                 accelerator: Any, total_steps: int):
        self.setup(cfg, policy, rewarder, gen, accelerator, total_steps,
                   [{"params": [p for p in policy.parameters() if p.requires_grad]}])

    def step(self, sources: Sequence[str], references: Sequence[str | None] | None) -> dict[str, float]:
        """One GRPO step on a batch of sources; returns the step's metrics."""
        t0 = clock()
        ro = self.rollout(sources, references, with_values=False, span_rewards=self.cfg.span_advantages)
        mask = ro.response_mask.float()
        kl = kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * mask  # the sampled KL, logged and adapted on
        rewards = ro.rewards
        if self.cfg.kl_in == "reward":  # the per-token penalty, with the recipe's estimator, in the reward
            rewards = rewards - self.kl_ctl.value * kl_penalty(ro.logprobs, ro.ref_logprobs, self.cfg.kl_estimator) * mask
        t_update = clock()
        stats = self.update(ro, rewards)
        t_update = clock() - t_update
        self.end_step(kl, len(sources))
        return {**rollout_metrics(ro, rewards, kl, self.kl_ctl.value, t0, t_update), **stats,
                "lr": self.scheduler.get_last_lr()[0]}

    def update(self, ro: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        """Advantages, then one pass over minibatches of -A log pi (+ the KL term with ``kl_in: loss``)."""
        cfg, mask = self.cfg, ro.response_mask.float()
        group = ro.group.to(mask.device)
        adv = advantages(rewards, ro.span_rewards, mask, group, cfg, self.accelerator)
        if ro.is_weights is not None:  # truncated importance sampling: engine samples, trainer updates
            adv = adv * ro.is_weights
        seq = (ro.rewards * mask).sum(1)  # the task reward alone: a group whose samples all scored the same
        flat = torch.stack([seq[group == g].std() == 0 for g in group.unique()])
        stats: dict[str, list[float]] = {"policy_loss": [], "kl_loss": [], "entropy": [], "grad_norm": []}
        for idx in torch.randperm(mask.shape[0]).split(cfg.minibatch_size):
            m = mask[idx]
            out = self.model(ro.queries[idx], ro.query_mask[idx], ro.responses[idx], ro.response_mask[idx],
                             self.gen.temperature, with_values=False)
            pg_loss = masked_mean(-adv[idx] * out.logprobs, m)
            # masked before the estimator: k3's exp of a padding position's log-ratio could overflow
            kl_loss = masked_mean(kl_penalty(out.logprobs * m, ro.ref_logprobs[idx], cfg.kl_estimator), m) \
                if cfg.kl_in == "loss" else torch.zeros((), device=m.device)
            entropy = masked_mean(out.entropy, m)
            loss = pg_loss + self.kl_ctl.value * kl_loss - cfg.ent_coef * entropy
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            for k, v in (("policy_loss", pg_loss), ("kl_loss", kl_loss), ("entropy", entropy),
                         ("grad_norm", grad_norm)):
                stats[k].append(float(v.detach()) if torch.is_tensor(v) else float(v))
        out_stats = {k: sum(v) / len(v) for k, v in stats.items()}
        out_stats["advantage_mean"] = float(masked_mean(adv, mask))
        out_stats["advantage_std"] = float(masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt())
        out_stats["groups_without_signal"] = float(flat.float().mean())  # every sample of the source scored the same
        return out_stats
