"""REINFORCE with a baseline, and RLOO: the value-free variants of the same loop.

Both use token-level returns-to-go G_t = sum_{k>=t} gamma^(k-t) r_k (rewards
include the KL penalty), so with token-level rewards a token is credited only
with the errors at and after it; with sentence rewards G_t is the sentence
reward for every token.

* ``reinforce``: A_t = G_t - b_t with b_t the mean of G_t over the batch's
  sequences that have a token at position t (a per-position batch baseline).
* ``rloo`` (Ahmadian et al. 2024): k samples per source; b_t is the mean of
  G_t over the *other* samples of the same source that reach position t
  (leave-one-out), 0 when there are none.

The loss is -A_t log pi(y_t) averaged over valid tokens, one pass over
minibatches (on-policy, so no ratio clipping is needed).
"""

from __future__ import annotations

from typing import Any

import torch

from mtrl.algorithms.ppo import masked_mean, masked_whiten
from mtrl.recipe import AlgorithmConfig


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


def advantages(rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, cfg: AlgorithmConfig) -> torch.Tensor:
    mask = mask.to(rewards.dtype)
    g = returns_to_go(rewards, mask, cfg.gamma)
    base = leave_one_out_baseline(g, mask, group) if cfg.name == "rloo" else batch_baseline(g, mask)
    adv = (g - base) * mask
    return masked_whiten(adv, mask, shift_mean=False) if cfg.whiten_advantages else adv


def update(policy: Any, optimizer: Any, accelerator: Any, rollout: Any, rewards: torch.Tensor,
           cfg: AlgorithmConfig, temperature: float) -> dict[str, float]:
    mask = rollout.response_mask.float()
    adv = advantages(rewards, mask, rollout.group.to(mask.device), cfg)
    stats: dict[str, list[float]] = {"policy_loss": [], "entropy": [], "grad_norm": []}
    for idx in torch.randperm(mask.shape[0]).split(cfg.minibatch_size):
        m = mask[idx]
        out = policy(rollout.queries[idx], rollout.query_mask[idx], rollout.responses[idx],
                     rollout.response_mask[idx], temperature, with_values=False)
        pg_loss = masked_mean(-adv[idx] * out.logprobs, m)
        entropy = masked_mean(out.entropy, m)
        loss = pg_loss - cfg.ent_coef * entropy
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        for k, v in (("policy_loss", pg_loss), ("entropy", entropy), ("grad_norm", grad_norm)):
            stats[k].append(float(v.detach()) if torch.is_tensor(v) else float(v))
    out_stats = {k: sum(v) / len(v) for k, v in stats.items()}
    out_stats["advantage_mean"] = float(masked_mean(adv, mask))
    return out_stats
