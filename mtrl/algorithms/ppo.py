"""Token-level PPO for translation models (Schulman et al. 2017; RLHF form of Ziegler et al. 2019).

One step, top to bottom in :meth:`PPO.step`: sample a batch of translations and reward every
token (rollout) -> subtract the KL penalty to the frozen reference (shaping) -> GAE advantages
and value targets -> ``epochs`` passes of clipped-surrogate updates over shuffled minibatches.
Per token t of a sampled translation::

    r_t = reward_t - kl_coef * KL_t                 (reward_t from the rewarder: spans, chrF, ...)
    KL_t = log pi(y_t) - log pi_ref(y_t)            ("k1", unbiased, can be negative)
        or (ratio - 1) - log ratio, ratio = pi_ref/pi   ("k3", Schulman's low-variance estimator, >= 0)
    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),    V = 0 after the last token
    A_t = sum_k (gamma * lam)^k delta_{t+k}         (GAE; gamma = 1 by default, as in Ramos et al.)
    R_t = A_t + V(s_t)                              (value targets)

Advantages are whitened over the valid tokens of the batch. Padding is masked everywhere: a mask
is 1 for response tokens up to and including EOS (seq2seq decoder targets, or the completion of a
causal LM; prompts never enter these tensors). The critic is a linear value head on the final
hidden state, with its own learning rate (``value_lr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from mtrl.algorithms.common import (
    AdaptiveKLController,
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

__all__ = ["PPO", "PPOConfig", "AdaptiveKLController", "gae", "kl_penalty", "masked_whiten", "policy_loss",
           "value_loss"]


@dataclass
class PPOConfig(OnPolicyConfig):
    name: Literal["ppo"] = "ppo"
    value_lr: Annotated[float, Range(gt=0)] | None = 1e-3  # the value head's own lr (a fresh linear head); null: lr
    epochs: Annotated[int, Range(ge=1)] = 2  # passes over each batch of rollouts
    clip_range: Annotated[float, Range(gt=0)] = 0.2
    value_clip_range: Annotated[float, Range(gt=0)] = 0.2
    vf_coef: Annotated[float, Range(ge=0)] = 0.5
    lam: Annotated[float, Range(ge=0, le=1)] = 0.95


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, (B, T); the state after the last token is terminal."""
    mask = mask.to(rewards.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss and the fraction of tokens where the clip was active."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within clip_range of the rollout's value."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class PPO(OnlineState):
    """The policy, its value head, the frozen reference, the optimiser and the KL controller."""

    def __init__(self, cfg: PPOConfig, policy: Policy, rewarder: Rewarder, gen: GenerationConfig,
                 accelerator: Any, total_steps: int):
        head = policy.add_value_head()
        body = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head.")]
        self.setup(cfg, policy, rewarder, gen, accelerator, total_steps,
                   [{"params": body}, {"params": list(head.parameters()), "lr": cfg.value_lr or cfg.lr}])

    def step(self, sources: Sequence[str], references: Sequence[str | None] | None) -> dict[str, float]:
        """One PPO step on a batch of sources; returns the step's metrics."""
        t0 = clock()
        # 1. rollout: sample, reward every token, old log-probs and values, reference log-probs
        ro = self.rollout(sources, references, with_values=True)
        # 2. KL shaping: what PPO optimises is the reward minus the KL penalty to the reference
        mask = ro.response_mask.float()
        kl = kl_penalty(ro.logprobs, ro.ref_logprobs, self.cfg.kl_estimator) * mask
        rewards = ro.rewards - self.kl_ctl.value * kl
        # 3. + 4. advantages and the update epochs
        t_update = clock()
        stats = self.update(ro, rewards)
        t_update = clock() - t_update
        self.end_step(kl, len(sources))
        return {**rollout_metrics(ro, rewards, kl, self.kl_ctl.value, t0, t_update), **stats,
                "lr": self.scheduler.get_last_lr()[0]}

    def update(self, ro: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        """GAE on the shaped rewards, then ``epochs`` passes of minibatch updates."""
        cfg, mask = self.cfg, ro.response_mask.float()
        advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, accelerator=self.accelerator)
        if ro.is_weights is not None:  # truncated importance sampling: engine samples, trainer updates
            advantages = advantages * ro.is_weights
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "entropy": [], "clipfrac": [],
                                         "approx_kl": [], "grad_norm": []}
        for _ in range(cfg.epochs):
            for idx in torch.randperm(mask.shape[0]).split(cfg.minibatch_size):
                m = mask[idx]
                out = self.model(ro.queries[idx], ro.query_mask[idx], ro.responses[idx], ro.response_mask[idx],
                                 self.gen.temperature)
                pg_loss, clipfrac = policy_loss(out.logprobs, ro.logprobs[idx], advantages[idx], m, cfg.clip_range)
                vf_loss = value_loss(out.values, ro.values[idx], returns[idx], m, cfg.value_clip_range)
                entropy = masked_mean(out.entropy, m)
                loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    approx_kl = masked_mean(0.5 * (out.logprobs - ro.logprobs[idx]) ** 2, m)
                for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("entropy", entropy),
                             ("clipfrac", clipfrac), ("approx_kl", approx_kl), ("grad_norm", grad_norm)):
                    stats[k].append(float(v.detach()) if torch.is_tensor(v) else float(v))
        out_stats = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out_stats["advantage_mean"] = float(masked_mean(advantages, mask))
        out_stats["value_mean"] = float(masked_mean(ro.values, mask))
        out_stats["return_mean"] = float(masked_mean(returns, mask))
        return out_stats
