"""TWA, Training With Annotations (Zhang et al. 2024, arXiv 2410.16509, ICML 2025): offline finetuning on
translations whose error spans are marked.

Per translation y of a source x with annotated error spans s_1..s_K (severity weights w_k)::

    L(x, y) = Σ_{t ∈ P}  -log p(y_t | x, y_<t)                          likelihood on positive tokens
            + Σ_k |w_k| · -log(1 - p(s_k)),   p(s_k) = Π_{t ∈ s_k} p(y_t | x, y_<t)
                                                                         span-level unlikelihood

P, the positive tokens, are the non-error tokens *before the first error* (``after_error="ignore"``): a
token after an error continues an erroneous prefix, off the trajectory a good translation would follow,
so it is neither rewarded nor penalised. Because the unlikelihood acts on the product over a span, the
model may lower the span's probability through any of its tokens (it "learns what to penalise inside a
span") instead of pushing every token of it down. A row without errors is plain cross-entropy (SFT).

What the paper says (sources: the abstract, arxiv.org/abs/2410.16509; the method as summarised by
themoonlight.io's review of the paper and emergentmind.com/papers/2410.16509; the full body text was not
retrievable here):

* error spans get the weighted span-level unlikelihood -|w|·log(1 - p_span), w given by the span's
  severity (negative weight for error tokens, non-negative for the others);
* non-error tokens *preceding* an error get ordinary cross-entropy; non-error tokens *following* an error
  are "off-trajectory" and ignored; ignoring them is reported to improve quality (it is what the abstract
  calls considering "the overall trajectory of a sequence when deciding which non-error spans to utilize
  as positive signals");
* training data: MQM annotations of other systems' translations (WMT'20-21 MQM, en-de and zh-en); TWA
  beats SFT on quality-filtered data and DPO on pairs from the same data.

Our choices (not taken from the paper):

* ``after_error="ignore"`` ignores every non-error token after the first token of the earliest error span,
  EOS included; every error span still gets its unlikelihood term, wherever it lies. ``"train"`` keeps all
  non-error tokens as positives (an ablation);
* severity weights |w|: ``severity_weights`` ({minor, major, critical}) when given; by default the
  magnitude of the recipe's ``reward.severity_map`` value of the span (xcomet: 1/5/10; wmt-mqm: 1/5/25,
  minor punctuation 0.1, non-translation 25), so one key sets the weights for every algorithm. We do not read
  the rows' ``token_rewards`` for this: they can also hold omission penalties and sentence scores, and
  they lose which tokens form one span, which p(span) needs;
* normalisation: the batch's summed terms divided by the number of tokens that carry one (positive tokens
  plus error-span tokens), so an error-free batch gives the usual token-mean cross-entropy;
* numerics: log p(span) is clamped to ≤ log(1 - 1e-6) (so the term stays finite when p(span) → 1) and
  -log(1 - p) is computed as -log(-expm1(log p)) / -log1p(-p), stable at both ends;
* span membership: each token's character interval in the translation (:func:`mtrl.rewards.hypothesis_intervals`,
  the alignment the rewarder uses) and the rewarder's overlap rule (:func:`mtrl.rewards.token.spans_to_token_rewards`:
  a token is in a span when it overlaps it on a non-whitespace character; a span no token covers goes to
  the nearest token), applied span by span, so spans, rewards and TWA agree on which tokens are in error;
* a forced target-language token (NLLB) and prompt tokens are never trained; omissions (errors marked in
  the source, or the reference detector's omission penalty) have no span in the translation and give no term;
* optimisation: the offline loop (:func:`mtrl.algorithms.offline.train_offline`), AdamW at a constant rate,
  gradients clipped to ``max_grad_norm``, ``policy.model`` trained in place (the runner then saves ``final/``
  and evaluates its greedy decoding).

Data (``offline:`` section, :func:`mtrl.algorithms.offline_data.offline_rows`): the policy's own samples labelled by the
recipe's detector, or ``offline.data``: `mtrl label` output, human MQM annotations (Google's MQM TSV, or the
JSONL of shared/data/mqm, the gold format), or xCOMET-labelled JSONL from elsewhere; the annotated
translations themselves are the training targets, tokenised with the policy's tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from mtrl.algorithms.offline import (
    OfflineTrainConfig,
    pad_batch,
    shifted_logits,
    target_features,
    train_offline,
)
from mtrl.algorithms.protocols import FitResult, OfflineData, RunLog
from mtrl.detectors.spans import SEVERITIES, ErrorSpan, SeverityMap, SpanError
from mtrl.errors import MtrlError
from mtrl.policy import GenerationConfig, Policy
from mtrl.rewards import Rewarder
from mtrl.schema import Range

MAX_LOG_SPAN_PROB = math.log1p(-1e-6)  # p(span) <= 1 - 1e-6: -log(1 - p) stays finite


@dataclass
class SeverityWeights:
    """|w| per severity (``algorithm.severity_weights``): all three, each finite and >= 0."""

    minor: Annotated[float, Range(ge=0)]
    major: Annotated[float, Range(ge=0)]
    critical: Annotated[float, Range(ge=0)]


@dataclass
class TWAConfig(OfflineTrainConfig):
    name: Literal["twa"] = "twa"
    # non-error tokens after the first error: "ignore" (the paper: off-trajectory) or "train" (all positives)
    after_error: Literal["ignore", "train"] = "ignore"
    # |w| per severity, e.g. {minor: 1, major: 5, critical: 10}; null: |reward.severity_map value| of each span
    severity_weights: SeverityWeights | None = None


# ---------------------------------------------------------------------------- the maths
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def twa_loss(logits: torch.Tensor, targets: torch.Tensor, positive: torch.Tensor, span_members: torch.Tensor,
             span_weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The TWA loss of a batch and its parts.

    logits (B, T, V) give the distribution of targets (B, T); ``positive`` (B, T) marks the tokens trained by
    likelihood; ``span_members`` (N, B, T) marks each of the batch's N error spans' tokens, ``span_weights``
    (N,) their |w|. Loss = (Σ_pos -log p + Σ_spans |w| · -log(1 - Π p)) / (#positive + #span tokens).
    """
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    positive = positive.float()
    members = span_members.float()
    ce_sum = -(logp * positive).sum()
    span_logp = (members * logp.unsqueeze(0)).sum((1, 2)).clamp(max=MAX_LOG_SPAN_PROB)  # (N,) log p(span)
    ul = -log1mexp(span_logp)  # -log(1 - p(span))
    ul_sum = (span_weights.float() * ul).sum()
    n_pos, n_span_tokens = positive.sum(), members.sum()
    loss = (ce_sum + ul_sum) / (n_pos + n_span_tokens).clamp(min=1.0)
    n_spans = span_members.shape[0]
    stats = {"ce": float(ce_sum.detach() / n_pos.clamp(min=1.0)), "positive_tokens": float(n_pos),
             "error_spans": float(n_spans), "span_tokens": float(n_span_tokens),
             "unlikelihood": float(ul.detach().mean()) if n_spans else 0.0,
             "span_prob": float(span_logp.detach().exp().mean()) if n_spans else 0.0}
    return loss, stats


def positive_tokens(n: int, spans: Sequence[Sequence[int]], trainable: Sequence[bool], after_error: str) -> list[bool]:
    """Which of ``n`` target tokens get likelihood: trainable, in no error span and, with ``after_error``
    "ignore", before the first token of the earliest error span."""
    in_span = set(t for s in spans for t in s)
    first = min(in_span) if (in_span and after_error == "ignore") else n
    return [bool(trainable[t]) and t not in in_span and t < first for t in range(n)]


# ---------------------------------------------------------------------------- data
_UNIT = SeverityMap({s: -1.0 for s in SEVERITIES})


def span_token_indices(text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[dict]) -> list[list[int]]:
    """Per span, the indices of the tokens in it: the rewarder's overlap rule applied to that span alone."""
    from mtrl.rewards.token import spans_to_token_rewards

    out = []
    for sp in spans:
        marks = spans_to_token_rewards(text, offsets, [sp], _UNIT, "max")
        out.append([t for t, v in enumerate(marks) if v != 0.0])
    return out


def severity_weight_fn(cfg: TWAConfig, severity_map: SeverityMap) -> Callable[[dict], float]:
    """|w| of a span dict: ``cfg.severity_weights`` by severity, else |its value under the reward's severity map|."""
    if cfg.severity_weights is not None:
        return lambda sp: float(getattr(cfg.severity_weights, ErrorSpan.from_dict(sp).severity))
    return lambda sp: abs(float(severity_map.value(ErrorSpan.from_dict(sp))))


def build_features(rows: Sequence[dict], policy: Any, cfg: TWAConfig, weight: Callable[[dict], float]) -> list[dict]:
    """Pre-tokenised rows: :func:`mtrl.algorithms.offline.target_features` (``input_ids``, seq2seq
    ``decoder_input_ids``, ``labels`` with -100 where no loss is taken) plus ``positive`` (0/1 per position) and
    ``spans`` [(positions, |w|)], positions in the feature's own layout (causal rows are prompt + translation;
    the shift happens in :func:`aligned`)."""
    from mtrl.rewards import hypothesis_intervals

    for i, row in enumerate(rows, 1):
        if not row.get("token_ids"):
            raise MtrlError(f"twa row {i}: no token_ids")
        if not isinstance(row.get("spans"), list):
            raise MtrlError(f"twa row {i}: no 'spans' (label the data with `mtrl label`, or give error spans)")
    texts, offsets = hypothesis_intervals(policy.tokenizer, [r["token_ids"] for r in rows], [r["mt"] for r in rows])
    feats = []
    for i, (row, text, offs) in enumerate(zip(rows, texts, offsets), 1):
        ids = [int(t) for t in row["token_ids"]]
        try:
            spans = span_token_indices(text, offs, row["spans"])
            weights = [weight(sp) for sp in row["spans"]]
        except SpanError as e:
            raise MtrlError(f"twa row {i}: {e}") from None
        feat = target_features(row, policy)
        n = len(feat["labels"]) - len(ids)  # prompt positions before the target (causal rows)
        trainable = [t != -100 for t in feat["labels"][n:]]  # not the forced language token
        positive = positive_tokens(len(ids), spans, trainable, cfg.after_error)
        feats.append({**feat, "positive": [0.0] * n + [float(p) for p in positive],
                      "spans": [([n + t for t in s], w) for s, w in zip(spans, weights) if s]})
    return feats


def collate(feats: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads every column; ``span_members`` (N, B, T) and ``span_weights`` (N,) hold the batch's spans."""
    batch = pad_batch(feats, pad_token_id, ["positive"])
    spans = [(b, positions, w) for b, f in enumerate(feats) for positions, w in f["spans"]]
    members = torch.zeros(len(spans), *batch["labels"].shape)
    for k, (b, positions, _) in enumerate(spans):
        members[k, b, positions] = 1.0
    batch["span_members"] = members
    batch["span_weights"] = torch.tensor([w for _, _, w in spans], dtype=torch.float)
    return batch


def aligned(model: Any, batch: dict[str, torch.Tensor], kind: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, positive, span_members) with logits[:, t] the distribution of targets[:, t]."""
    logits, targets, valid, (positive, members) = shifted_logits(model, batch, kind, ["positive", "span_members"])
    valid = valid.float()
    return logits, targets, positive * valid, members * valid.unsqueeze(0)


def batch_loss(model: Any, batch: dict[str, torch.Tensor], kind: str) -> tuple[torch.Tensor, dict[str, float]]:
    """The TWA loss of a collated batch and its parts (:func:`twa_loss`)."""
    logits, targets, positive, members = aligned(model, batch, kind)
    return twa_loss(logits, targets, positive, members, batch["span_weights"])


# ---------------------------------------------------------------------------- training
def train_twa(policy: Policy, features: list[dict], cfg: TWAConfig, log_metrics: Callable[[dict], None],
              seed: int = 0) -> None:
    """TWA on ``policy.model`` in place, in the offline loop; each log row adds the loss's parts (:func:`twa_loss`)."""
    train_offline(policy.model, features, lambda f: collate(f, policy.tokenizer.pad_token_id),
                  lambda batch: batch_loss(policy.model, batch, policy.kind), cfg, seed, log_metrics)


# ---------------------------------------------------------------------------- the algorithm
class TWA:
    """Offline: annotated translations (``offline.data``, or the policy's samples labelled by the detector),
    then TWA on ``policy.model`` in place."""

    def __init__(self, cfg: TWAConfig, policy: Policy, rewarder: Rewarder, gen: GenerationConfig, accelerator: Any,
                 total_steps: int):
        self.cfg, self.policy, self.severity_map = cfg, policy, rewarder.config.severity()

    def fit(self, data: OfflineData, log: RunLog) -> FitResult:
        p = self.policy
        features = build_features(data.rows(), p, self.cfg, severity_weight_fn(self.cfg, self.severity_map))
        n_spans = sum(len(f["spans"]) for f in features)
        n_clean = sum(not f["spans"] for f in features)
        log.message(f"mtrl: TWA on {len(features)} rows ({n_spans} error spans, {n_clean} rows without errors) ...")
        train_twa(p, features, self.cfg, log.metrics, data.seed)
        return FitResult()
