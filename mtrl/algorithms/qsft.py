"""Q-SFT (Hong, Dragan, Levine 2024, arXiv 2411.05193): offline Q-learning as weighted SFT.

The model's own next-token probabilities hold the Q-values, so no value head is
added. Three models, all from the same initial checkpoint:

* ``π_β`` (behaviour): the initial model fine-tuned with plain SFT on the dataset's
  (source, hypothesis) pairs (``sft_steps``; 0 keeps the initial model, which is
  right when the hypotheses were sampled from it), then frozen;
* ``p_θ`` (Q-model): trained with the loss below;
* ``p_θ̄`` (target): a frozen Polyak copy of ``p_θ``, θ̄ ← (1-τ)θ̄ + τθ after every
  optimizer step.

Per hypothesis token t (state s_t = source + y_<t, action a_t = y_t; the last
token of each row, normally EOS, is terminal)::

    w_t = clamp(r_t + γ · max_{a' ∈ S(s_{t+1})} p_θ̄(a'|s_{t+1}) / π_β(a'|s_{t+1}), 0, 1)   (t not last)
    w_t = clamp(r_t, 0, 1)                                                              (t last)
    L   = -mean_t [ w_t log p_θ(a_t|s_t) + Σ_{a'≠a_t} (1-w_t)/(|V|-1) log p_θ(a'|s_t) ]

and decoding uses π(a|s) ∝ π_β(a|s) · p_θ(a|s)^β (log π_β + β log p_θ).

With w = 1 the loss is plain cross-entropy, so the π_β SFT stage reuses it.
At its optimum p_θ(a|s) ≈ w(s,a) π_β(a|s) + (mass spread from other actions)/(|V|-1),
hence the implicit Q-estimate p_θ/π_β in the bootstrap.

Sources and choices (the paper's body text was not retrievable here; only its
abstract, a third-party review and a third-party blog derivation were):

* the paper's loss puts the (1-w) mass on one *dummy* action a_d; we follow the
  brief and the unofficial reimplementation described in shared/notes/papers.md and
  spread it uniformly over the |V|-1 other tokens (no token is reserved);
* a consequence worth knowing: p_θ̄ and π_β both sum to 1 over the same
  vocabulary, so max over the *whole* vocabulary of p_θ̄/π_β is always ≥ 1: every
  non-final target is ≥ min(1, r_t + γ), i.e. (γ = 1, r ≤ 0) just 1 + r_t, and
  nothing learnt about later tokens propagates back.
  ``support_topk`` (default 5) therefore takes the max only over the k actions
  most likely under π_β (a behaviour-support constraint, our choice);
  ``support_topk=None`` gives the literal whole-vocabulary equation;
* reward rescaling into [0, 1] (the targets are probabilities): a row's return G
  (the sum of its token rewards; at ``reward_level="sentence"`` its score, put on
  the last token) maps affinely from ``return_range=(lo, hi)`` onto [0, 1]:
  r'_t = r_t / (hi - lo), plus -lo / (hi - lo) on the last token (exact for
  γ = 1), clipped by the clamp. ``None`` takes the dataset's lowest and highest
  return. For the detector's span penalties (r ≤ 0, ``no_error=0``) the offline
  quickstart uses (-25, 0): an MQM-style score, 1 for no errors and 0 at 25
  penalty points, so error-free tokens earn 0 and length is not rewarded;
* temperature: rows sampled at T (``offline.temperature``) come from
  softmax(logits / T), so π_β, p_θ and p_θ̄ are all read at T (the loss and the
  extraction divide the logits by T): π_β is then the sampling distribution and
  p_θ starts equal to it (ratio 1);
* reward level: ``reward.mode: sentence`` trains on the sentence score put on the
  last token; ``token``, on the token rewards;
* ``target="monte_carlo"`` replaces the bootstrap by the row's own discounted
  return-to-go, clamped (Q of π_β rather than Q*: no target copy, one forward
  pass per step). Not in the paper; a baseline that isolates the bootstrap;
* the loss is averaged over valid target tokens of the batch (padding and
  prompt tokens never count; a forced target-language token of NLLB-type models
  is not a choice and is not trained either);
* training is the offline loop (:func:`mtrl.algorithms.offline.train_offline`):
  AdamW at a constant rate, gradients clipped to ``max_grad_norm``, a Polyak
  update after every optimizer step;
* p_θ is the policy's own model, trained in place; π_β is a copy of it made
  before training, and ``final/`` keeps it in ``final/behaviour/``;
* the extraction is a ``LogitsProcessor`` on ``π_β.generate`` that re-runs p_θ on
  the whole prefix each step (no KV cache for p_θ: simple, works with beams, costs
  O(T²) for p_θ).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from mtrl.algorithms.offline import (
    OfflineTrainConfig,
    pad_batch,
    row_value,
    shifted_logits,
    target_features,
    train_offline,
)
from mtrl.algorithms.protocols import FitResult, OfflineData, RunLog
from mtrl.errors import MtrlError
from mtrl.policy import GenerationConfig, Policy
from mtrl.rewards import Rewarder
from mtrl.schema import Range


@dataclass
class QSFTConfig(OfflineTrainConfig):
    name: Literal["qsft"] = "qsft"
    gamma: Annotated[float, Range(ge=0, le=1)] = 1.0  # discount across tokens
    # Polyak rate of the target copy (0.005 in the reimplementation; larger for short runs)
    tau: Annotated[float, Range(ge=0, le=1)] = 0.05
    beta: Annotated[float, Range(ge=0)] = 1.0  # extraction: log π_β + β log p_θ
    sft_steps: Annotated[int, Range(ge=0)] = 0  # SFT steps of π_β on the data (0: π_β is the initial model)
    sft_lr: Annotated[float, Range(gt=0)] | None = None  # defaults to lr
    support_topk: Annotated[int, Range(ge=1)] | None = 5  # max of the ratio over π_β's top-k actions; None: all
    # the returns (sum of a row's token rewards; its score with reward.mode sentence) that map to 0 and 1; None:
    # the dataset's lowest and highest return
    return_range: tuple[float, float] | None = None
    target: Literal["bellman", "monte_carlo"] = "bellman"


# ---------------------------------------------------------------------------- the maths
def qsft_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy: w on the taken token, (1-w)/(V-1) on each other token; mean over valid tokens.

    logits (B, T, V) give the distribution of targets (B, T); weights and mask (B, T).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    vocab = logp.shape[-1]
    taken = torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)
    others = logp.sum(-1) - taken
    w = weights.detach().float()
    per_token = -(w * taken + (1.0 - w) / (vocab - 1) * others)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def bellman_targets(rewards: torch.Tensor, target_logits: torch.Tensor, behaviour_logits: torch.Tensor,
                    mask: torch.Tensor, gamma: float, support_topk: int | None = None) -> torch.Tensor:
    """w_t = clamp(r_t + γ max_a' p_target(a'|s_{t+1}) / π_β(a'|s_{t+1}), 0, 1); w_t = clamp(r_t) at the last token.

    Position t of the logits is the distribution of the token at t (state s_t), so the
    next state's distribution is position t+1. Valid tokens of a row are contiguous;
    the last one (mask[t+1] == 0) is terminal. ``support_topk`` restricts the max to
    the k most likely actions under π_β.
    """
    log_ratio = F.log_softmax(target_logits.float(), -1) - F.log_softmax(behaviour_logits.float(), -1)
    if support_topk is not None:
        top = behaviour_logits.topk(min(support_topk, behaviour_logits.shape[-1]), dim=-1).indices
        log_ratio = torch.gather(log_ratio, 2, top)
    next_value = log_ratio.max(-1).values.clamp(max=30.0).exp()  # (B, T); the clamp only avoids inf
    mask = mask.float()
    bootstrap = torch.zeros_like(next_value)
    bootstrap[:, :-1] = next_value[:, 1:] * mask[:, 1:]  # 0 after the last valid token: terminal
    return (rewards.float() + gamma * bootstrap).clamp(0.0, 1.0) * mask


@torch.no_grad()
def monte_carlo_targets(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """w_t = clamp(Σ_{k>=t} γ^(k-t) r_k, 0, 1): the row's own return-to-go (Q of π_β, no bootstrap)."""
    r = rewards.float() * mask.float()
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out.clamp(0.0, 1.0) * mask.float()


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """θ̄ ← (1-τ) θ̄ + τ θ, parameter by parameter (buffers copied)."""
    for pt, po in zip(target.parameters(), online.parameters(), strict=True):
        pt.lerp_(po.detach().to(pt.dtype), tau)
    for bt, bo in zip(target.buffers(), online.buffers(), strict=True):
        bt.copy_(bo)


def combine_logprobs(behaviour_logits: torch.Tensor, q_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Policy extraction: log π_β + β log p_θ (unnormalised; softmax gives π ∝ π_β p_θ^β)."""
    return F.log_softmax(behaviour_logits.float(), -1) + beta * F.log_softmax(q_logits.float(), -1)


def resolve_return_range(rows: Sequence[dict], cfg: QSFTConfig, level: str) -> tuple[float, float]:
    """``cfg.return_range``, or the lowest and highest return in the rows (their scores at sentence ``level``)."""
    if cfg.return_range is not None:
        return float(cfg.return_range[0]), float(cfg.return_range[1])
    returns = [row_value(r, "score" if level == "sentence" else "return") for r in rows]
    lo, hi = min(returns), max(returns)
    return lo, (hi if hi > lo else lo + 1.0)


def rescale_rewards(token_rewards: Sequence[float], score: float | None, level: str,
                    return_range: tuple[float, float]) -> list[float]:
    """Rewards on the [0, 1] return scale that the probability targets need (see the module docstring).

    Token level: r'_t = r_t / (hi - lo), plus -lo / (hi - lo) on the last token, so the undiscounted return
    maps affinely from [lo, hi] onto [0, 1]; sentence level: the rescaled score on the last token.
    """
    lo, hi = return_range
    n = len(token_rewards)
    if level == "sentence":
        if score is None:
            raise MtrlError("qsft: reward_level 'sentence' needs a 'score' in every row")
        out = [0.0] * n
        out[-1] = min(1.0, max(0.0, (float(score) - lo) / (hi - lo)))
        return out
    out = [float(r) / (hi - lo) for r in token_rewards]
    out[-1] += -lo / (hi - lo)
    return out


# ---------------------------------------------------------------------------- data
def build_features(rows: Sequence[dict], policy: Any, cfg: QSFTConfig, level: str = "token") -> list[dict]:
    """Pre-tokenised rows: :func:`mtrl.algorithms.offline.target_features` (``input_ids``, seq2seq
    ``decoder_input_ids``, ``labels`` with -100 on prompt tokens and a forced language token) plus ``rewards``,
    rescaled, at the target tokens' positions (0 on a causal row's prompt; the causal shift happens in
    :func:`token_logits`).
    """
    feats = []
    return_range = resolve_return_range(rows, cfg, level)
    for i, row in enumerate(rows):
        ids = [int(t) for t in row["token_ids"]]
        if not ids or len(ids) != len(row["token_rewards"]):
            raise MtrlError(f"qsft row {i}: token_ids and token_rewards must be non-empty and of equal length")
        rewards = rescale_rewards(row["token_rewards"], row.get("score"), level, return_range)
        feat = target_features(row, policy)
        n_prompt = len(feat["labels"]) - len(ids)
        feats.append({**feat, "rewards": [0.0] * n_prompt + rewards})
    return feats


def token_logits(model: Any, batch: dict[str, torch.Tensor], kind: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, mask, rewards), aligned so that logits[:, t] is the distribution of targets[:, t]."""
    logits, targets, mask, (rewards,) = shifted_logits(model, batch, kind, ["rewards"])
    return logits, targets, mask, rewards


# ---------------------------------------------------------------------------- training
def batch_loss(model: Any, batch: dict[str, torch.Tensor], kind: str, cfg: QSFTConfig, temperature: float = 1.0,
               target_model: Any = None, behaviour_model: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The Q-SFT loss of a batch and the mean target weight; without a behaviour model, plain SFT (w = 1).

    Every model is read at ``temperature`` (the rows' sampling temperature).
    """
    logits, targets, mask, rewards = token_logits(model, batch, kind)
    logits = logits / temperature
    if behaviour_model is None:
        return qsft_loss(logits, targets, mask.float(), mask), {}
    if cfg.target == "monte_carlo":
        weights = monte_carlo_targets(rewards, mask, cfg.gamma)
    else:
        with torch.no_grad():
            target_logits = token_logits(target_model, batch, kind)[0] / temperature
            behaviour_logits = token_logits(behaviour_model, batch, kind)[0] / temperature
        weights = bellman_targets(rewards, target_logits, behaviour_logits, mask, cfg.gamma, cfg.support_topk)
    mean = float(weights.sum() / mask.sum().clamp(min=1))
    return qsft_loss(logits, targets, weights, mask), {"qsft_target_mean": mean}


def train_qsft(policy: Policy, rows: list[dict], cfg: QSFTConfig, level: str, temperature: float, seed: int,
               log_metrics: Callable[[dict], None]) -> Any:
    """SFT π_β (a copy of the policy's model) on the rows, then Q-SFT of the policy's own model (p_θ), in place;
    returns π_β, frozen.

    Each row: ``src``, ``mt``, ``token_ids`` (target ids, EOS included), ``token_rewards``
    (same length, before rescaling), optional ``score`` (``level`` "sentence").
    """
    model, kind = policy.model, policy.kind
    features = build_features(rows, policy, cfg, level)
    collate = lambda feats: pad_batch(feats, policy.tokenizer.pad_token_id, ["rewards"])  # noqa: E731

    behaviour = copy.deepcopy(model)
    if cfg.sft_steps > 0:  # its log rows are not kept: metrics.jsonl holds the Q-SFT stage's
        train_offline(behaviour, features, collate, lambda b: batch_loss(behaviour, b, kind, cfg, temperature), cfg,
                      seed, lambda row: None, lr=cfg.sft_lr or cfg.lr, max_steps=cfg.sft_steps)
    behaviour.eval().requires_grad_(False)

    target = None  # Monte Carlo targets need no copy
    if cfg.target == "bellman":
        target = copy.deepcopy(model).eval().requires_grad_(False)
    train_offline(model, features, collate,
                  lambda b: batch_loss(model, b, kind, cfg, temperature, target, behaviour), cfg, seed, log_metrics,
                  after_step=(lambda: polyak_update(target, model, cfg.tau)) if target is not None else None)
    return behaviour


# ---------------------------------------------------------------------------- decoding
class QSFTLogitsProcessor(LogitsProcessor):
    """Turns π_β.generate's scores into log π_β + β log p_θ by running p_θ on the current prefix."""

    def __init__(self, q_model: Any, beta: float, kind: str, queries: torch.Tensor, query_mask: torch.Tensor,
                 temperature: float = 1.0):
        self.q_model, self.beta, self.kind, self.temperature = q_model, beta, kind, temperature
        self.queries, self.query_mask = queries, query_mask
        self.encoder_out = None
        if kind == "seq2seq":
            with torch.no_grad():
                self.encoder_out = q_model.get_encoder()(input_ids=queries, attention_mask=query_mask)

    @torch.no_grad()
    def q_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        rep = input_ids.shape[0] // self.queries.shape[0]  # beams / samples per source
        mask = self.query_mask.repeat_interleave(rep, 0)
        if self.kind == "seq2seq":
            enc = BaseModelOutput(last_hidden_state=self.encoder_out.last_hidden_state.repeat_interleave(rep, 0))
            return self.q_model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=input_ids,
                                use_cache=False).logits[:, -1]
        new = input_ids.shape[1] - mask.shape[1]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], new)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return self.q_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            use_cache=False).logits[:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        q = self.q_logits(input_ids)[:, : scores.shape[-1]]
        return combine_logprobs(scores / self.temperature, q / self.temperature, self.beta).to(scores.dtype)


@torch.no_grad()
def qsft_translate(policy: Policy, behaviour_model: Any, sources: Sequence[str], beta: float = 1.0,
                   max_new_tokens: int = 128, num_beams: int = 1, temperature: float = 1.0,
                   **generate_kwargs: Any) -> list[str]:
    """Decode with π ∝ π_β p_θ^β: π_β generates, the processor adds β log p_θ (``policy.model``) at every step."""
    q_model, tokenizer, kind = policy.model, policy.tokenizer, policy.kind
    q_model.eval()
    behaviour_model.eval()
    queries, qmask = policy.encode_sources(list(sources))
    proc = QSFTLogitsProcessor(q_model, beta, kind, queries, qmask, temperature)
    kwargs: dict[str, Any] = dict(**policy.length_kwargs(queries, max_new_tokens), num_beams=num_beams,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=policy.eos_token_id)
    if policy.forced_bos_token_id is not None:
        kwargs["forced_bos_token_id"] = policy.forced_bos_token_id
    kwargs.update(generate_kwargs)
    out = behaviour_model.generate(input_ids=queries, attention_mask=qmask,
                                   logits_processor=LogitsProcessorList([proc]), **kwargs)
    responses = out[:, 1:] if kind == "seq2seq" else out[:, queries.shape[1]:]
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


# ---------------------------------------------------------------------------- the algorithm
class QSFT:
    """Offline: fit π_β and p_θ on the labelled rows, and translate with both (:meth:`translate`)."""

    def __init__(self, cfg: QSFTConfig, policy: Policy, rewarder: Rewarder, gen: GenerationConfig, accelerator: Any,
                 total_steps: int):
        self.cfg, self.policy, self.gen = cfg, policy, gen
        self.level = "sentence" if rewarder.config.mode == "sentence" else "token"
        self.behaviour: Any = None
        self.temperature = 1.0

    def fit(self, data: OfflineData, log: RunLog) -> FitResult:
        rows = data.rows()
        log.message(f"mtrl: Q-SFT on {len(rows)} labelled rows ...")
        self.temperature = data.temperature
        self.behaviour = train_qsft(self.policy, rows, self.cfg, self.level, data.temperature, data.seed, log.metrics)
        return FitResult(translate=self.translate, models={"behaviour": self.behaviour})

    def translate(self, sources: Sequence[str]) -> list[str]:
        """Greedy (or beam) decoding with log π_β + β log p_θ, length-sorted batches, input order."""
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        hyps = [""] * len(sources)
        gen = self.gen
        for i in range(0, len(order), gen.eval_batch_size):
            idx = order[i:i + gen.eval_batch_size]
            out = qsft_translate(self.policy, self.behaviour, [sources[j] for j in idx], beta=self.cfg.beta,
                                 max_new_tokens=gen.max_new_tokens, num_beams=gen.eval_num_beams,
                                 temperature=self.temperature)
            for j, t in zip(idx, out):
                hyps[j] = t.strip()
        return hyps
