"""The COMET models mtrl scores with, for inference: xCOMET, unified (COMET-Kiwi) and regression (COMET-DA) metrics.

Each follows unbabel-comet 2.2.7's forward pass and ``predict_step`` (the golden files in
``tests/data/comet-parity`` pin it):

* :class:`UnifiedMetric` (``unified_metric``, e.g. ``Unbabel/wmt22-cometkiwi-da``; ``xcomet_metric``,
  ``Unbabel/XCOMET-XL``/``-XXL``): the segments joined into one input; the sentence score from the
  first position of a learned mix of layers (or one layer), word tags from ``word_layer``. With
  source and reference it runs three passes, ``[mt; src]``, ``[mt; ref]`` and ``[mt; src; ref]``,
  and averages their tag probabilities with weights 1/6, 1/3, 1/2. Its score is their mean; xCOMET's
  is ``0.12 src + 0.33 ref + 0.33 unified + 0.22 mqm`` with each pass capped at 1 and ``mqm`` the
  score of its own error spans (minor 1, major 5, critical 10, capped at 25, mapped to [0, 1]).
  Without a reference xCOMET gives ``0.78 src + 0.22 mqm``.
* :class:`RegressionMetric` (``regression_metric``, e.g. ``Unbabel/wmt22-comet-da``): source,
  hypothesis and reference encoded apart, pooled, and combined as
  ``[h, r, h*r, |h-r|, h*s, |h-s|]`` for the estimator.

Error spans are comet's: a subword starts or continues a span when its most likely tag is an
error; the span takes the first subword's severity, its confidence is the mean top probability,
and a span still open at the hypothesis' last subword is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtrl.comet.encoder import CometEncoder
from mtrl.comet.layers import FeedForward, LayerwiseAttention

Row = Mapping[str, str]
Encodings = Mapping[str, Sequence[Any]]  # segment name -> one tokenizers.Encoding per row
SPAN_WEIGHTS = (0.1667, 0.3333, 0.5)  # [mt; src], [mt; ref], [mt; src; ref]
XCOMET_WEIGHTS = (0.12, 0.33, 0.33, 0.22)  # src, ref, unified, mqm
MQM_PENALTY = {"minor": 1, "major": 5, "critical": 10}


@dataclass
class CometOutput:
    """One batch: ``scores`` (B), ``metadata`` (name -> B scores, e.g. ``src_scores``), and for
    word-level models ``error_spans`` (per row: dicts with start, end, severity, confidence) and
    ``tag_probs`` (per row: hypothesis subwords x labels, label 0 = no error)."""

    scores: torch.Tensor
    metadata: dict[str, torch.Tensor]
    error_spans: list[list[dict[str, Any]]] | None = None
    tag_probs: list[torch.Tensor] | None = None


class UnifiedMetric(nn.Module):
    """comet's ``UnifiedMetric``; ``xcomet=True`` for ``XCOMETMetric`` (its inputs and score combination)."""

    def __init__(self, encoder: CometEncoder, hparams: Mapping[str, Any], xcomet: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.xcomet = xcomet
        self.sent_layer = hparams.get("sent_layer", "mix")
        self.word_layer = int(hparams.get("word_layer", 36 if xcomet else 24))
        self.layerwise_attention = None
        if self.sent_layer == "mix":
            self.layerwise_attention = LayerwiseAttention(
                encoder.num_layers, layer_norm=hparams.get("layer_norm", not xcomet),
                transformation=hparams.get("layer_transformation", "sparsemax"))
        self.estimator = FeedForward(encoder.output_units,
                                     hparams.get("hidden_sizes", [2560, 1280] if xcomet else [3072, 1024]),
                                     hparams.get("activations", "Tanh"), hparams.get("final_activation"),
                                     hparams.get("dropout", 0.1))
        self.word_level = xcomet or bool(hparams.get("word_level_training", False))
        self.input_segments = ["mt", "src", "ref"] if xcomet else list(hparams.get("input_segments", ["mt", "src", "ref"]))
        default_labels = ["minor", "major", "critical"] if xcomet else ["minor", "major"]
        self.labels = ["O", *hparams.get("error_labels", default_labels)]
        if self.word_level:
            self.hidden2tag = nn.Linear(encoder.output_units, len(self.labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sentence scores (B) and, for word-level models, tag logits (B x T x labels)."""
        layers = self.encoder(input_ids, attention_mask)
        if self.layerwise_attention is not None:
            embeddings = self.layerwise_attention(layers, attention_mask)
        else:
            embeddings = layers[int(self.sent_layer)]
        scores = self.estimator(embeddings[:, 0, :]).view(-1)
        logits = self.hidden2tag(layers[self.word_layer]) if self.word_level else None
        return scores, logits

    def segments(self, rows: Sequence[Row]) -> list[list[str]]:
        """The segment names each pass of this batch joins (every row of a batch has the same keys, as in comet)."""
        has = [name for name in ("src", "ref") if name in self.input_segments and name in rows[0]]
        if len(has) == 2:
            return [["mt", "src"], ["mt", "ref"], ["mt", "src", "ref"]]
        return [["mt", *has]]

    def encode(self, rows: Sequence[Row]) -> dict[str, list[Any]]:
        """The rows' segments that this batch's passes read, each tokenized once."""
        names = sorted({n for names in self.segments(rows) for n in names})
        return {name: self.encoder.encode([r[name] for r in rows]) for name in names}

    def input_lengths(self, encodings: Encodings) -> list[int]:
        """Each row's longest pass in subwords (what it costs in a padded batch): all its segments joined."""
        names = list(encodings)
        return [len(self.encoder.join([encodings[n][i].ids for n in names])) for i in range(len(encodings["mt"]))]

    def predict(self, rows: Sequence[Row], encodings: Encodings | None = None) -> CometOutput:
        """Scores (and error spans) of one batch; run it under ``torch.inference_mode()``.

        ``encodings`` (segment name -> the rows' :meth:`CometEncoder.encode` output) saves tokenizing again.
        """
        passes = self.segments(rows)
        encoded = encodings if encodings is not None else self.encode(rows)
        outputs = []
        for names in passes:
            ids = [self.encoder.join([encoded[n][i].ids for n in names]) for i in range(len(rows))]
            outputs.append(self(*self.encoder.pad(ids)))
        scores = [s.float() for s, _ in outputs]
        metadata = {}
        if len(passes) == 3:
            metadata = {"src_scores": scores[0], "ref_scores": scores[1], "unified_scores": scores[2]}
        if not self.word_level:
            return CometOutput(torch.stack(scores).mean(dim=0), metadata)

        mt = encoded["mt"]
        width = max(len(e.ids) for e in mt)
        weights = SPAN_WEIGHTS if len(passes) == 3 else (1.0,)
        probs = sum(w * torch.softmax(logits[:, :width].float(), dim=-1)
                    for w, (_, logits) in zip(weights, outputs, strict=True))
        probs = probs.cpu()  # the decoder reads one subword at a time
        tag_probs = [probs[i, :len(e.ids)] for i, e in enumerate(mt)]
        spans = [decode_spans(p, e.offsets, self.labels) for p, e in zip(tag_probs, mt, strict=True)]
        if not self.xcomet:
            return CometOutput(torch.stack(scores).mean(dim=0), metadata, spans, tag_probs)

        mqm = mqm_scores(spans).to(scores[0].device)
        capped = [torch.where(s > 1.0, 1.0, s) for s in scores]
        if len(passes) == 3:
            final = sum(w * s for w, s in zip(XCOMET_WEIGHTS[:3], capped)) + XCOMET_WEIGHTS[3] * mqm
        else:
            final = capped[0] * sum(XCOMET_WEIGHTS[:3]) + XCOMET_WEIGHTS[3] * mqm
            metadata = {"src_scores": capped[0]}
        return CometOutput(final, {**metadata, "mqm_scores": mqm}, spans, tag_probs)


def decode_spans(probs: torch.Tensor, offsets: Sequence[tuple[int, int]], labels: Sequence[str]
                 ) -> list[dict[str, Any]]:
    """comet's span decoder on one hypothesis: ``probs`` (subwords x labels), ``offsets`` (subword -> chars)."""
    top, best = probs.max(dim=-1)
    spans: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for k, label in enumerate(best.tolist()):
        if label != 0:
            if current is None:
                current = {"start": offsets[k][0], "end": offsets[k][1], "severity": labels[label], "probs": [k]}
            else:
                current["end"] = offsets[k][1]
                current["probs"].append(k)
        elif current is not None:
            spans.append(current)
            current = None
    for span in spans:
        span["confidence"] = top[span.pop("probs")].mean().item()
    return spans


def mqm_scores(spans: Sequence[Sequence[Mapping[str, Any]]]) -> torch.Tensor:
    """xCOMET's MQM score of its own spans: 1 - min(25, penalties) / 25."""
    penalties = [min(25, sum(MQM_PENALTY.get(s["severity"], 0) for s in row)) for row in spans]
    return (torch.tensor(penalties) * -1 + 25) / 25


class RegressionMetric(nn.Module):
    """comet's ``RegressionMetric``: source, hypothesis and reference encoded apart (needs references)."""

    word_level = False
    input_segments = ("src", "mt", "ref")

    def __init__(self, encoder: CometEncoder, hparams: Mapping[str, Any]) -> None:
        super().__init__()
        self.encoder = encoder
        self.layer = hparams.get("layer", "mix")
        self.pool = hparams.get("pool", "avg")
        if self.pool not in ("avg", "max", "cls", "default"):
            raise ValueError(f"pool {self.pool!r} is not supported (avg, max, cls, default)")
        self.layerwise_attention = None
        if self.layer == "mix":
            self.layerwise_attention = LayerwiseAttention(
                encoder.num_layers, layer_norm=hparams.get("layer_norm", True),
                transformation=hparams.get("layer_transformation", "softmax"))
        self.estimator = FeedForward(encoder.output_units * 6, hparams.get("hidden_sizes", [3072, 1024]),
                                     hparams.get("activations", "Tanh"), hparams.get("final_activation"),
                                     hparams.get("dropout", 0.1))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One sentence embedding per row (comet's ``compute_sentence_embedding``)."""
        layers = self.encoder(input_ids, attention_mask)
        if self.layerwise_attention is not None:
            embeddings = self.layerwise_attention(layers, attention_mask)
        else:
            embeddings = layers[int(self.layer)]
        if self.pool == "default":
            return layers[-1][:, 0, :]
        if self.pool == "cls":
            return embeddings[:, 0, :]
        padding = input_ids.eq(self.encoder.pad_id).unsqueeze(-1)
        if self.pool == "max":
            return embeddings.float().masked_fill(padding, float("-inf")).type_as(embeddings).max(dim=1)[0]
        summed = embeddings.float().masked_fill(padding, 0.0).type_as(embeddings).sum(dim=1)
        return summed / attention_mask.unsqueeze(-1).expand(embeddings.size()).float().sum(dim=1)

    def encode(self, rows: Sequence[Row]) -> dict[str, list[Any]]:
        return {name: self.encoder.encode([r[name] for r in rows]) for name in self.input_segments}

    def input_lengths(self, encodings: Encodings) -> list[int]:
        return [max(len(e.ids) for e in row) for row in zip(*encodings.values(), strict=True)]

    def predict(self, rows: Sequence[Row], encodings: Encodings | None = None) -> CometOutput:
        if not all("ref" in r for r in rows):
            raise ValueError("this COMET model needs references")
        encoded = encodings if encodings is not None else self.encode(rows)
        src, mt, ref = (self.embed(*self.encoder.pad([e.ids for e in encoded[n]])) for n in self.input_segments)
        features = torch.cat((mt, ref, mt * ref, torch.abs(mt - ref), mt * src, torch.abs(mt - src)), dim=1)
        return CometOutput(self.estimator(features).view(-1).float(), {})


CometModel = UnifiedMetric | RegressionMetric
