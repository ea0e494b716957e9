"""mtrl's own COMET models: xCOMET, COMET-Kiwi and COMET-DA checkpoints on the current transformers.

:func:`load_comet` reads Unbabel's published checkpoints (hub id, model folder or ``.ckpt``)
weights-only; :func:`place` puts a model on its device and dtype once; :func:`predict` scores rows
(dicts with ``src``, ``mt`` and optionally ``ref``) in length-sorted batches bounded in rows and
padded subwords. The models reproduce unbabel-comet 2.2.7's outputs (``tests/test_comet_parity.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mtrl.comet.checkpoint import load_comet, resolve_checkpoint
from mtrl.comet.device import check_device, check_dtype, resolve_device, resolve_dtype
from mtrl.comet.models import CometModel, CometOutput, Encodings, RegressionMetric, Row, UnifiedMetric

DEFAULT_MAX_TOKENS = 8192  # padded subwords per forward pass: XCOMET-XXL needs a few GB of activations for it


@dataclass
class ScoredRow:
    """One row's ``score``, its other scores (``src_score``, ``mqm_score``, ...) and, from word-level
    models, comet's raw ``error_spans`` (start, end, severity, confidence)."""

    score: float
    extra: dict[str, float] = field(default_factory=dict)
    error_spans: list[dict[str, Any]] | None = None


def place(model: CometModel, device: Any, dtype: Any) -> CometModel:
    """``model`` in eval mode on ``device`` in ``dtype`` (``torch.device``/``torch.dtype``)."""
    model.eval()
    return model.to(device=device, dtype=dtype)


def buckets(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Row indices in batches of similar length, longest first (an out-of-memory shows on the first batch).

    A batch has at most ``batch_size`` rows and ``rows * longest <= max_tokens`` padded subwords
    (a single row longer than that still gets a batch of its own).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) == batch_size or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def predict(model: CometModel, rows: Sequence[Row], batch_size: int = 16, max_tokens: int = DEFAULT_MAX_TOKENS,
            lengths: Sequence[int] | None = None, progress: bool = False,
            encodings: Encodings | None = None) -> list[ScoredRow]:
    """Every row scored, in the order given; all rows must have the same keys (one mode per call).

    The rows are tokenized once (``encodings``, from ``model.encode``, when the caller has them already)
    and batched by ``lengths`` (subwords per row; measured from the encodings when not given).
    """
    import torch

    if not rows:
        return []
    if encodings is None:
        encodings = model.encode(rows)
    if lengths is None:
        lengths = model.input_lengths(encodings)
    batches = buckets(lengths, batch_size, max_tokens)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="comet", unit="batch")
    results: list[ScoredRow | None] = [None] * len(rows)
    with torch.inference_mode():
        for batch in batches:
            out = model.predict([rows[i] for i in batch], {k: [v[i] for i in batch] for k, v in encodings.items()})
            columns = {k.removesuffix("s"): v.float().cpu().tolist() for k, v in out.metadata.items()}
            scores = out.scores.float().cpu().tolist()
            for j, i in enumerate(batch):
                results[i] = ScoredRow(scores[j], {k: v[j] for k, v in columns.items()},
                                       None if out.error_spans is None else out.error_spans[j])
    return results  # type: ignore[return-value]


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "CometModel",
    "CometOutput",
    "RegressionMetric",
    "ScoredRow",
    "UnifiedMetric",
    "buckets",
    "check_device",
    "check_dtype",
    "load_comet",
    "place",
    "predict",
    "resolve_checkpoint",
    "resolve_device",
    "resolve_dtype",
]
