"""DPO (Rafailov et al. 2023, arXiv 2305.18290) on pairs from the offline labels: best vs worst of n per source.

The recipe's ``offline:`` section samples n translations per source and labels them (or reads a labelled
file); each source with two different values gives one pair, its best row chosen (y_w) and its worst
rejected (y_l), ranked as in :mod:`mtrl.algorithms.bon` (``rank_by``: the return, i.e. the sum of the token
rewards, which follows ``reward.mode``; or the sentence score). Sources whose rows all tie give no pair.
The loss, with π_ref a frozen copy of the initial policy and sequence log-probs summed over the target
tokens::

    m = β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))]
    L = -(1 - ε) log σ(m) - ε log σ(-m)  +  sft_weight · NLL(y_w)

ε is ``label_smoothing`` (conservative DPO; 0 is plain DPO); the optional NLL term on the chosen rows is
RPO's (Pang et al. 2024, arXiv 2404.19733), the mean negative log-likelihood per chosen token.

* causal policies: TRL's ``DPOTrainer`` (decoder-only), fed the sampled token ids themselves (a decoded
  hypothesis re-tokenised can differ from the ids that were rewarded);
* seq2seq policies: the loss above, written here (:func:`dpo_loss`), in the offline loop
  (:func:`mtrl.algorithms.offline.train_offline`: AdamW at a constant rate, gradients clipped to
  ``max_grad_norm``) with dropout off (TRL's ``disable_dropout``), the forced language token of NLLB-type
  models not counted (it is not a choice of the policy).

Logged every ``logging_steps``: ``loss``, ``dpo_margin`` (mean m), ``dpo_accuracy`` (share of pairs with
m > 0), ``dpo_chosen_reward`` and ``dpo_rejected_reward`` (the two β log-ratios; TRL's ``rewards/*``).
The policy is trained in place; the runner saves ``final/`` and evaluates it with its usual decoding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from mtrl.algorithms.offline import (
    OfflineTrainConfig,
    group_by_source,
    pad_batch,
    row_value,
    shifted_logits,
    target_features,
    train_offline,
)
from mtrl.algorithms.protocols import FitResult, OfflineData, RunLog
from mtrl.errors import MtrlError
from mtrl.policy import GenerationConfig, Policy, trainer_checkpointing
from mtrl.schema import Range


@dataclass
class DPOConfig(OfflineTrainConfig):
    name: Literal["dpo"] = "dpo"
    beta: Annotated[float, Range(gt=0)] = 0.1  # strength of the implicit KL to the reference
    lr: Annotated[float, Range(gt=0)] = 1e-6  # the DPO paper's and TRL's default
    sft_weight: Annotated[float, Range(ge=0)] = 0.0  # RPO: + sft_weight x NLL of the chosen rows
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0  # conservative DPO: assumed share of flipped pairs
    rank_by: Literal["return", "score"] = "return"  # what makes a row the best or the worst of its source


# ---------------------------------------------------------------------------- pairs
def preference_pairs(rows: Sequence[dict], rank_by: str = "return") -> list[tuple[dict, dict]]:
    """(chosen, rejected) per source: its best and its worst row (first of tied ones); no pair when all tie."""
    pairs = []
    for group in group_by_source(rows):
        values = [row_value(r, rank_by) for r in group]
        best = max(range(len(group)), key=values.__getitem__)
        worst = min(range(len(group)), key=values.__getitem__)
        if values[best] > values[worst]:
            pairs.append((group[best], group[worst]))
    return pairs


# ---------------------------------------------------------------------------- the maths
def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the two implicit rewards β log π/π_ref (detached), from sequence log-probs (B,)."""
    chosen_logratio = chosen_logps - ref_chosen_logps
    rejected_logratio = rejected_logps - ref_rejected_logps
    margin = beta * (chosen_logratio - rejected_logratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def sequence_logprobs(model: Any, batch: dict[str, torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's target tokens (B,) and their count (B,); padding, prompt and forced
    language tokens (label -100) excluded."""
    logits, targets, mask, _ = shifted_logits(model, batch, kind)
    logp = torch.gather(F.log_softmax(logits.float(), -1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def pair_loss(model: Any, ref_model: Any, batch: dict[str, torch.Tensor], kind: str, cfg: DPOConfig
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a batch holding the chosen rows, then the rejected rows; and its metrics."""
    logps, counts = sequence_logprobs(model, batch, kind)
    with torch.no_grad():
        ref_logps, _ = sequence_logprobs(ref_model, batch, kind)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    losses, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta,
                                                      cfg.label_smoothing)
    loss = losses.mean()
    if cfg.sft_weight > 0:  # RPO: mean NLL per chosen token
        loss = loss + cfg.sft_weight * (-chosen.sum() / counts.chunk(2)[0].sum().clamp(min=1))
    margin = chosen_reward - rejected_reward
    return loss, {"loss": float(loss.detach()), "dpo_margin": float(margin.mean()),
                  "dpo_accuracy": float((margin > 0).float().mean()),
                  "dpo_chosen_reward": float(chosen_reward.mean()), "dpo_rejected_reward": float(rejected_reward.mean())}


# ---------------------------------------------------------------------------- seq2seq: our loop
def fit_seq2seq(policy: Policy, pairs: Sequence[tuple[dict, dict]], cfg: DPOConfig, seed: int,
                log_metrics: Callable[[dict], None]) -> None:
    """DPO on a seq2seq policy, in place, in the offline loop: batches of ``batch_size`` pairs, each the
    chosen rows then the rejected rows, against a frozen copy of the initial policy."""
    model, kind = policy.model, policy.kind
    chosen = [target_features(c, policy) for c, _ in pairs]
    rejected = [target_features(r, policy) for _, r in pairs]
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # π_ref: the initial policy, frozen
    pad = policy.tokenizer.pad_token_id
    train_offline(model, list(range(len(pairs))),
                  lambda idx: pad_batch([chosen[i] for i in idx] + [rejected[i] for i in idx], pad),
                  lambda batch: pair_loss(model, ref_model, batch, kind, cfg), cfg, seed, log_metrics, dropout=False)


# ---------------------------------------------------------------------------- causal: TRL's DPOTrainer
def fit_causal(policy: Policy, pairs: Sequence[tuple[dict, dict]], cfg: DPOConfig, seed: int,
               log_metrics: Callable[[dict], None], use_cpu: bool, progress: bool = True) -> None:
    """DPO on a causal policy, in place, with TRL's ``DPOTrainer`` on the sampled token ids."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        """TRL tokenises text columns itself; ours are already the ids that were sampled and rewarded."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    class LogMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "rewards/margins" in logs:
                log_metrics({"step": state.global_step, "loss": logs.get("loss"),
                             "dpo_margin": logs["rewards/margins"], "dpo_accuracy": logs["rewards/accuracies"],
                             "dpo_chosen_reward": logs["rewards/chosen"],
                             "dpo_rejected_reward": logs["rewards/rejected"], "lr": logs.get("learning_rate")})

    prompts = [policy.encode_sources([c["src"]])[0][0].tolist() for c, _ in pairs]
    ds = Dataset.from_dict({"prompt_ids": prompts,
                            "chosen_ids": [[int(t) for t in c["token_ids"]] for c, _ in pairs],
                            "rejected_ids": [[int(t) for t in r["token_ids"]] for _, r in pairs]})
    sft = cfg.sft_weight > 0
    output_dir = tempfile.TemporaryDirectory(prefix="mtrl-dpo-")  # TRL wants one; save_strategy "no" keeps it empty
    args = TRLConfig(output_dir=output_dir.name, per_device_train_batch_size=cfg.batch_size,
                     gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="constant",
                     num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, beta=cfg.beta,
                     label_smoothing=cfg.label_smoothing, loss_type=["sigmoid", "sft"] if sft else ["sigmoid"],
                     loss_weights=[1.0, cfg.sft_weight] if sft else None, max_length=None,
                     max_grad_norm=cfg.max_grad_norm,
                     weight_decay=0.0, logging_steps=cfg.logging_steps, save_strategy="no", report_to=[],
                     bf16=False, use_cpu=use_cpu, **trainer_checkpointing(policy.cfg.gradient_checkpointing),
                     seed=seed, disable_tqdm=not progress)
    ref_model = copy.deepcopy(policy.model).eval().requires_grad_(False)  # π_ref: the initial policy, frozen
    trainer = TokenizedDPOTrainer(model=policy.model, ref_model=ref_model, args=args, train_dataset=ds,
                                  processing_class=policy.tokenizer, callbacks=[LogMetrics()])
    with output_dir:
        trainer.train()


# ---------------------------------------------------------------------------- the algorithm
class DPO:
    """Offline: label n samples per source (or read ``offline.data``), pair best vs worst, DPO against π_ref."""

    def __init__(self, cfg: DPOConfig, policy: Policy, rewarder: Any, gen: GenerationConfig, accelerator: Any,
                 total_steps: int):
        self.cfg, self.policy = cfg, policy
        self.cpu = accelerator.device.type == "cpu" or not torch.cuda.is_available()

    def fit(self, data: OfflineData, log: RunLog) -> FitResult:
        cfg, p = self.cfg, self.policy
        # 1. n labelled samples per source
        rows = data.rows()

        # 2. best vs worst of each source
        pairs = preference_pairs(rows, cfg.rank_by)
        n_sources = len(group_by_source(rows))
        if not pairs:
            raise MtrlError(f"dpo: none of the {n_sources} sources has two rows of different {cfg.rank_by}; "
                            "sample more per source (offline.samples_per_source >= 2)")
        gaps = [row_value(c, cfg.rank_by) - row_value(r, cfg.rank_by) for c, r in pairs]
        log.message(f"mtrl: DPO on {len(pairs)} pairs from {n_sources} sources ({len(rows)} labelled rows) ...")
        log.metrics({"step": 0, "dpo_pairs": len(pairs), "dpo_sources": n_sources,
                     "dpo_value_gap_mean": sum(gaps) / len(gaps)})

        # 3. DPO against a frozen copy of the initial policy, the policy trained in place
        if p.kind == "seq2seq":
            fit_seq2seq(p, pairs, cfg, data.seed, log.metrics)
        else:
            fit_causal(p, pairs, cfg, data.seed, log.metrics, self.cpu, log.progress)
        p.model.eval()
        return FitResult()
