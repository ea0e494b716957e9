"""Golden outputs of unbabel-comet 2.2.7 for mtrl's own COMET models (:mod:`mtrl.comet`).

Run in an environment with comet 2.2.7 (it caps transformers < 5 and numpy < 2), not mtrl's::

    python3 -m venv /tmp/comet-env && . /tmp/comet-env/bin/activate
    pip install torch==2.13.0 && pip install unbabel-comet==2.2.7
    python tools/comet_parity.py OUT_DIR [--seed 0] [--rows 50]

It builds small checkpoints with random weights of each model type mtrl loads, in comet's own
layout (``hparams.yaml``, ``checkpoints/model.ckpt``, ``encoder/`` with the XLM-R config and a
tokenizer trained on the shipped Multi30k text), and writes what comet's ``predict`` returns on
``--rows`` rows, with and without references, to ``OUT_DIR/<model>/golden.json.gz``: scores, the
other metadata scores, error spans and the subword tag probabilities its span decoder read.

The committed copy is ``tests/data/comet-parity`` (``--seed 0 --rows 50``); ``tests/test_comet_parity.py``
compares mtrl's outputs with it, and with any other copy: ``MTRL_COMET_GOLDEN=OUT_DIR pytest
tests/test_comet_parity.py``. The script reads the shipped text straight from ``mtrl/data`` and does
not import mtrl, whose dependencies do not install beside comet.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT / "mtrl" / "data" / "multi30k"
ENCODER_DIR = "encoder"

# name -> (comet class identifier, hparams). Small encoders (32 dims); the first has 64 positions so
# that long rows are cut, as XCOMET cuts at 512.
MODELS: dict[str, tuple[str, dict]] = {
    "xcomet-xl": ("xcomet_metric", dict(
        encoder_model="XLM-RoBERTa-XL", word_layer=2, sent_layer="mix", layer_transformation="sparsemax",
        layer_norm=True, hidden_sizes=[64, 32], error_labels=["minor", "major", "critical"],
        max_position_embeddings=66)),
    "xcomet-softmax": ("xcomet_metric", dict(
        encoder_model="XLM-RoBERTa", word_layer=1, sent_layer="mix", layer_transformation="sparsemax_patch",
        layer_norm=False, hidden_sizes=[48], error_labels=["minor", "major", "critical"])),
    "unified-word": ("unified_metric", dict(
        encoder_model="XLM-RoBERTa", word_layer=3, sent_layer="mix", layer_transformation="softmax",
        layer_norm=True, hidden_sizes=[64, 32], word_level_training=True, error_labels=["minor", "major"],
        input_segments=["mt", "src", "ref"])),
    "cometkiwi": ("unified_metric", dict(
        encoder_model="XLM-RoBERTa", sent_layer="mix", layer_transformation="sparsemax", layer_norm=True,
        hidden_sizes=[64, 32], final_activation="Sigmoid", input_segments=["mt", "src"])),
    "comet-da": ("regression_metric", dict(
        encoder_model="XLM-RoBERTa", layer="mix", layer_transformation="sparsemax", layer_norm=True, pool="avg",
        hidden_sizes=[64, 32])),
    "comet-cls": ("regression_metric", dict(
        encoder_model="XLM-RoBERTa", layer=2, layer_transformation="softmax", layer_norm=False, pool="cls",
        hidden_sizes=[32], activations="Sigmoid")),
}


def read_lines(name: str) -> list[str]:
    with gzip.open(MULTI30K / name, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def build_tokenizer(enc_dir: Path, seed: int):
    """An XLM-R-style fast tokenizer (Unigram + Metaspace, ids 0-3 = <s> <pad> </s> <unk>, <mask> last)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaTokenizerFast

    texts = read_lines("train.en.gz")[:3000] + read_lines("train.de.gz")[:3000] + ["Süße Grüße 東京 🙂 café"]
    random.Random(seed).shuffle(texts)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=700, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.add_special_tokens(["<mask>"])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(enc_dir)
    return fast


def build_model(out: Path, identifier: str, hparams: dict, seed: int):
    """A comet model with random weights, saved as comet saves it (the encoder path relative to ``out``)."""
    import pytorch_lightning as pl
    from comet.models import str2model
    from transformers import XLMRobertaConfig, XLMRobertaXLConfig

    torch.manual_seed(seed)
    hparams = dict(hparams)
    positions = hparams.pop("max_position_embeddings", 514)
    enc_dir = out / ENCODER_DIR
    tokenizer = build_tokenizer(enc_dir, seed)
    config_cls = XLMRobertaXLConfig if hparams["encoder_model"] == "XLM-RoBERTa-XL" else XLMRobertaConfig
    config_cls(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=positions, pad_token_id=1, bos_token_id=0,
               eos_token_id=2).save_pretrained(enc_dir)
    model = str2model[identifier](pretrained_model=str(enc_dir), load_pretrained_weights=False,
                                  local_files_only=True, dropout=0.0, **hparams)
    with torch.no_grad():  # away from the init values, so that every part of the model shows in the outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if model.layerwise_attention is not None:
            for p in model.layerwise_attention.scalar_parameters:
                p.copy_(torch.randn_like(p))
            model.layerwise_attention.gamma.fill_(1.3)
        spread_scores(model)
        if getattr(model, "hidden2tag", None) is not None:  # logits of about +-2: tags of every label
            sample = model.encoder.prepare_sample(read_lines("val.de.gz")[:16])
            hidden = model.encoder(**sample)["all_layers"][model.hparams.word_layer]
            scale = 2.0 / (hidden.std().item() * hidden.shape[-1] ** 0.5)
            model.hidden2tag.weight.normal_(0.0, scale)
            model.hidden2tag.bias.zero_()
            model.hidden2tag.bias[0] = 1.0
    model.eval()
    hp = dict(model.hparams)
    hp["pretrained_model"] = ENCODER_DIR
    ckpt = out / "checkpoints" / "model.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": pl.__version__}, ckpt)
    (out / "hparams.yaml").write_text(yaml.safe_dump(hp))
    return model


def spread_scores(model) -> None:
    """Scale the estimator's last layer (at most 20x: more would amplify rounding) so that outputs vary between rows."""
    last = [m for m in model.estimator.ff if isinstance(m, torch.nn.Linear)][-1]
    seen = []
    hook = last.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    texts = read_lines("val.de.gz")[:16]
    model.predict([{"src": t, "mt": t[::-1], "ref": t} for t in texts], batch_size=16, gpus=0, progress_bar=False)
    hook.remove()
    out = torch.cat(seen)
    factor = min(20.0, 1.0 / max(out.std().item(), 1e-6))
    last.weight.mul_(factor)
    last.bias.copy_((last.bias - out.mean()) * factor + 0.5)


def make_rows(n: int, seed: int) -> list[dict]:
    """Multi30k val rows with hypotheses of every kind: exact, cut, shuffled, repeated, wrong, long, odd."""
    rng = random.Random(seed)
    src, ref = read_lines("val.en.gz"), read_lines("val.de.gz")
    picks = rng.sample(range(len(src)), n)
    rows = []
    for k, i in enumerate(picks):
        words = ref[i].split()
        kind = k % 8
        if kind == 0:
            mt = ref[i]
        elif kind == 1 and len(words) > 3:
            del words[rng.randrange(len(words))]
            mt = " ".join(words)
        elif kind == 2:
            rng.shuffle(words)
            mt = " ".join(words)
        elif kind == 3:
            j = rng.randrange(len(words))
            mt = " ".join(words[:j + 1] + words[j:] * 2)
        elif kind == 4:
            mt = ref[rng.randrange(len(ref))]
        elif kind == 5:  # longer than the 64-position model holds
            mt = " ".join(ref[rng.randrange(len(ref))] for _ in range(4))
        elif kind == 6:
            mt = ref[i].upper() + " 東京 🙂"
        else:
            mt = src[i]  # a copy of the source
        rows.append({"src": src[i], "mt": mt, "ref": ref[i]})
    rows[-1]["src"] = " ".join(src[j] for j in picks[:5])  # a long source: the concatenation is cut
    return rows


def predict(model, rows: list[dict]) -> dict:
    """comet's ``predict`` on ``rows``, plus the subword probabilities its span decoder read."""
    probs: list[list[list[float]]] = []
    if getattr(model, "word_level", False):
        decode = model.decode

        def recording_decode(subword_probs, input_ids, mt_offsets):
            for i, offsets in enumerate(mt_offsets):
                probs.append(subword_probs[i, :len(offsets)].float().tolist())
            return decode(subword_probs, input_ids, mt_offsets)

        model.decode = recording_decode
    out = model.predict(rows, batch_size=8, gpus=0, progress_bar=False, length_batching=False, num_workers=0)
    if probs:
        del model.decode
    result = {"scores": [float(x) for x in out.scores]}
    meta = dict(out.metadata) if "metadata" in out else {}
    spans = meta.pop("error_spans", None)
    result["metadata"] = {k: [float(x) for x in v] for k, v in meta.items()}
    if spans is not None:
        result["error_spans"] = [[{"start": int(s["start"]), "end": int(s["end"]), "severity": s["severity"],
                                   "confidence": float(s["confidence"])} for s in row] for row in spans]
        result["tag_probs"] = probs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    import comet

    torch.set_num_threads(1)
    rows = make_rows(args.rows, args.seed)
    for name in args.models:
        identifier, hparams = MODELS[name]
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        model = build_model(out, identifier, hparams, args.seed)
        modes = {"ref": rows}
        if identifier != "regression_metric":
            modes["qe"] = [{"src": r["src"], "mt": r["mt"]} for r in rows]
        golden = {"comet_version": comet.__version__, "class_identifier": identifier, "seed": args.seed,
                  "modes": {mode: {"rows": mode_rows, **predict(model, mode_rows)} for mode, mode_rows in modes.items()}}
        with gzip.open(out / "golden.json.gz", "wt", encoding="utf-8") as f:
            json.dump(golden, f)
        n_spans = sum(len(s) for m in golden["modes"].values() for s in m.get("error_spans", []))
        print(f"{name}: {identifier}, {len(rows)} rows x {len(modes)} modes, {n_spans} error spans -> {out}")


if __name__ == "__main__":
    main()
