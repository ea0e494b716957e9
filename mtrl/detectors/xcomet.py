"""xCOMET error spans (mtrl's own :mod:`mtrl.comet` model): a resident model, with the quirks of its span decoder repaired.

The model is loaded once, lazily, on the first :meth:`XCometDetector.detect` (or an explicit
:meth:`XCometDetector.load`, which a CLI can call up front to fail fast), so that building a
detector from a recipe is cheap; :meth:`XCometDetector.from_model` wraps a model already in
memory. It then stays on its device (``device``; ``auto`` is this process's GPU) in its precision
(``dtype``), and scores length-bucketed batches (at most ``batch_size`` rows and ``max_tokens``
padded subwords) under ``torch.inference_mode()``; reference and QE rows go through the same
resident model in one call. In fp32 the scores and spans are those of unbabel-comet 2.2.7
(``tests/test_comet_parity.py``).

Quirks handled (comet 2.2.7, see ``shared/notes/papers.md`` section 4):

* span offsets come from Metaspace subwords and start at the space before a word;
  :func:`mtrl.detectors.spans.sanitize_spans` strips it;
* ``<s>`` can be tagged: its offset is ``(0, 0)``, so a span of only ``<s>`` is empty (dropped)
  and a span that starts with it starts at 0;
* a span that runs into ``</s>`` (offset ``(0, 0)``) would get ``end = 0 < start``; it really
  reaches the end of what was scored, so it is extended there;
* offsets past the end of the string are clipped;
* each segment is cut to ``max_positions - 2`` subwords and the concatenated input to
  ``max_positions``: errors after the cut are never reported. Such rows get
  ``Detection.truncated = True`` (and ``extra["scored_chars"]`` when the hypothesis itself
  was cut); :attr:`XCometDetector.last_truncated` counts them for the last call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from mtrl.comet import (
    DEFAULT_MAX_TOKENS,
    UnifiedMetric,
    check_device,
    check_dtype,
    load_comet,
    place,
    predict,
    resolve_device,
    resolve_dtype,
)
from mtrl.comet.encoder import encode_segments
from mtrl.detectors.base import DEFAULT_XCOMET, Detection, Detector
from mtrl.detectors.spans import ErrorSpan, sanitize_spans
from mtrl.errors import MtrlError

DEFAULT_MODEL = DEFAULT_XCOMET
HUB_HINT = ("point at a local checkpoint with --model /path/to/XCOMET-XL/checkpoints/model.ckpt "
            "(or the detector's `model` option in a recipe)")


def spans_from_comet(hyp: str, error_spans: Sequence[Mapping[str, Any]],
                     scored_chars: int | None = None) -> list[ErrorSpan]:
    """comet's ``metadata.error_spans[i]`` dicts -> sanitised :class:`ErrorSpan` on ``hyp``.

    ``scored_chars`` is where the scored part of ``hyp`` ends when it was truncated.
    """
    limit = len(hyp) if scored_chars is None else scored_chars
    spans = []
    for d in error_spans:
        start, end = int(d["start"]), int(d["end"])
        if end == 0 < start:  # ran into </s>, whose offset is (0, 0)
            end = limit
        conf = d.get("confidence")
        spans.append(ErrorSpan(start, end, str(d["severity"]).strip().lower(),
                               confidence=None if conf is None else float(conf)))
    return sanitize_spans(hyp, spans)  # strips the leading space, clips, drops empty and end < start


def truncation(tokenizer: Any, max_positions: int, mt: Sequence[str],
               others: Sequence[Sequence[str]]) -> list[tuple[bool, int | None]]:
    """Per row: (was any input cut?, end of the scored part of ``mt`` if ``mt`` itself was cut).

    Mirrors comet: every segment is cut to ``max_positions - 2`` subwords (specials
    included), then ``<s> mt </s></s> src </s></s> ref </s>`` (the sum of the segment
    lengths) is cut to ``max_positions``.
    """
    segments = [encode_segments(tokenizer, max_positions, texts) for texts in (mt, *others)]
    return _cuts(segments, max_positions)[0]


def _cuts(segments: Sequence[Sequence[Any]], max_positions: int) -> tuple[list[tuple[bool, int | None]], list[int]]:
    """:func:`truncation` from the cut encodings (mt first), and each row's joined length (for batching)."""
    cuts, lengths = [], []
    for row in zip(*segments, strict=True):
        total = sum(len(e.ids) for e in row)
        mt_cut = bool(row[0].overflowing)
        scored = row[0].offsets[-2][1] if mt_cut else None  # the last subword before </s>
        cuts.append((mt_cut or any(e.overflowing for e in row[1:]) or total > max_positions, scored))
        lengths.append(min(total, max_positions))
    return cuts, lengths


@contextmanager
def _matmul_precision(device: Any) -> Iterator[None]:
    """TF32 matmuls for fp32 on a GPU (as ``comet-score`` sets), only for the call: the policy is not affected."""
    if device.type != "cuda":
        yield
        return
    import torch

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


class XCometDetector(Detector):
    """Error spans and sentence scores from an xCOMET checkpoint (``Unbabel/XCOMET-XL`` by default)."""

    name = "xcomet"
    needs_reference = False  # falls back to QE mode without references

    def __init__(self, model: str = DEFAULT_MODEL, batch_size: int = 8, device: str = "auto",
                 dtype: str = "auto", max_tokens: int = DEFAULT_MAX_TOKENS, use_reference: bool = True,
                 progress: bool = False) -> None:
        """``model``: hub id, model folder or ``.ckpt``; ``batch_size``: most rows per forward pass;
        ``device``: auto (this process's GPU if there is one, else cpu), cpu, cuda or cuda:N; ``dtype``: auto
        (fp16 on a GPU, fp32 on the CPU), fp32, fp16 or bf16; ``max_tokens``: most padded subwords
        per forward pass (rows x longest input); ``use_reference``: False scores every row in QE mode."""
        for key, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MtrlError(f"detector.{key}: must be an integer >= 1, got {value!r}")
        self.model_name = str(model)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.device = check_device(device)
        self.dtype = check_dtype(dtype)
        self.use_reference = use_reference
        self.progress = progress
        self.last_truncated = 0  # rows cut to the encoder's length limit in the last detect()
        self._model: Any = None
        self._device: Any = None  # torch.device / torch.dtype once resolved
        self._dtype: Any = None

    @classmethod
    def from_model(cls, model: Any, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                   max_tokens: int = DEFAULT_MAX_TOKENS, use_reference: bool = True,
                   name: str = "in-memory") -> XCometDetector:
        """Wrap a :mod:`mtrl.comet` model already built (e.g. random weights for a benchmark): no checkpoint read.

        The model is moved to ``device``/``dtype`` now and put in eval mode; ``name`` only labels it.
        """
        det = cls(name, batch_size=batch_size, device=device, dtype=dtype, max_tokens=max_tokens,
                  use_reference=use_reference)
        det._model = det._place(model)
        return det

    def load(self) -> Any:
        """Load the model once and put it on its device (raises :class:`MtrlError` with a one-line reason)."""
        if self._model is None:
            resolve_dtype(self.dtype, resolve_device(self.device))  # a bad device fails before the slow load
            self._model = self._place(load_comet(self.model_name, label="xcomet", hint=HUB_HINT))
        return self._model

    def _place(self, model: Any) -> Any:
        """Eval mode on the resolved device and dtype; checks that the model decodes error spans."""
        if not isinstance(model, UnifiedMetric) or not model.word_level:
            raise MtrlError(f"xcomet: {self.model_name} is not a word-level COMET model (XCOMETMetric or a "
                            "UnifiedMetric trained with word_level_training); it gives no error spans")
        self._device = resolve_device(self.device)
        self._dtype = resolve_dtype(self.dtype, self._device)
        return place(model, self._device, self._dtype)

    def _resident(self) -> Any:
        """The loaded model, moved back if something else moved it."""
        model = self.load()
        p = next(model.parameters())
        if p.device != self._device or p.dtype != self._dtype or model.training:
            place(model, self._device, self._dtype)
        return model

    def detect(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str | None] | None = None) -> list[Detection]:
        """Rows with a reference are scored in reference mode, the others (None or "") in QE mode."""
        n = len(hypotheses)
        if len(sources) != n or (references is not None and len(references) != n):
            raise MtrlError(f"xcomet: got {len(sources)} sources, {n} hypotheses and "
                            f"{'no' if references is None else len(references)} references")
        self.last_truncated = 0
        if n == 0:
            return []
        model = self._resident()
        has_ref = [self.use_reference and references is not None and bool(references[i]) for i in range(n)]
        results: list[Detection | None] = [None] * n
        with _matmul_precision(self._device):
            for with_ref in (True, False):
                rows = [i for i in range(n) if has_ref[i] == with_ref]
                if rows:
                    refs = [references[i] for i in rows] if with_ref else None  # type: ignore[index]
                    dets = self._detect_rows(model, [sources[i] for i in rows], [hypotheses[i] for i in rows], refs)
                    for i, d in zip(rows, dets, strict=True):
                        results[i] = d
        self.last_truncated = sum(d.truncated for d in results)  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    def _detect_rows(self, model: Any, srcs: list[str], hyps: list[str], refs: list[str] | None
                     ) -> list[Detection]:
        """Rows of one mode, in length buckets; truncation measured here, the spans repaired."""
        rows = [{"src": s, "mt": h} | ({} if refs is None else {"ref": refs[i]})
                for i, (s, h) in enumerate(zip(srcs, hyps, strict=True))]
        encodings = model.encode(rows)  # once: for the truncation flags, the buckets and the model
        cuts, lengths = _cuts([encodings["mt"], *(v for k, v in encodings.items() if k != "mt")],
                              model.encoder.max_positions)
        scored = predict(model, rows, self.batch_size, self.max_tokens, lengths, self.progress, encodings)
        dets = []
        for hyp, row, (cut, scored_chars) in zip(hyps, scored, cuts, strict=True):
            extra: dict[str, Any] = {"mode": "qe" if refs is None else "ref", **row.extra}
            if scored_chars is not None:
                extra["scored_chars"] = scored_chars
            spans = spans_from_comet(hyp, row.error_spans or [], scored_chars)
            dets.append(Detection(spans, row.score, truncated=cut, extra=extra))
        return dets
