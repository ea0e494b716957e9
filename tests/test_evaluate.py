"""translate() order and batching, sacrebleu-equivalent corpus metrics, and the results table."""

from __future__ import annotations

import pytest
import sacrebleu
import torch
from transformers import MarianConfig, MarianMTModel

from mtrl.datasets import load_parallel
from mtrl.errors import MtrlError
from mtrl.evaluate import corpus_metrics, format_table, translate
from mtrl.policy import GenerationConfig, Policy
from mtrl.testing import train_tokenizer

PAIRS = load_parallel("multi30k", "val", limit=200)
SOURCES = [s for s, _ in PAIRS]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([t for p in PAIRS for t in p], vocab_size=500)


class EchoPolicy:
    """Stands in for a Policy: 'translates' each source into itself and records the batches it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.batches = tokenizer, []

    def encode_sources(self, sources):
        enc = self.tokenizer(list(sources), padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def generate(self, queries, query_mask, gen, sample=True):
        assert sample is False and not torch.is_grad_enabled()  # greedy, no autograd
        self.batches.append(list(query_mask.sum(1)))
        return queries, query_mask


def test_translate_keeps_input_order_with_length_sorted_batches(tokenizer):
    sources = SOURCES[:37]
    policy = EchoPolicy(tokenizer)
    out = translate(policy, sources, GenerationConfig(eval_batch_size=8))
    assert out == sources
    assert [len(b) for b in policy.batches] == [8, 8, 8, 8, 5]
    longest = [max(b) for b in policy.batches]
    assert longest[0] < longest[-1]  # batches grouped by length, shortest first
    assert translate(policy, [], GenerationConfig()) == []


def test_translate_with_a_real_marian_model(tokenizer):
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                          decoder_ffn_dim=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = MarianMTModel(config).eval()
    out = translate(Policy(model, tokenizer, "seq2seq"), SOURCES[:5],
                    GenerationConfig(max_new_tokens=6, eval_batch_size=2))
    assert len(out) == 5 and all(isinstance(t, str) for t in out)
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 6 for t in out)


def test_corpus_metrics_match_sacrebleu():
    refs = [r for _, r in PAIRS]
    hyps = [" ".join(r.split()[::-1]) if i % 3 else r for i, r in enumerate(refs)]
    ours = corpus_metrics(hyps, refs)
    for name, fn in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf), ("ter", sacrebleu.corpus_ter)):
        assert ours[name]["score"] == fn(hyps, [refs]).score
    assert 0 < ours["bleu"]["score"] < 100 and 0 < ours["chrf"]["score"] < 100
    assert ours["bleu"]["signature"] == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" + sacrebleu.__version__
    assert ours["chrf"]["signature"] == "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:" + sacrebleu.__version__
    assert ours["ter"]["signature"].startswith("nrefs:1|case:lc|tok:tercom|norm:no|punct:yes|asian:no|")
    with pytest.raises(MtrlError, match="2 hypotheses but 1 references"):
        corpus_metrics(["a", "b"], ["a"])


def test_format_table():
    before = corpus_metrics(["Ein Hund."], ["Ein Hund rennt."])
    table = format_table({"before": before, "after": {"bleu": 12.345, "chrf": {"score": 50.0}}})
    lines = table.splitlines()
    assert lines[0].split() == ["system", "bleu", "chrf", "ter"]
    assert lines[3].split() == ["after", "12.35", "50.00", "-"]
    assert lines[2].split()[1] == f"{before['bleu']['score']:.2f}"
    assert lines[4] == f"bleu: {before['bleu']['signature']}"
    assert "signature" not in format_table({"a": {"bleu": 1.0}}, signatures=False)
