"""``mtrl.score``: detect error spans and turn them into token-level rewards.

This is the Python face of ``mtrl score`` and the call trainers make on
rollouts. Flow: detector -> sanitised spans + sentence score -> (with a
tokenizer) per-token rewards through :mod:`mtrl.rewards`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from mtrl.detectors import Detection, Detector, load_detector
from mtrl.detectors.gold import gold_detection
from mtrl.errors import MtrlError
from mtrl.rewards import RewardConfig, token_rewards
from mtrl.spans import SEVERITIES, ErrorSpan


@dataclass
class ScoredSegment:
    """One hypothesis: its spans (offsets into the hypothesis), score and optional token rewards."""

    hypothesis: str
    spans: list[ErrorSpan]
    score: float
    truncated: bool = False
    tokens: list[str] | None = None
    token_rewards: list[float] | None = None
    token_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spans": [s.to_dict(self.hypothesis) for s in self.spans],
            "score": self.score,
        }
        if self.truncated:
            out["truncated"] = True
        if self.tokens is not None:
            out["tokens"] = self.tokens
            out["token_ids"] = self.token_ids
            out["token_rewards"] = self.token_rewards
        return out


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer from a local path or hub id; one clear error when it cannot be had."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise MtrlError(
            f"cannot load tokenizer {name_or_path!r} ({str(e).splitlines()[0][:160]}); "
            "give a local directory saved with save_pretrained, or a hub id when online"
        ) from None


def hypothesis_offsets(tokenizer, hypothesis: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``hypothesis`` as a target sequence and each token's interval in it.

    Fast tokenizers give offsets into the exact string. Slow ones (e.g. Marian's
    SentencePiece) are decoded token by token and, where the decoded text differs
    from the input (normalisation), projected back onto it through a character
    alignment. Special tokens get empty intervals.
    """
    from mtrl.alignment import token_offsets

    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text_target=hypothesis, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        special = set(tokenizer.all_special_ids)
        offsets = [(0, 0) if t in special else (int(a), int(b)) for t, (a, b) in zip(ids, enc["offset_mapping"])]
        return ids, offsets
    ids = list(tokenizer(text_target=hypothesis)["input_ids"])
    text, offsets = token_offsets(tokenizer, ids)
    if text != hypothesis:
        offsets = _project_offsets(text, hypothesis, offsets)
    return ids, offsets


def _project_offsets(src: str, dst: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Map intervals in ``src`` onto ``dst`` through a character alignment."""
    pos = [0] * (len(src) + 1)
    for a, b, size in difflib.SequenceMatcher(None, src, dst, autojunk=False).get_matching_blocks():
        for k in range(size + 1):
            if a + k <= len(src):
                pos[a + k] = b + k
    for i in range(1, len(pos)):  # unmatched characters map forward monotonically
        pos[i] = max(pos[i], pos[i - 1])
    return [(pos[s], pos[e]) if e > s else (pos[s], pos[s]) for s, e in offsets]


def score(
    hypotheses: Sequence[str],
    sources: Sequence[str] | None = None,
    references: Sequence[str | None] | None = None,
    *,
    detector: str | Detector = "reference",
    detector_options: dict[str, Any] | None = None,
    gold_spans: Sequence[Sequence[ErrorSpan]] | None = None,
    tokenizer: Any = None,
    reward: RewardConfig | dict[str, Any] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[ScoredSegment]:
    """Score hypotheses; with a ``tokenizer`` (object or name) also give per-token rewards.

    ``gold_spans`` (one list per row) replaces the detector with the given annotations.
    ``reward`` is a :class:`mtrl.rewards.RewardConfig` (or its fields as a dict).
    """
    n = len(hypotheses)
    sources = list(sources) if sources is not None else [""] * n
    if len(sources) != n or (references is not None and len(references) != n):
        raise MtrlError("sources, hypotheses and references must have the same number of rows")
    cfg = reward if isinstance(reward, RewardConfig) else RewardConfig(**(reward or {}))
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if cfg.mode == "hybrid" and (cfg.scorer != "detector" or cfg.hybrid_sentence != "last"):
        raise MtrlError(f"reward mode hybrid with scorer {cfg.scorer!r} and hybrid_sentence {cfg.hybrid_sentence!r} "
                        "is a training reward (mtrl train); here hybrid adds the detector's own score on the last "
                        "token (scorer: detector, hybrid_sentence: last)")
    if cfg.mode == "r3hf":
        return _score_r3hf(list(hypotheses), sources, references, detector, detector_options, tokenizer, cfg)
    if gold_spans is not None:
        if len(gold_spans) != n:
            raise MtrlError("gold_spans must have one list of spans per hypothesis")
        detections = [gold_detection(h, s) for h, s in zip(hypotheses, gold_spans)]
    else:
        det = load_detector(detector, **(detector_options or {})) if isinstance(detector, str) else detector
        if det.needs_reference and (references is None or any(not (r or "").strip() for r in references)):
            missing = 1 + next((i for i, r in enumerate(references or [None]) if not (r or "").strip()), 0)
            raise MtrlError(f"the {det.name} detector needs a reference for every row (row {missing} has none)")
        detections = detect_batched(det, sources, list(hypotheses), references, batch_size, progress)

    out = []
    for hyp, d in zip(hypotheses, detections):
        seg = ScoredSegment(hyp, d.spans, d.score, d.truncated, extra=d.extra)
        if tokenizer is not None:
            ids, offsets = hypothesis_offsets(tokenizer, hyp)
            seg.tokens, seg.token_ids = tokenizer.convert_ids_to_tokens(ids), ids
            seg.token_rewards = token_rewards(d, hyp, offsets, cfg)
        out.append(seg)
    return out


def _score_r3hf(hypotheses, sources, references, detector, detector_options, tokenizer, cfg) -> list[ScoredSegment]:
    """R3HF: every prefix scored by the sentence scorer; token rewards are the score differences."""
    from mtrl.redistribution import Redistributor, load_scorer

    if tokenizer is None:
        raise MtrlError("the r3hf reward mode needs a tokenizer (--tokenizer): rewards are per token")
    det = None
    if cfg.scorer == "detector":
        det = load_detector(detector, **(detector_options or {})) if isinstance(detector, str) else detector
    scorer = load_scorer(cfg.scorer, det, cfg.scorer_model)
    if scorer.needs_reference and (references is None or any(not (r or "").strip() for r in references)):
        raise MtrlError(f"the {scorer.name} scorer needs a reference for every row")
    encoded = [hypothesis_offsets(tokenizer, h) for h in hypotheses]
    per_token, full = Redistributor(scorer, cfg.r3hf_level)(sources, hypotheses, [o for _, o in encoded], references)
    return [ScoredSegment(h, [], s, tokens=tokenizer.convert_ids_to_tokens(ids), token_rewards=r, token_ids=ids)
            for h, s, (ids, _), r in zip(hypotheses, full, encoded, per_token)]


def detect_batched(
    det: Detector,
    sources: Sequence[str],
    hypotheses: Sequence[str],
    references: Sequence[str | None] | None,
    batch_size: int,
    progress: bool = False,
) -> list[Detection]:
    """Run a detector over chunks of rows, with a progress bar on stderr."""
    chunk = max(256, 16 * batch_size)
    out: list[Detection] = []
    with tqdm(total=len(hypotheses), desc=f"detect ({det.name})", unit="seg", disable=not progress,
              leave=False) as bar:
        for i in range(0, len(hypotheses), chunk):
            refs = None if references is None else references[i:i + chunk]
            out.extend(det.detect(sources[i:i + chunk], hypotheses[i:i + chunk], refs))
            bar.update(min(chunk, len(hypotheses) - i))
    return out


def summarize(segments: Sequence[ScoredSegment]) -> str:
    """One line: segments, spans by severity, mean score (and truncations if any)."""
    counts = {s: 0 for s in SEVERITIES}
    for seg in segments:
        for sp in seg.spans:
            counts[sp.severity] += 1
    mean = sum(s.score for s in segments) / max(1, len(segments))
    line = (f"{len(segments)} segments, spans: " + ", ".join(f"{v} {k}" for k, v in counts.items())
            + f", mean score {mean:.4f}")
    truncated = sum(s.truncated for s in segments)
    if truncated:
        line += f", {truncated} truncated (too long for the detector: spans may be missing)"
    return line
