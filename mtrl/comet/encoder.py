"""The XLM-R (or XLM-R XL) encoder of a COMET model, with comet's way of cutting and joining segments.

comet tokenizes each segment on its own, cut to ``max_positions - 2`` subwords with ``<s>`` and
``</s>`` counted, then joins them as ``<s> a </s></s> b </s></s> c </s>`` and cuts the join to
``max_positions`` (so a cut join has no final ``</s>``). ``max_positions`` is the encoder's
``max_position_embeddings - 2`` (512 for XLM-R). Tokenizing goes straight to the Rust tokenizer:
one call for a batch, and its offsets are the character spans that error spans are read from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ENCODERS = ("XLM-RoBERTa", "XLM-RoBERTa-XL")


def encode_segments(tokenizer: Any, max_positions: int, texts: Sequence[str]) -> list[Any]:
    """``texts`` as ``tokenizers.Encoding`` s cut to ``max_positions - 2`` subwords (``overflowing`` holds the rest).

    One call of the Rust tokenizer: the transformers wrapper costs more than the tokenizing on short
    rows. Truncation and padding are per-call state of the shared tokenizer, so both are set here.
    """
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_length=max_positions - 2)
    backend.no_padding()
    return backend.encode_batch(list(texts))


class CometEncoder(nn.Module):
    """``model``: the transformers encoder (no pooler), ``tokenizer``: its fast tokenizer."""

    def __init__(self, kind: str, config: Any, tokenizer: Any) -> None:
        super().__init__()
        from transformers import XLMRobertaModel, XLMRobertaXLModel

        if kind not in ENCODERS:
            raise ValueError(f"encoder_model {kind!r} is not supported (supported: {', '.join(ENCODERS)})")
        model_class = XLMRobertaXLModel if kind == "XLM-RoBERTa-XL" else XLMRobertaModel
        self.model = model_class(config, add_pooling_layer=False)
        self.tokenizer = tokenizer
        self.max_positions = config.max_position_embeddings - 2
        self.num_layers = config.num_hidden_layers + 1  # the embeddings count as layer 0
        self.output_units = config.hidden_size
        self.pad_id = tokenizer.pad_token_id
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every layer's hidden states, embeddings first."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                          return_dict=True).hidden_states

    def encode(self, texts: Sequence[str]) -> list[Any]:
        """Each text as a ``tokenizers.Encoding`` with ``<s>``/``</s>``, cut to ``max_positions - 2`` subwords."""
        return encode_segments(self.tokenizer, self.max_positions, texts)

    def join(self, segments: Sequence[Sequence[int]]) -> list[int]:
        """One row's segments (each with its ``<s>``/``</s>``) as one input, cut to ``max_positions``."""
        ids = list(segments[0])
        for seg in segments[1:]:
            ids = [self.cls_id, *ids[1:-1], self.sep_id, self.sep_id, *seg[1:-1], self.sep_id]
        return ids[:self.max_positions]

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` on the encoder's device."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask = torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
        device = self.model.embeddings.word_embeddings.weight.device
        return ids.to(device), mask.long().to(device)
