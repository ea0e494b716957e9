"""Token-level PPO for translation models (Schulman et al. 2017; RLHF form of Ziegler et al. 2019).

Per token t of a sampled translation:

    r_t = task_reward_t - kl_coef * KL_t          (task reward from the severity map, etc.)
    KL_t = log pi(y_t) - log pi_ref(y_t)            ("k1", unbiased, can be negative)
        or (ratio - 1) - log ratio, ratio = pi_ref/pi   ("k3", Schulman's low-variance estimator, >= 0)
    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),    V = 0 after the last token
    A_t = sum_k (gamma * lam)^k delta_{t+k}         (GAE; gamma = 1 by default, as in Ramos et al.)
    R_t = A_t + V(s_t)                              (value targets)

The update runs ``epochs`` passes over shuffled minibatches with the clipped
surrogate, a clipped value loss and an entropy bonus; advantages are whitened
over the valid tokens of the batch. Padding is masked everywhere: a mask is 1
for response tokens up to and including EOS (seq2seq decoder targets, or the
completion of a causal LM; prompts never enter these tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from mtrl.recipe import AlgorithmConfig


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


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the valid entries; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed: k1, k3")


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


class AdaptiveKLController:
    """Ziegler et al. (2019): move kl_coef so that the observed KL tracks ``target``."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon


def update(policy: Any, optimizer: Any, accelerator: Any, rollout: Any, rewards: torch.Tensor,
           cfg: AlgorithmConfig, temperature: float) -> dict[str, float]:
    """One PPO update on a batch of rollouts (``rewards`` already include the KL penalty)."""
    mask = rollout.response_mask.float()
    advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "entropy": [], "clipfrac": [],
                                     "approx_kl": [], "grad_norm": []}
    n = mask.shape[0]
    for _ in range(cfg.epochs):
        for idx in torch.randperm(n).split(cfg.minibatch_size):
            m = mask[idx]
            out = policy(rollout.queries[idx], rollout.query_mask[idx], rollout.responses[idx],
                         rollout.response_mask[idx], temperature)
            pg_loss, clipfrac = policy_loss(out.logprobs, rollout.logprobs[idx], advantages[idx], m,
                                            cfg.clip_range)
            vf_loss = value_loss(out.values, rollout.values[idx], returns[idx], m, cfg.value_clip_range)
            entropy = masked_mean(out.entropy, m)
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                approx_kl = masked_mean(0.5 * (out.logprobs - rollout.logprobs[idx]) ** 2, m)
            for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("entropy", entropy),
                         ("clipfrac", clipfrac), ("approx_kl", approx_kl), ("grad_norm", grad_norm)):
                stats[k].append(float(v.detach()) if torch.is_tensor(v) else float(v))
    out_stats = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out_stats["advantage_mean"] = float(masked_mean(advantages, mask))
    out_stats["value_mean"] = float(masked_mean(rollout.values, mask))
    out_stats["return_mean"] = float(masked_mean(returns, mask))
    return out_stats
