"""REINFORCE with a baseline, and RLOO: the value-free policy gradients (no value head is built).

One step, top to bottom in :meth:`Reinforce.step`: rollout -> KL shaping -> returns-to-go and a
baseline -> one pass of minibatch updates (on-policy, so no ratio clipping is needed).

Both use token-level returns-to-go G_t = sum_{k>=t} gamma^(k-t) r_k (rewards include the KL
penalty), so with token-level rewards a token is credited only with the errors at and after it;
with sentence rewards G_t is the sentence reward for every token.

* ``reinforce``: A_t = G_t - b_t with b_t the mean of G_t over the batch's sequences that have a
  token at position t (a per-position batch baseline).
* ``rloo`` (Ahmadian et al. 2024): k samples per source; b_t is the mean of G_t over the *other*
  samples of the same source that reach position t (leave-one-out), 0 when there are none.

The loss is -A_t log pi(y_t) averaged over valid tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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


@dataclass
class ReinforceConfig(OnPolicyConfig):
    name: Literal["reinforce", "rloo"] = "reinforce"


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def batch_baseline(returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position mean of the returns over sequences with a token there."""
    return masked_mean(returns, mask, dim=0).unsqueeze(0).expand_as(returns)


def leave_one_out_baseline(returns: torch.Tensor, mask: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per-position mean of the returns of the other samples of the same prompt."""
    mask = mask.to(returns.dtype)
    same = (group.unsqueeze(0) == group.unsqueeze(1)).to(returns.dtype)  # (B, B)
    others = same - torch.eye(len(group), dtype=returns.dtype)
    total = others @ (returns * mask)  # sum over other samples, per position
    count = others @ mask
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def advantages(rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, cfg: ReinforceConfig,
               accelerator: Any = None) -> torch.Tensor:
    mask = mask.to(rewards.dtype)
    g = returns_to_go(rewards, mask, cfg.gamma)
    base = leave_one_out_baseline(g, mask, group) if cfg.name == "rloo" else batch_baseline(g, mask)
    adv = (g - base) * mask
    return masked_whiten(adv, mask, shift_mean=False, accelerator=accelerator) if cfg.whiten_advantages else adv


class Reinforce(OnlineState):
    """The policy, the frozen reference, the optimiser and the KL controller (``reinforce`` or ``rloo``)."""

    def __init__(self, cfg: ReinforceConfig, policy: Policy, rewarder: Rewarder, gen: GenerationConfig,
                 accelerator: Any, total_steps: int):
        self.setup(cfg, policy, rewarder, gen, accelerator, total_steps,
                   [{"params": [p for p in policy.parameters() if p.requires_grad]}])

    def step(self, sources: Sequence[str], references: Sequence[str | None] | None) -> dict[str, float]:
        """One policy-gradient step on a batch of sources; returns the step's metrics."""
        t0 = clock()
        # 1. rollout (no values: there is no critic)
        ro = self.rollout(sources, references, with_values=False)
        # 2. KL shaping
        mask = ro.response_mask.float()
        kl = kl_penalty(ro.logprobs, ro.ref_logprobs, self.cfg.kl_estimator) * mask
        rewards = ro.rewards - self.kl_ctl.value * kl
        # 3. + 4. returns, baseline and the update
        t_update = clock()
        stats = self.update(ro, rewards)
        t_update = clock() - t_update
        self.end_step(kl, len(sources))
        return {**rollout_metrics(ro, rewards, kl, self.kl_ctl.value, t0, t_update), **stats,
                "lr": self.scheduler.get_last_lr()[0]}

    def update(self, ro: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        """Advantages (returns-to-go minus the baseline), then one pass over minibatches."""
        cfg, mask = self.cfg, ro.response_mask.float()
        adv = advantages(rewards, mask, ro.group.to(mask.device), cfg, self.accelerator)
        if ro.is_weights is not None:  # truncated importance sampling: engine samples, trainer updates
            adv = adv * ro.is_weights
        stats: dict[str, list[float]] = {"policy_loss": [], "entropy": [], "grad_norm": []}
        for idx in torch.randperm(mask.shape[0]).split(cfg.minibatch_size):
            m = mask[idx]
            out = self.model(ro.queries[idx], ro.query_mask[idx], ro.responses[idx], ro.response_mask[idx],
                             self.gen.temperature, with_values=False)
            pg_loss = masked_mean(-adv[idx] * out.logprobs, m)
            entropy = masked_mean(out.entropy, m)
            loss = pg_loss - cfg.ent_coef * entropy
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            for k, v in (("policy_loss", pg_loss), ("entropy", entropy), ("grad_norm", grad_norm)):
                stats[k].append(float(v.detach()) if torch.is_tensor(v) else float(v))
        out_stats = {k: sum(v) / len(v) for k, v in stats.items()}
        out_stats["advantage_mean"] = float(masked_mean(adv, mask))
        return out_stats
