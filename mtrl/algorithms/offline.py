"""What the offline algorithms (qsft, twa, bon, dpo) share: their config keys, labelled rows, target features,
padding, aligned logits and the one training loop (:func:`train_offline`).

A *feature* is one translation, tokenised for teacher forcing:

* seq2seq: ``input_ids`` (the source), ``decoder_input_ids`` (decoder start + the target shifted right) and
  ``labels`` (the target);
* causal: ``input_ids`` (prompt + target) and ``labels`` (-100 on the prompt, then the target); the usual
  causal shift happens in :func:`shifted_logits`.

``labels`` is -100 wherever no loss is taken: prompt tokens, padding, and a forced target-language token
(NLLB-type models), which is not a choice of the policy. The target's tokens are always the last
``len(token_ids)`` positions of ``labels``, so an algorithm adds its own per-token columns (Q-SFT's rewards,
TWA's positives) after ``len(labels) - len(token_ids)`` prompt positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from mtrl.errors import MtrlError
from mtrl.schema import Range


@dataclass
class OfflineTrainConfig:
    """Keys of every offline algorithm's training loop (``algorithm:`` section); each algorithm adds its own."""

    name: str = ""
    lr: Annotated[float, Range(gt=0)] = 1e-5
    epochs: Annotated[float, Range(gt=0)] = 1.0
    max_steps: Annotated[int, Range(ge=1, also=(-1,))] = -1  # > 0 overrides epochs; -1: epochs
    batch_size: Annotated[int, Range(ge=1)] = 8  # rows (DPO: pairs) per micro-batch
    grad_accum: Annotated[int, Range(ge=1)] = 1
    max_grad_norm: Annotated[float, Range(gt=0)] = 1.0
    logging_steps: Annotated[int, Range(ge=1)] = 10


def row_value(row: dict, by: str) -> float:
    """A labelled row's value: its return (``"return"``: the sum of its token rewards, which follow
    ``reward.mode``) or its sentence score (``"score"``)."""
    if by == "score":
        if row.get("score") is None:
            raise MtrlError("ranking rows by 'score' needs a 'score' in every labelled row")
        return float(row["score"])
    return float(sum(row["token_rewards"]))


def group_by_source(rows: Sequence[dict]) -> list[list[dict]]:
    """The rows of each source, sources in order of first appearance, rows in their own order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["src"], []).append(row)
    return list(groups.values())


def target_features(row: dict, policy: Any) -> dict[str, list[int]]:
    """The feature of a row's ``src`` and ``token_ids`` (see the module docstring)."""
    ids = [int(t) for t in row["token_ids"]]
    labels = list(ids)
    if ids and policy.forced_bos_token_id is not None and ids[0] == policy.forced_bos_token_id:
        labels[0] = -100  # the forced language token is not a choice of the policy
    query = policy.encode_sources([row["src"]])[0][0].tolist()
    if policy.kind == "seq2seq":
        start = policy.model.config.decoder_start_token_id
        return {"input_ids": query, "decoder_input_ids": [start] + ids[:-1], "labels": labels}
    return {"input_ids": query + ids, "labels": [-100] * len(query) + labels}


def pad_batch(feats: Sequence[dict], pad_token_id: int, extra_columns: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Right-pads the features into tensors: ids with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with
    -100, and each of ``extra_columns`` (per-position float columns) with 0.0."""
    def pad(seqs: list[list], value: float, dtype: torch.dtype) -> torch.Tensor:
        n = max(len(x) for x in seqs)
        return torch.tensor([list(x) + [value] * (n - len(x)) for x in seqs], dtype=dtype)

    def col(key: str) -> list[list]:
        return [f[key] for f in feats]

    batch = {"input_ids": pad(col("input_ids"), pad_token_id, torch.long),
             "attention_mask": pad([[1] * len(x) for x in col("input_ids")], 0, torch.long),
             "labels": pad(col("labels"), -100, torch.long)}
    for key in extra_columns:
        batch[key] = pad(col(key), 0.0, torch.float)
    if "decoder_input_ids" in feats[0]:
        batch["decoder_input_ids"] = pad(col("decoder_input_ids"), pad_token_id, torch.long)
    return batch


def shifted_logits(model: Any, batch: dict[str, torch.Tensor], kind: str, columns: Sequence[str] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(logits, targets, mask, [column, ...]) aligned so that logits[:, t] is the distribution of targets[:, t].

    ``mask`` marks the targets that count (label != -100); ``targets`` has -100 replaced by 0. Causal models
    predict position t+1 at t, so their logits lose the last position and the labels and each named column
    of ``batch`` (its last dimension is the position) lose the first.
    """
    if kind == "seq2seq":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
        labels, extra = batch["labels"], [batch[c] for c in columns]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1]
        labels, extra = batch["labels"][:, 1:], [batch[c][..., 1:] for c in columns]
    return logits, labels.clamp(min=0), labels != -100, extra


def num_steps(n_items: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int) -> tuple[int, int]:
    """(optimizer steps, steps per epoch): ``max_steps`` when > 0, else ``epochs`` passes over ``n_items``."""
    per_epoch = max(1, -(-n_items // batch_size) // grad_accum)
    return (max_steps if max_steps > 0 else max(1, round(epochs * per_epoch))), per_epoch


def shuffled_batches(n_items: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless lists of ``batch_size`` indices into ``n_items``, each pass reshuffled by a generator seeded with
    ``seed`` (the global RNG is not touched); a batch may span the end of one pass and the start of the next."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += torch.randperm(n_items, generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def train_offline(model: Any, items: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]],
                  loss_fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
                  cfg: OfflineTrainConfig, seed: int, log_metrics: Callable[[dict], None], *,
                  lr: float | None = None, max_steps: int | None = None,
                  after_step: Callable[[], None] | None = None, dropout: bool = True) -> None:
    """Train ``model`` in place: the loop every offline algorithm runs.

    ``max_steps`` (default ``cfg.max_steps``; -1: ``cfg.epochs`` passes over ``items``) optimizer steps of
    ``cfg.batch_size`` x ``cfg.grad_accum`` items, reshuffled every pass; ``collate`` turns a list of items
    into a batch of tensors and ``loss_fn`` a batch into (loss, numbers to log). AdamW at the constant rate
    ``lr`` (default ``cfg.lr``), no weight decay, gradients clipped to ``cfg.max_grad_norm``; ``after_step``
    runs after each optimizer step (Q-SFT's Polyak update). Every ``cfg.logging_steps`` steps and at the last,
    ``log_metrics`` gets ``step``, ``epoch``, ``lr``, the mean ``loss`` and numbers since the last row, and
    the mean ``grad_norm`` (before clipping). ``dropout=False`` keeps the model in eval mode (DPO: log π and
    log π_ref of the same rows agree before the first step).
    """
    lr = cfg.lr if lr is None else lr
    total, per_epoch = num_steps(len(items), cfg.batch_size, cfg.grad_accum, cfg.epochs,
                                 cfg.max_steps if max_steps is None else max_steps)
    device = next(model.parameters()).device
    batches = shuffled_batches(len(items), cfg.batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train(dropout)
    window: list[dict[str, float]] = []  # the micro-batches' numbers since the last log row
    grad_norms: list[float] = []
    for step in range(1, total + 1):
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in collate([items[i] for i in next(batches)]).items()}
            loss, stats = loss_fn(batch)
            (loss / cfg.grad_accum).backward()
            window.append({"loss": float(loss.detach()), **stats})
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        if step % cfg.logging_steps == 0 or step == total:
            log_metrics({"step": step, "epoch": step / per_epoch, "lr": lr,
                         **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                         "grad_norm": sum(grad_norms) / len(grad_norms)})
            window, grad_norms = [], []
    model.eval()


def token_nll(model: Any, batch: dict[str, torch.Tensor], kind: str) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean cross-entropy on a batch's labels: plain SFT's loss."""
    logits, targets, mask, _ = shifted_logits(model, batch, kind)
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    mask = mask.float()
    return (-logp * mask).sum() / mask.sum().clamp(min=1.0), {}
