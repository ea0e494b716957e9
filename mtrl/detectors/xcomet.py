"""xCOMET error spans (``unbabel-comet``): a resident model, with the quirks of its span decoder repaired.

The model is loaded once, lazily, on the first :meth:`XCometDetector.detect` (or an explicit
:meth:`XCometDetector.load`, which a CLI can call up front to fail fast), so that building a
detector from a recipe is cheap; :meth:`XCometDetector.from_model` wraps a comet model already
in memory. It then stays on its device (``device``) in its precision (``dtype``).

``detect`` does not call comet's ``predict``: that builds a Lightning Trainer and a DataLoader
on every call, runs in fp32, moves the model back to the CPU when it ends, and would need one
call per mode. Instead it runs comet's own ``prepare_for_inference`` and ``predict_step`` on
length-bucketed batches (at most ``batch_size`` rows and ``max_tokens`` padded subwords) under
``torch.inference_mode()``; reference and QE rows go through the same resident model in one call.
In fp32 the scores and spans are those of ``predict`` (the tests check it).

Quirks handled (comet 2.2.7, see ``shared/notes/papers.md`` section 4):

* span offsets come from Metaspace subwords and start at the space before a word;
  :func:`mtrl.spans.sanitize_spans` strips it;
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

import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mtrl.detectors.base import DEFAULT_XCOMET, Detection, Detector
from mtrl.errors import MtrlError, one_line
from mtrl.spans import ErrorSpan, sanitize_spans

DEFAULT_MODEL = DEFAULT_XCOMET
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Loggers that print on every predict call ("GPU available: ...", "LOCAL_RANK ...", "Tip: ...").
_NOISY_LOGGERS = ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch",
                  "lightning.fabric", "comet", "transformers")


@contextmanager
def _quiet() -> Iterator[None]:
    """Mute Lightning/comet info logs and warnings for the duration of a call, then restore."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
    return _measure(tokenizer, max_positions, mt, others)[0]


def _measure(tokenizer: Any, max_positions: int, mt: Sequence[str], others: Sequence[Sequence[str]]
            ) -> tuple[list[tuple[bool, int | None]], list[int]]:
    """:func:`truncation` and, per row, the length of the concatenated input (for batching).

    One call of the Rust tokenizer for all segments: the ``transformers`` wrapper costs more than
    the tokenizing itself on short rows. Its truncation and padding settings are per call state
    that the wrapper sets again on each of its calls, so they are switched off here.
    """
    limit = max_positions - 2
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    n = len(mt)
    encodings = backend.encode_batch([*mt, *(text for seg in others for text in seg)])
    lens = [len(e.ids) for e in encodings]
    cuts, lengths = [], []
    for i in range(n):
        row = lens[i::n]  # mt, then each other segment
        total = sum(min(k, limit) for k in row)
        scored = encodings[i].offsets[limit - 2][1] if row[0] > limit else None
        cuts.append((any(k > limit for k in row) or total > max_positions, scored))
        lengths.append(min(total, max_positions))
    return cuts, lengths


def _encoder_override(model_dir: Path, stored: str) -> str | None:
    """Where the encoder files (config + tokenizer) of a moved or relative checkpoint are.

    comet stores ``pretrained_model`` as an absolute path when it is a local folder. None
    keeps the stored value (a hub id, or a path that still exists).
    """
    p = Path(stored).expanduser()
    if p.is_absolute():
        if p.exists():
            return None
        candidate = model_dir / p.name
    else:
        candidate = model_dir / p
    return os.path.abspath(candidate) if candidate.exists() else None


def load_comet_checkpoint(ckpt: str | Path) -> Any:
    """``comet.load_from_checkpoint`` that also works after the model folder was moved."""
    import yaml
    from comet.models import str2model

    ckpt = Path(os.path.abspath(ckpt))  # not resolve(): HF cache files are symlinks into blobs/
    model_dir = ckpt.parents[1]
    hparams_file = model_dir / "hparams.yaml"
    if not hparams_file.is_file():
        raise MtrlError(f"xcomet: {hparams_file} is missing (comet expects it next to checkpoints/)")
    hparams = yaml.safe_load(hparams_file.read_text()) or {}
    kwargs: dict[str, Any] = dict(checkpoint_path=ckpt, load_pretrained_weights=False,
                                  map_location="cpu", strict=False)
    override = _encoder_override(model_dir, str(hparams.get("pretrained_model", "")))
    if override is not None:
        kwargs["pretrained_model"] = override
    if hparams.get("layer_transformation") == "sparsemax_patch":  # as comet.load_from_checkpoint does
        kwargs["layer_transformation"] = "softmax"
    return str2model[hparams["class_identifier"]].load_from_checkpoint(**kwargs)


def resolve_checkpoint(model: str) -> Path:
    """A local ``.ckpt`` file or model folder, or a hub id looked up in (then fetched into) the HF cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / "model.ckpt"
    if p.is_file():
        return p
    if not _HUB_ID.match(model) or model.endswith(".ckpt"):
        raise MtrlError(f"xcomet: checkpoint not found: {p} (expected a .ckpt file or a folder "
                        "with checkpoints/model.ckpt)")
    from comet import download_model

    hint = ("point at a local checkpoint with --model /path/to/XCOMET-XL/checkpoints/model.ckpt "
            "(or the detector's `model` option in a recipe)")
    try:
        return Path(download_model(model, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):  # as huggingface_hub
        raise MtrlError(f"xcomet: model {model!r} could not be loaded offline (not in the Hugging Face "
                        f"cache and HF_HUB_OFFLINE is set); {hint}")
    try:
        return Path(download_model(model))
    except Exception as e:
        raise MtrlError(f"xcomet: model {model!r} could not be loaded offline or downloaded "
                        f"({one_line(e, 300)}); {hint}") from None


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEFAULT_MAX_TOKENS = 8192  # padded subwords per forward pass: XCOMET-XXL needs a few GB of activations for it


def check_device(device: str) -> str:
    """``device`` if it is one of auto, cpu, cuda, cuda:N (a one-line :class:`MtrlError` otherwise)."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise MtrlError(f"detector.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`DTYPES` (a one-line :class:`MtrlError` otherwise)."""
    if dtype not in DTYPES:
        raise MtrlError(f"detector.dtype: must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    return dtype


def resolve_device(device: str) -> Any:
    """``auto`` -> cuda:0 when there is a GPU, else cpu; a CUDA device must exist."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise MtrlError(f"detector.device: {device!r} asked for, but {count} CUDA device(s) are visible")
        dev = torch.device("cuda", index)
    return dev


def resolve_dtype(dtype: str, device: Any) -> Any:
    """``auto`` -> fp16 on a GPU (what comet's own ``comet-score`` runs in), fp32 on the CPU."""
    import torch

    check_dtype(dtype)
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


@contextmanager
def _decode_on_cpu(model: Any) -> Iterator[None]:
    """Run comet's span decoder on CPU copies of its inputs.

    ``decode`` reads one subword at a time (``topk`` + ``.item()``): on a GPU that is a device
    sync per subword. One copy per batch is cheaper, and fp32 confidences are what fp32 gives.
    """
    decode = model.decode

    def cpu_decode(subword_probs: Any, input_ids: Any, mt_offsets: Any) -> list:
        return decode(subword_probs.float().cpu(), input_ids.cpu(), mt_offsets)

    model.decode = cpu_decode
    try:
        yield
    finally:
        del model.decode  # back to the class's method


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


class XCometDetector(Detector):
    """Error spans and sentence scores from an xCOMET checkpoint (``Unbabel/XCOMET-XL`` by default)."""

    name = "xcomet"
    needs_reference = False  # falls back to QE mode without references

    def __init__(self, model: str = DEFAULT_MODEL, batch_size: int = 8, device: str = "auto",
                 dtype: str = "auto", max_tokens: int = DEFAULT_MAX_TOKENS, use_reference: bool = True,
                 progress: bool = False) -> None:
        """``model``: hub id, model folder or ``.ckpt``; ``batch_size``: most rows per forward pass;
        ``device``: auto (cuda:0 if there is a GPU, else cpu), cpu, cuda or cuda:N; ``dtype``: auto
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
        """Wrap a comet model object already built (e.g. random weights for a benchmark): no checkpoint read.

        The model is moved to ``device``/``dtype`` now and put in eval mode; ``name`` only labels it.
        """
        det = cls(name, batch_size=batch_size, device=device, dtype=dtype, max_tokens=max_tokens,
                  use_reference=use_reference)
        det._model = det._place(model)
        return det

    def load(self) -> Any:
        """Load the comet model once and put it on its device (raises :class:`MtrlError` with a one-line reason)."""
        if self._model is None:
            resolve_dtype(self.dtype, resolve_device(self.device))  # a bad device fails before the slow load
            with _quiet():
                ckpt = resolve_checkpoint(self.model_name)
                try:
                    model = load_comet_checkpoint(ckpt)
                except MtrlError:
                    raise
                except Exception as e:
                    raise MtrlError(f"xcomet: could not load {ckpt}: {one_line(e, 300)}") from None
            self._model = self._place(model)
        return self._model

    def _place(self, model: Any) -> Any:
        """Eval mode on the resolved device and dtype; checks that the model decodes error spans."""
        if not callable(getattr(model, "predict_step", None)) or not getattr(model, "word_level", False):
            raise MtrlError(f"xcomet: {self.model_name} is not a word-level comet model (XCOMETMetric or a "
                            "UnifiedMetric trained with word_level_training); it gives no error spans")
        self._device = resolve_device(self.device)
        self._dtype = resolve_dtype(self.dtype, self._device)
        model.eval()
        return model.to(device=self._device, dtype=self._dtype)

    def _resident(self) -> Any:
        """The loaded model, moved back if something else (e.g. comet's own ``predict``) moved it."""
        model = self.load()
        p = next(model.parameters())
        if p.device != self._device or p.dtype != self._dtype or model.training:
            model.eval()
            model.to(device=self._device, dtype=self._dtype)
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
        import torch

        model = self._resident()
        has_ref = [self.use_reference and references is not None and bool(references[i]) for i in range(n)]
        results: list[Detection | None] = [None] * n
        # Not _quiet(): setting logger levels clears every logger's cache, milliseconds per call.
        with (warnings.catch_warnings(), torch.inference_mode(), _matmul_precision(self._device),
              _decode_on_cpu(model)):
            warnings.simplefilter("ignore")
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
        """Rows of one mode, in length buckets, through comet's ``prepare_for_inference`` + ``predict_step``."""
        cuts, lengths = _measure(model.encoder.tokenizer, model.encoder.max_positions, hyps,
                                 [srcs] if refs is None else [srcs, refs])
        batches = buckets(lengths, self.batch_size, self.max_tokens)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="xcomet", unit="batch")
        dets: list[Detection | None] = [None] * len(hyps)
        for batch in batches:
            samples = [{"src": srcs[i], "mt": hyps[i]} | ({} if refs is None else {"ref": refs[i]}) for i in batch]
            inputs = tuple({k: v.to(self._device) if hasattr(v, "to") else v for k, v in seq.items()}
                           for seq in model.prepare_for_inference(samples))
            out = model.predict_step(inputs)
            meta = {k: v for k, v in out.metadata.items() if k != "error_spans"}
            values = [t.float().cpu().tolist() for t in (out.scores, *meta.values())]  # few small copies
            for j, i in enumerate(batch):
                cut, scored = cuts[i]
                extra: dict[str, Any] = {"mode": "qe" if refs is None else "ref"}
                for key, column in zip(meta, values[1:], strict=True):
                    extra[key.removesuffix("s")] = column[j]
                if scored is not None:
                    extra["scored_chars"] = scored
                spans = spans_from_comet(hyps[i], out.metadata["error_spans"][j], scored)
                dets[i] = Detection(spans, values[0][j], truncated=cut, extra=extra)
        return dets  # type: ignore[return-value]
