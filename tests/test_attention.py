"""Causal policies sample with transformers' own SDPA masks, which on a padded batch must be built by
broadcasting: built under ``torch.vmap`` they cost ~4.7 ms per generated token on a 2-core CPU
(eval/results/attention-masks-transformers5.md)."""

from __future__ import annotations

import pytest
import torch

from mtrl.policy import load_model_and_tokenizer


def test_padded_batch_mask_is_built_without_vmap(tiny_causal, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, _ = load_model_and_tokenizer(str(tiny_causal))
    assert model.config._attn_implementation == "sdpa"
    tok.padding_side = "left"
    batch = tok(["a short one", "a much longer prompt than the first one is"], return_tensors="pt",
                padding=True)
    assert (batch["attention_mask"] == 0).any()  # the mask is built, not skipped

    def vmap(*args: object, **kwargs: object) -> None:
        raise AssertionError("attention mask built under torch.vmap")

    monkeypatch.setattr(torch, "vmap", vmap)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
