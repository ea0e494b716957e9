"""What the offline algorithms (qsft, twa, bon, dpo) share: labelled rows, target features, padding, aligned
logits, the shuffled batch order and a plain SFT loop.

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

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mtrl.errors import MtrlError


def labelled_rows(ctx: Any, policy: Any, rewarder: Any, gen: Any, **kwargs: Any) -> list[dict]:
    """The run's offline rows (:func:`mtrl.label.offline_rows`): the policy's samples labelled by the rewarder,
    or ``offline.data``; ``ctx`` is the runner's :class:`mtrl.algorithms.common.RunContext`, ``kwargs`` go to
    ``offline_rows`` (e.g. ``encode_target``)."""
    from mtrl.label import offline_rows

    return offline_rows(ctx.offline, ctx.model_path, ctx.train_pairs, rewarder, ctx.run_dir / "offline",
                        policy_config=policy.cfg, src_lang=policy.src_lang, tgt_lang=policy.tgt_lang,
                        max_new_tokens=gen.max_new_tokens, seed=ctx.seed, log=ctx.log, progress=ctx.progress,
                        **kwargs)


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


def sft(model: Any, features: list[dict], cfg: Any, kind: str, pad_token_id: int, seed: int = 0
        ) -> list[dict[str, float]]:
    """Plain SFT of ``model`` in place, an explicit loop: token-mean cross-entropy on the labels.

    ``cfg`` gives ``lr``, ``epochs``, ``max_steps``, ``batch_size``, ``grad_accum`` and ``logging_steps``:
    ``max_steps`` optimizer steps (-1: ``epochs`` passes) of ``batch_size`` x ``grad_accum`` features; AdamW at
    a constant rate, no weight decay, gradients clipped to norm 1. Returns the log rows (``step``, ``loss``,
    ``lr``) every ``logging_steps`` steps and at the last.
    """
    total, _ = num_steps(len(features), cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps)
    device = next(model.parameters()).device
    batches = shuffled_batches(len(features), cfg.batch_size, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    model.train()
    history, losses = [], []
    for step in range(1, total + 1):
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in pad_batch([features[i] for i in next(batches)], pad_token_id).items()}
            logits, targets, mask, _ = shifted_logits(model, batch, kind)
            logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
            mask = mask.float()
            loss = (-logp * mask).sum() / mask.sum().clamp(min=1.0)
            (loss / cfg.grad_accum).backward()
            losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.logging_steps == 0 or step == total:
            history.append({"step": step, "loss": sum(losses) / len(losses), "lr": cfg.lr})
            losses = []
    model.eval()
    return history
