"""SDPA attention for causal LMs with a padded-batch mask built by broadcasting, not ``vmap``.

With a left-padded batch (every batch of prompts of different lengths) transformers
4.x builds the 4-D attention mask at every forward, so at every generated token,
by running the mask function under four nested ``torch.vmap`` calls
(``masking_utils.sdpa_mask_recent_torch``). That is Python overhead, ~4.5 ms per
generated token on this 2-core CPU: sampling 8 x 24 tokens from 2 prompts of
different lengths with the tiny causal test model took 157 ms with it, 49 ms with
the mask below (same tokens).

The mask functions transformers composes (causal, sliding window, chunked,
padding, packed sequences) are elementwise comparisons and indexing, so they give
the same boolean mask when called once on broadcastable index tensors
(batch ``B x 1 x 1 x 1``, query ``1 x 1 x Q x 1``, key ``1 x 1 x 1 x K``).
:func:`broadcast_sdpa_mask` does that and otherwise follows ``sdpa_mask`` (padding
and the skip when SDPA's ``is_causal`` suffices); it is registered, with
transformers' own SDPA attention, under the name ``mtrl_sdpa`` through the
documented ``AttentionInterface`` / ``AttentionMaskInterface`` registries, and
:func:`use_broadcast_masks` switches a loaded causal model to it. Tests compare the
masks with transformers' for random paddings and the logits of both implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,
    padding_mask_function,
    prepare_padding_mask,
)

NAME = "mtrl_sdpa"


def broadcast_sdpa_mask(batch_size: int, cache_position: torch.Tensor, kv_length: int, kv_offset: int = 0,
                        mask_function: Callable = causal_mask_function, attention_mask: torch.Tensor | None = None,
                        local_size: int | None = None, allow_is_causal_skip: bool = True,
                        **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask`` (B x 1 x Q x K booleans, True = attend), evaluated by broadcasting."""
    padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and _is_causal_suffices(padding_mask, cache_position.shape[0], kv_length, kv_offset,
                                                    local_size):
        return None
    if padding_mask is not None:
        mask_function = and_masks(mask_function, padding_mask_function(padding_mask))
    device = cache_position.device
    batch = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    head = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    query = cache_position.reshape(1, 1, -1, 1)
    key = (torch.arange(kv_length, device=device) + kv_offset).view(1, 1, 1, -1)
    mask = mask_function(batch, head, query, key)
    return mask.expand(batch_size, 1, query.shape[2], kv_length)


def _is_causal_suffices(padding_mask: torch.Tensor | None, q_length: int, kv_length: int, kv_offset: int,
                        local_size: int | None) -> bool:
    """No mask needed (SDPA's ``is_causal`` or nothing): no padding in view, and one query or a square mask."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False  # a traced graph must not depend on the data (transformers does the same)
    if padding_mask is not None:
        padding_mask = padding_mask[:, kv_offset:kv_offset + kv_length]
        if not padding_mask.all():
            return False
    return (q_length == 1 or q_length == kv_length) and (local_size is None or kv_length < local_size)


AttentionInterface.register(NAME, AttentionInterface._global_mapping["sdpa"])
AttentionMaskInterface.register(NAME, broadcast_sdpa_mask)


def use_broadcast_masks(model: Any) -> bool:
    """Switch a causal LM that runs transformers' SDPA to ``mtrl_sdpa``; True when it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or config._attn_implementation != "sdpa":
        return False  # eager, flash attention (no mask), encoder-decoders (masks built elsewhere): left alone
    model.set_attn_implementation(NAME)
    return True
