"""Basic evaluation: batched greedy translation and sacrebleu corpus metrics (BLEU, chrF, TER).

Metrics use sacrebleu's metric objects with default settings, so scores and signatures are the
same as the ``sacrebleu`` command line gives for the same detokenized text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from sacrebleu.metrics import BLEU, CHRF, TER

from mtrl.errors import MtrlError


def translate(
    model: Any,
    tokenizer: Any,
    sources: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 64,
    num_beams: int = 1,
) -> list[str]:
    """Translate ``sources`` with a seq2seq model; greedy unless ``num_beams > 1``.

    Sentences are batched by length (less padding, so faster) and returned in input order.
    The model's train/eval mode is restored afterwards, so this is safe to call mid-training.
    """
    if not sources:
        return []
    enc = tokenizer(list(sources), truncation=True)
    ids = enc["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    out: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                input_ids, attention_mask = _pad([ids[i] for i in idx], tokenizer.pad_token_id)
                generated = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    do_sample=False,
                    use_cache=True,
                )
                texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
                for i, text in zip(idx, texts):
                    out[i] = text.strip()
    finally:
        model.train(was_training)
    return out


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists (seq2seq encoders take right padding)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, : len(s)] = 1
    return input_ids, attention_mask


def corpus_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Corpus BLEU, chrF and TER (sacrebleu defaults, one reference), each with its signature."""
    if len(hypotheses) != len(references):
        raise MtrlError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise MtrlError("no hypotheses to score")
    hyps, refs = list(hypotheses), [list(references)]
    results = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        score = metric.corpus_score(hyps, refs)
        results[name] = {"score": float(score.score), "signature": str(metric.get_signature())}
    return results


def format_table(results: Mapping[str, Mapping[str, Any]], signatures: bool = True) -> str:
    """Plain-text table, one row per system (e.g. before / after) and one column per metric.

    Cells are ``{"score": ..., "signature": ...}`` dicts (as from :func:`corpus_metrics`) or plain
    numbers. With ``signatures``, each metric's sacrebleu signature is listed under the table.
    """
    metrics: list[str] = []
    for row in results.values():
        metrics += [m for m in row if m not in metrics]
    header = ["system"] + metrics
    rows = [header]
    sigs: dict[str, str] = {}
    for system, row in results.items():
        cells = [str(system)]
        for m in metrics:
            value = row.get(m)
            if isinstance(value, Mapping):
                if value.get("signature"):
                    sigs.setdefault(m, str(value["signature"]))
                value = value.get("score")
            cells.append("-" if value is None else f"{float(value):.2f}")
        rows.append(cells)
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if signatures:
        lines += [f"{m}: {s}" for m, s in sigs.items()]
    return "\n".join(lines)
