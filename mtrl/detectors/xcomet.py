"""xCOMET error spans (``unbabel-comet``), with the quirks of its span decoder repaired.

The model is loaded lazily, on the first :meth:`XCometDetector.detect` (or an explicit
:meth:`XCometDetector.load`, which a CLI can call up front to fail fast), so that building
a detector from a recipe is cheap.

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
    limit = max_positions - 2
    enc = tokenizer(list(mt), return_offsets_mapping=True)
    other_lens = [[len(ids) for ids in tokenizer(list(seg))["input_ids"]] for seg in others]
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        lens = [len(ids)] + [lens[i] for lens in other_lens]
        cut = any(n > limit for n in lens) or sum(min(n, limit) for n in lens) > max_positions
        scored = enc["offset_mapping"][i][limit - 2][1] if len(ids) > limit else None
        out.append((cut, scored))
    return out


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


class XCometDetector(Detector):
    """Error spans and sentence scores from an xCOMET checkpoint (``Unbabel/XCOMET-XL`` by default)."""

    name = "xcomet"
    needs_reference = False  # falls back to QE mode without references

    def __init__(self, model: str = DEFAULT_MODEL, batch_size: int = 8, gpus: int | None = None,
                 use_reference: bool = True, progress: bool = False) -> None:
        self.model_name = str(model)
        self.batch_size = batch_size
        self.gpus = gpus
        self.use_reference = use_reference
        self.progress = progress
        self.last_truncated = 0  # rows cut to the encoder's length limit in the last detect()
        self._model: Any = None

    def load(self) -> Any:
        """Load the comet model once (raises :class:`MtrlError` with a one-line reason)."""
        if self._model is None:
            with _quiet():
                ckpt = resolve_checkpoint(self.model_name)
                try:
                    self._model = load_comet_checkpoint(ckpt)
                except MtrlError:
                    raise
                except Exception as e:
                    raise MtrlError(f"xcomet: could not load {ckpt}: {one_line(e, 300)}") from None
            if self.gpus is None:
                import torch

                self.gpus = 1 if torch.cuda.is_available() else 0
        return self._model

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
        has_ref = [self.use_reference and references is not None and bool(references[i]) for i in range(n)]
        results: list[Detection | None] = [None] * n
        for with_ref in (True, False):
            rows = [i for i in range(n) if has_ref[i] == with_ref]
            if rows:
                refs = [references[i] for i in rows] if with_ref else None  # type: ignore[index]
                dets = self._detect_rows([sources[i] for i in rows], [hypotheses[i] for i in rows], refs)
                for i, d in zip(rows, dets, strict=True):
                    results[i] = d
        self.last_truncated = sum(d.truncated for d in results)  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    def _detect_rows(self, srcs: list[str], hyps: list[str], refs: list[str] | None) -> list[Detection]:
        """One comet ``predict`` call (length-sorted batches) for rows of the same mode."""
        model = self.load()
        samples = [{"src": s, "mt": h} for s, h in zip(srcs, hyps, strict=True)]
        if refs is not None:
            for sample, r in zip(samples, refs, strict=True):
                sample["ref"] = r
        with _quiet():
            cuts = truncation(model.encoder.tokenizer, model.encoder.max_positions, hyps,
                              [srcs] if refs is None else [srcs, refs])
            # num_workers=0: forking loader workers on every call costs more than tokenizing.
            out = model.predict(samples, batch_size=self.batch_size, gpus=self.gpus,
                                progress_bar=self.progress, num_workers=0, length_batching=True)
        meta = out.metadata
        dets = []
        for i, hyp in enumerate(hyps):
            cut, scored = cuts[i]
            extra: dict[str, Any] = {"mode": "qe" if refs is None else "ref"}
            for key, values in meta.items():
                if key != "error_spans":
                    extra[key.removesuffix("s")] = float(values[i])
            if scored is not None:
                extra["scored_chars"] = scored
            spans = spans_from_comet(hyp, meta["error_spans"][i], scored)
            dets.append(Detection(spans, float(out.scores[i]), truncated=cut, extra=extra))
        return dets
