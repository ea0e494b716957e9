"""Tiny local stand-ins for hub models, built locally in seconds (no download, no network).

mtrl's tests, the benchmark scripts in ``eval/`` and anyone trying mtrl without a model hub
need models of the real architectures (a Marian-style seq2seq, a Qwen2-style causal LM,
xCOMET) and tokenizers of the real families, but not their weights. This module builds
such stand-ins from scratch so that all of them share one definition; it is part of the
package (not of ``tests/``) so that ``pip install -e .`` alone is enough to run the
benchmarks. The models are untrained (except the tiny xCOMET, trained for a few steps) and
translate nothing useful; the quickstart's actual translation model is the shipped tiny Marian
(``mtrl:tiny-marian``, built by ``tools/build_tiny_marian.py`` with :func:`train_tokenizer`'s vocabulary).

Everything here is deterministic for a given ``seed``, and all training text comes from the
Multi30k copy shipped in the package (:func:`mtrl.datasets.load_parallel`, ``"multi30k"``),
so a clone without any other data builds the same models. Heavy libraries (tokenizers,
transformers, torch) are imported inside the functions, so ``import mtrl.testing`` is cheap.

Tokenizers (:func:`get_tokenizer`), each mimicking a real family closely enough to exercise
its decoder (see :mod:`mtrl.rewards.alignment`):

* ``unigram``: Unigram + Metaspace, EOS appended (Marian / NLLB / T5-like)
* ``bytelevel``: byte-level BPE (GPT-2 / Qwen / Llama-3-like)
* ``bytefallback``: BPE with ``<0xNN>`` byte-fallback tokens, BOS prepended (Llama-2-like)
* ``wordpiece``: WordPiece with ``##`` continuations, [CLS]/[SEP] (BERT-like, cased)

They are trained on the first Multi30k training lines plus a few CJK / emoji /
combining-mark strings (:data:`EXTRA_LINES`), so such characters are in the vocabulary or
hit byte fallback. Vocabularies are small so that each build takes well under a second.

Models: :func:`build_tiny_seq2seq` (Marian, ``unigram`` tokenizer), :func:`build_tiny_causal`
(Qwen2, ``bytelevel`` tokenizer and :data:`CHAT_TEMPLATE`) and :func:`build_tiny_xcomet`
(an ``XCOMETMetric`` with a 32-dim, 2-layer encoder that has learned to tag one word,
:data:`ERROR_WORD`, as a :data:`ERROR_SEVERITY` error; real xCOMET is XLM-R XL, 3.5B
parameters). The xCOMET checkpoint stores ``pretrained_model`` (the encoder directory
holding the config and tokenizer) *relative* to the model directory, so the directory can
be moved or copied; :class:`mtrl.detectors.xcomet.XCometDetector` resolves it before loading.
Its layout::

    out_dir/hparams.yaml
    out_dir/checkpoints/model.ckpt
    out_dir/encoder/{config.json, tokenizer.json, ...}
"""

from __future__ import annotations

import copy
import json
import random
import string
from collections.abc import Iterator
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtrl.datasets import load_parallel

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "ENCODER_DIR",
    "ERROR_SEVERITY",
    "ERROR_WORD",
    "EXTRA_LINES",
    "FAMILIES",
    "build_bytefallback",
    "build_bytelevel",
    "build_tiny_causal",
    "build_tiny_seq2seq",
    "build_tiny_xcomet",
    "build_unigram",
    "build_wordpiece",
    "get_tokenizer",
    "train_tokenizer",
    "training_lines",
    "training_pairs",
]

# --- training text ------------------------------------------------------------------

FAMILIES: tuple[str, ...] = ("unigram", "bytelevel", "bytefallback", "wordpiece")

_N_LINES = 600  # Multi30k training lines per language for the test tokenizers

# Characters the tests throw at the tokenizers; some are in the training text, others only
# reachable through byte fallback / byte-level merges / [UNK].
EXTRA_LINES: tuple[str, ...] = (
    "你好，世界。我们在翻译句子。",
    "東京は日本の首都です。",
    "Emoji: 😀 🎉 👍🏽 ❤️ 🇩🇪",
    "Café, naïve, résumé, Zoë (e\u0301, a\u0308, n\u0303).",
    "„Anführungszeichen“ – Gedankenstrich … ½ °C",
    "Ελληνικά και русский текст.",
    " ".join(string.digits + string.punctuation + string.ascii_letters),
)


def training_pairs(n: int = 800) -> list[tuple[str, str]]:
    """The first ``n`` (English, German) pairs of the shipped Multi30k training split, stripped, non-empty."""
    pairs = ((e.strip(), g.strip()) for e, g in load_parallel("multi30k", "train", limit=n))
    return [(e, g) for e, g in pairs if e and g]


@lru_cache(maxsize=1)
def training_lines() -> tuple[str, ...]:
    """Tokenizer training text: the first 600 Multi30k train lines (English, then German), then
    :data:`EXTRA_LINES` three times. Cached."""
    pairs = load_parallel("multi30k", "train", limit=_N_LINES)
    return tuple(e for e, _ in pairs) + tuple(g for _, g in pairs) + EXTRA_LINES * 3


# --- tokenizers ---------------------------------------------------------------------


def _wrap(tok: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"], **special
    )


def build_unigram() -> PreTrainedTokenizerFast:
    """Unigram + Metaspace; ``</s>`` appended like Marian. No normalizer (so text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False, max_piece_length=8,
        initial_alphabet=list(string.digits + string.punctuation + "äöüÄÖÜß„“”‘’–—…€°"),
    )
    tok.train_from_iterator(training_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def build_bytelevel() -> PreTrainedTokenizerFast:
    """Byte-level BPE, no prefix space, ``<|endoftext|>`` as pad and ``<|im_end|>`` as EOS (Qwen-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer)
    return _wrap(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_bytefallback() -> PreTrainedTokenizerFast:
    """BPE with byte fallback and the Llama-2 decoder chain; CJK/emoji are not in the vocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=500, limit_alphabet=90, show_progress=False)
    base.train_from_iterator(training_lines(), trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_wordpiece() -> PreTrainedTokenizerFast:
    """WordPiece, cased BERT normalizer, punctuation split, ``##`` continuations."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=700, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return _wrap(
        tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"
    )


_BUILDERS = {
    "unigram": build_unigram,
    "bytelevel": build_bytelevel,
    "bytefallback": build_bytefallback,
    "wordpiece": build_wordpiece,
}


@cache
def get_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The tokenizer of one of :data:`FAMILIES`, built once per process.

    The same object is returned on every call: ``copy.deepcopy`` it before changing it.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tokenizer family {family!r}; choose from {', '.join(FAMILIES)}")
    return _BUILDERS[family]()


def train_tokenizer(texts: list[str], vocab_size: int, kind: str = "bpe") -> PreTrainedTokenizerFast:
    """One subword vocabulary for both languages of ``texts`` (``kind``: ``bpe`` or ``unigram``), Marian-style:
    ``<pad>`` 0, ``</s>`` 1 (appended), ``<unk>`` 2. It is the tokenizer of the shipped tiny Marian
    (``tools/build_tiny_marian.py``); one vocabulary lets Marian share (tie) all its embeddings.

    BPE is the default because it is deterministic: the ``tokenizers`` Unigram trainer gives
    slightly different scores and ids from run to run, so a model would not be reproducible.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = "<pad>", "</s>", "<unk>"
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=[pad, eos, unk], unk_token=unk, show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE(unk_token=unk))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[pad, eos, unk], show_progress=False)
    tok.normalizer = normalizers.NFKC()
    # Split punctuation off words ("bushes." -> "▁bushes" "."), as SentencePiece does, so that a
    # small vocabulary is not spent on word+punctuation pieces; the Metaspace decoder rejoins them.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
    )
    # model_input_names: without it the tokenizer also returns token_type_ids, which Marian rejects.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk,
        model_input_names=["input_ids", "attention_mask"], model_max_length=512,
    )


# --- seq2seq and causal models -------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_seq2seq(out_dir: str | Path, lang_codes: tuple[str, ...] = (), seed: int = 0) -> Path:
    """A 2-layer Marian model with the Unigram/Metaspace test tokenizer (``lang_codes`` become tokens, NLLB-style).

    Saves model and tokenizer to ``out_dir`` (a ``from_pretrained`` directory) and returns it.
    """
    import torch
    from transformers import MarianConfig, MarianMTModel

    out_dir = Path(out_dir)
    tok = copy.deepcopy(get_tokenizer("unigram"))
    if lang_codes:
        tok.add_special_tokens({"additional_special_tokens": list(lang_codes)})
    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                          forced_eos_token_id=None, share_encoder_decoder_embeddings=True)
    model = MarianMTModel(config)
    model.generation_config.bad_words_ids = None
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_tiny_causal(out_dir: str | Path, chat: bool = True, seed: int = 0, tokenizer: Any = None,
                      hidden_size: int = 32, heads: int = 4, kv_heads: int = 2) -> Path:
    """A 2-layer Qwen2 model with the byte-level BPE test tokenizer (and :data:`CHAT_TEMPLATE`), or ``tokenizer``.

    Saves model and tokenizer to ``out_dir`` (a ``from_pretrained`` directory) and returns it.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tok = copy.deepcopy(tokenizer if tokenizer is not None else get_tokenizer("bytelevel"))
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# --- tiny xCOMET ---------------------------------------------------------------------

ERROR_WORD = "KAPUTT"  # never occurs in Multi30k; the tiny xCOMET learns to tag it
ERROR_SEVERITY = "major"
ENCODER_DIR = "encoder"  # relative to the model directory


def _build_xlmr_tokenizer(texts: list[str], enc_dir: Path, vocab_size: int):
    """A fast XLM-R-style tokenizer (Unigram + Metaspace, XLM-R special-token ids), saved to ``enc_dir``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in XLM-R; <mask> is added last
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(["<mask>"])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",  # XLM-R puts two separators between segments
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )
    fast.save_pretrained(enc_dir)
    return fast


def _training_batches(model, pairs: list[tuple[str, str]], rng: random.Random, batch_size: int
                      ) -> Iterator[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]]:
    """Endless batches with ERROR_WORD inserted into half of the hypotheses: the three xCOMET inputs
    ([mt; src], [mt; ref], [mt; src; ref]), the hypothesis' subword tags (-1 past its end) and scores."""
    import torch

    label = model.labels.index(ERROR_SEVERITY)
    encoder = model.encoder
    while True:
        chosen = rng.sample(pairs, batch_size)
        src, mt, ref, spans, scores = [], [], [], [], []
        for i, (en, de) in enumerate(chosen):
            words, span, score = de.split(), None, 0.9
            if i % 2 == 0 and len(words) >= 3:
                k = rng.randrange(1, len(words) - 1)  # never last: comet drops a span that ends the MT
                start = len(" ".join(words[:k])) + 1
                words.insert(k, ERROR_WORD)
                span, score = (start, start + len(ERROR_WORD)), 0.3
            src.append(en)
            mt.append(" ".join(words))
            ref.append(de)
            spans.append(span)
            scores.append(score)
        seqs = {"mt": encoder.encode(mt), "src": encoder.encode(src), "ref": encoder.encode(ref)}
        width = max(len(e.ids) for e in seqs["mt"])
        labels = torch.full((batch_size, width), -1, dtype=torch.long)
        for i, (enc, span) in enumerate(zip(seqs["mt"], spans, strict=True)):
            labels[i, :len(enc.ids)] = 0
            tagged = {enc.char_to_token(c) for c in range(*span)} - {None} if span else set()
            labels[i, sorted(tagged)] = label
        inputs = [encoder.pad([encoder.join([seqs[n][i].ids for n in names]) for i in range(batch_size)])
                  for names in (("mt", "src"), ("mt", "ref"), ("mt", "src", "ref"))]
        yield inputs, labels, torch.tensor(scores)


def _train_xcomet(model, pairs: list[tuple[str, str]], rng: random.Random, steps: int) -> None:
    """Span-supervised training: tag cross-entropy plus score regression on each of the three inputs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-dim model gains nothing from threads; avoids oversubscription
    try:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        ce = torch.nn.CrossEntropyLoss(ignore_index=-1)  # unweighted: xCOMET's weights over-tag a tiny model
        batches = _training_batches(model, pairs, rng, batch_size=8)
        for _ in range(steps):
            inputs, labels, scores = next(batches)
            loss = torch.zeros(())
            for ids, mask in inputs:
                score, logits = model(ids, mask)
                logits = logits[:, : labels.shape[1]]
                loss = loss + ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
                loss = loss + torch.nn.functional.mse_loss(score, scores)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)


def build_tiny_xcomet(out_dir: str | Path, seed: int = 0, train_steps: int = 60) -> Path:
    """Build, briefly train (``train_steps`` steps, a few seconds on CPU) and save a tiny ``XCOMETMetric``.

    Returns the checkpoint path, ``out_dir/checkpoints/model.ckpt`` (see the module docstring for the
    layout), written as comet writes its checkpoints, so that :func:`mtrl.comet.load_comet` reads it
    as it reads Unbabel's.
    """
    import torch
    import yaml
    from transformers import XLMRobertaXLConfig

    from mtrl.comet import UnifiedMetric
    from mtrl.comet.encoder import CometEncoder

    out_dir = Path(out_dir)
    enc_dir = out_dir / ENCODER_DIR
    enc_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    torch.manual_seed(seed)

    pairs = training_pairs()
    texts = [t for pair in pairs for t in pair] + [f"Das ist {ERROR_WORD} hier."]
    tokenizer = _build_xlmr_tokenizer(texts, enc_dir, vocab_size=600)
    config = XLMRobertaXLConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    config.save_pretrained(enc_dir)

    hparams = dict(
        class_identifier="xcomet_metric", encoder_model="XLM-RoBERTa-XL", pretrained_model=ENCODER_DIR,
        load_pretrained_weights=False, local_files_only=True, word_level_training=True, word_layer=2,
        layer="mix", sent_layer="mix", layer_transformation="sparsemax", layer_norm=False, hidden_sizes=[64, 32],
        activations="Tanh", final_activation=None, error_labels=["minor", "major", "critical"],
        input_segments=["mt", "src", "ref"], cross_entropy_weights=[0.08, 0.486, 0.505, 0.533], loss_lambda=0.5,
        dropout=0.0,
    )
    model = UnifiedMetric(CometEncoder("XLM-RoBERTa-XL", config, tokenizer), hparams, xcomet=True)

    _train_xcomet(model, pairs, rng, train_steps)

    ckpt = out_dir / "checkpoints" / "model.ckpt"
    ckpt.parent.mkdir(exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "epoch": 0,
                "global_step": train_steps}, ckpt)
    (out_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return ckpt
