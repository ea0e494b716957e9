"""``mtrl.score``: spans, scores and token-level rewards of given translations.

The Python face of ``mtrl score``: the rows go through the same
:class:`mtrl.rewards.Rewarder` that training calls on its rollouts, so any
reward a recipe trains on can be computed and written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from mtrl.detectors import Detector, load_detector
from mtrl.detectors.gold import gold_detection
from mtrl.detectors.spans import SEVERITIES, ErrorSpan
from mtrl.errors import MtrlError
from mtrl.rewards import RewardConfig, Rewarder


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
    guards: list[str] | None = None  # the reward guards it trips (None: the guards were off)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spans": [s.to_dict(self.hypothesis) for s in self.spans],
            "score": self.score,
        }
        if self.truncated:
            out["truncated"] = True
        if self.guards is not None:
            out["guards"] = self.guards
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


def score(
    hypotheses: Sequence[str],
    sources: Sequence[str] | None = None,
    references: Sequence[str | None] | None = None,
    *,
    rewarder: Rewarder | None = None,
    detector: str | Detector = "reference",
    detector_options: dict[str, Any] | None = None,
    gold_spans: Sequence[Sequence[ErrorSpan]] | None = None,
    tokenizer: Any = None,
    reward: RewardConfig | dict[str, Any] | None = None,
    token_ids: Sequence[Sequence[int]] | None = None,
    chunk_size: int = 256,
    progress: bool = False,
    language: str | None = None,
) -> list[ScoredSegment]:
    """Score hypotheses with the reward pipeline; with a tokenizer also give per-token rewards.

    ``rewarder``: a ready :class:`mtrl.rewards.Rewarder` (what training uses); otherwise one is
    built from ``detector``, ``reward`` (a :class:`RewardConfig` or its fields) and ``tokenizer``
    (object or name). ``gold_spans`` (one list per row) replaces the detector with the given
    annotations. ``token_ids``: the tokens to reward (default: each hypothesis encoded once). ``language``: the
    target language of the reward guards (a name or an ISO 639-1 code), for a rewarder built here.
    """
    n = len(hypotheses)
    sources = list(sources) if sources is not None else [""] * n
    if len(sources) != n or (references is not None and len(references) != n):
        raise MtrlError("sources, hypotheses and references must have the same number of rows")
    if gold_spans is not None and len(gold_spans) != n:
        raise MtrlError("gold_spans must have one list of spans per hypothesis")
    if rewarder is None:
        cfg = reward if isinstance(reward, RewardConfig) else RewardConfig.from_dict(reward)
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        det = None  # given spans, or an R3HF scorer of its own, need no detector
        if gold_spans is None and cfg.uses_detector:
            det = load_detector(detector, **(detector_options or {})) if isinstance(detector, str) else detector
        rewarder = Rewarder(cfg, det, tokenizer, use_reference=references is not None, language=language)
    out: list[ScoredSegment] = []
    with tqdm(total=n, desc="score", unit="seg", disable=not progress, leave=False) as bar:
        for i in range(0, n, chunk_size):
            sl = slice(i, i + chunk_size)
            given = None if gold_spans is None else [gold_detection(h, sp) for h, sp in
                                                     zip(hypotheses[sl], gold_spans[sl])]
            res = rewarder(sources[sl], list(hypotheses[sl]), None if references is None else references[sl],
                           None if token_ids is None else token_ids[sl], detections=given)
            for j, (hyp, d) in enumerate(zip(hypotheses[sl], res.detections)):
                seg = ScoredSegment(hyp, d.spans, res.scores[j], d.truncated, extra=d.extra,
                                    guards=res.guards[j] if rewarder.guards_on else None)
                if res.token_ids is not None:
                    seg.token_ids, seg.token_rewards = res.token_ids[j], res.token_rewards[j]
                    seg.tokens = rewarder.tokenizer.convert_ids_to_tokens(seg.token_ids)
                out.append(seg)
            bar.update(len(res.scores))
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
    tripped: dict[str, int] = {}
    for seg in segments:
        for g in seg.guards or []:
            tripped[g] = tripped.get(g, 0) + 1
    if any(s.guards is not None for s in segments):
        line += ", guards tripped: " + (", ".join(f"{g} {n}" for g, n in sorted(tripped.items())) or "none")
    return line
