"""The broadcast attention mask equals transformers' vmap-built one, and a model gives the same outputs with it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

from mtrl.attention import broadcast_sdpa_mask
from mtrl.policy import load_model_and_tokenizer


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (1, 7), (2, 9)])
def test_mask_equals_transformers(window, padding, q_len, kv_len):
    torch.manual_seed(0)
    attention_mask = torch.ones(4, kv_len, dtype=torch.long)
    for row, n in enumerate([0, 2, 1, 3]):
        if padding == "left" and n:
            attention_mask[row, :n] = 0
        elif padding == "right" and n:
            attention_mask[row, -n:] = 0
    kwargs = dict(batch_size=4, cache_position=torch.arange(kv_len - q_len, kv_len), kv_length=kv_len,
                  attention_mask=attention_mask)
    if window:
        kwargs.update(mask_function=sliding_window_causal_mask_function(window), local_size=window)
    expected = sdpa_mask(**kwargs)
    got = broadcast_sdpa_mask(**kwargs)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.shape == expected.shape and torch.equal(got, expected)


def test_causal_model_outputs_unchanged(tiny_causal):
    """mtrl's loader switches a causal LM to the broadcast mask: same logits, same greedy tokens, plain checkpoint."""
    ours, tok, _ = load_model_and_tokenizer(str(tiny_causal))
    plain = AutoModelForCausalLM.from_pretrained(tiny_causal)
    assert ours.config._attn_implementation == "mtrl_sdpa" and plain.config._attn_implementation == "sdpa"
    batch = tok(["a short one", "a much longer prompt than the first one is"], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # left padding: the mask is built, not skipped
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, plain(**batch).logits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(ours.generate(**batch, **kw), plain.generate(**batch, **kw))


def test_saved_checkpoint_does_not_name_the_mask(tiny_causal, tmp_path):
    model, _, _ = load_model_and_tokenizer(str(tiny_causal))
    model.save_pretrained(tmp_path)
    assert "mtrl" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
