"""Error spans + token intervals -> one reward per token (the span part of every reward mode).

Inputs come from :mod:`mtrl.rewards.alignment` (the decoded ``text`` and one ``(start, end)``
interval per token) and from a detector (:class:`~mtrl.detectors.base.Detection`).
This is on the hot path (every rollout of every step), so it is plain Python with
no per-character loops: spans are few, tokens are found by bisection.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mtrl.detectors.base import Detection
from mtrl.detectors.spans import ErrorSpan, SeverityMap, get_severity_map
from mtrl.errors import MtrlError
from mtrl.rewards.config import RewardConfig, allowed

TOKEN_REWARD_MODES = allowed("token_rewards")


def _prepare(text: str, spans: Iterable[ErrorSpan | Mapping[str, Any]], smap: SeverityMap) -> list[tuple[int, int, float, bool]]:
    """``(start, end, value, whitespace_only)`` per usable span.

    Same rules as :func:`mtrl.detectors.spans.sanitize_spans` (clip to the text, trim edge
    whitespace, drop empty spans) with one exception: a span that is non-empty but
    *only* whitespace (an MQM "extra/missing space" punctuation error) is kept as it
    is, not dropped, so its penalty still reaches a token (the one whose interval
    holds that whitespace, else the nearest). Dropping it would break conservation.
    """
    n = len(text)
    out = []
    for sp in spans:
        if not isinstance(sp, ErrorSpan):
            sp = ErrorSpan.from_dict(sp)
        s = 0 if sp.start < 0 else (n if sp.start > n else sp.start)
        e = 0 if sp.end < 0 else (n if sp.end > n else sp.end)
        if s >= e:
            continue
        ws_only = False
        if text[s].isspace() or text[e - 1].isspace():
            seg = text[s:e]
            core = seg.strip()
            if core:
                s += len(seg) - len(seg.lstrip())
                e -= len(seg) - len(seg.rstrip())
            else:
                ws_only = True
        out.append((s, e, smap.value(sp), ws_only))
    return out


def _nearest(offsets: Sequence[tuple[int, int]], s: int, e: int) -> int:
    """Index of the non-empty interval closest to ``[s, e)`` (ties: the later one); else the last token."""
    best, best_d = len(offsets) - 1, None
    for t, (ts, te) in enumerate(offsets):
        if ts >= te:
            continue
        d = ts - e if ts >= e else (s - te if te <= s else 0)
        if best_d is None or d <= best_d:
            best, best_d = t, d
    return best


def spans_to_token_rewards(
    text: str,
    offsets: Sequence[tuple[int, int]],
    spans: Iterable[ErrorSpan | Mapping[str, Any]],
    severity_map: SeverityMap | str | Mapping[str, Any],
    mode: str = "max",
) -> list[float]:
    """One reward per token (``len(offsets)`` values) from character error spans.

    ``max``: a token whose interval overlaps a span on at least one non-whitespace
    character gets the span's value; under several spans the most negative wins.
    ``spread``: each span's value is split over the tokens it overlaps in proportion
    to their overlapped non-whitespace characters (normalised by the total, so
    tokens sharing a split character share its part); Σ rewards of error tokens =
    Σ span values. A token under several spans gets the sum of its shares.
    Every other token (special, empty interval, whitespace only, outside spans)
    gets ``severity_map.no_error``.

    Span edge cases (never an error): spans are clipped to ``text``, edge whitespace
    is trimmed and empty spans are dropped (as :func:`~mtrl.detectors.spans.sanitize_spans`);
    a whitespace-only span is kept and blamed on the tokens that hold that
    whitespace; a span that no token covers on a non-whitespace character (a gap
    in the intervals, offsets that do not match ``text``) is attached to the nearest
    token with a non-empty interval (ties: the later), else to the last token, so
    ``spread`` always conserves the total as long as ``offsets`` is non-empty.
    """
    if not isinstance(severity_map, SeverityMap):
        severity_map = get_severity_map(severity_map)
    if mode not in TOKEN_REWARD_MODES:
        raise MtrlError(f"token_rewards: unknown value {mode!r}; allowed: {', '.join(TOKEN_REWARD_MODES)}")
    n = len(offsets)
    no_error = float(severity_map.no_error)
    out = [no_error] * n
    if not n or not spans:
        return out
    prepared = _prepare(text, spans, severity_map)
    if not prepared:
        return out
    starts = [o[0] for o in offsets]
    ends = [o[1] for o in offsets]
    monotone = starts == sorted(starts) and ends == sorted(ends)
    acc: dict[int, float] = {}
    spread = mode == "spread"
    for s, e, v, ws_only in prepared:
        hits: list[tuple[int, int]] = []
        t = bisect_right(ends, s) if monotone else 0
        while t < n:
            ts, te = offsets[t]
            if ts >= e and monotone:
                break
            a, b = (ts if ts > s else s), (te if te < e else e)
            if a < b:
                if ws_only:
                    w = b - a
                elif spread:  # non-whitespace characters in the overlap
                    w = len("".join(text[a:b].split()))
                else:
                    w = 0 if text[a:b].isspace() else 1
                if w:
                    hits.append((t, w))
            t += 1
        if not hits:
            hits = [(_nearest(offsets, s, e), 1)]
        if spread:
            total = sum(w for _, w in hits)
            for t, w in hits:
                acc[t] = acc.get(t, 0.0) + v * w / total
        else:
            for t, _ in hits:
                if t not in acc or v < acc[t]:
                    acc[t] = v
    for t, v in acc.items():
        out[t] = v
    return out


def token_rewards(
    detection: Detection,
    text: str,
    offsets: Sequence[tuple[int, int]],
    config: RewardConfig,
    sentence_score: float | None = None,
) -> list[float]:
    """Per-token rewards of one hypothesis under ``config.mode``, before ``config.scale``.

    ``offsets`` holds one interval per token; the last token (EOS when it was generated) is the final token.
    ``token``: the spans' values on the tokens they cover (:func:`spans_to_token_rewards`) plus the detection's
    ``omission_penalty`` (content left out, which has no span) on the final token; ``sentence``:
    ``detection.score`` on the final token and 0.0 elsewhere; ``hybrid``: the span values plus ``hybrid_weight``
    x ``sentence_score`` (another scorer's, e.g. chrF, which carries what spans cannot: content left out), or x
    ``detection.score`` when it is None, on the final token. ``r3hf`` rewards need the scores of every prefix:
    :class:`mtrl.rewards.redistribution.Redistributor` gives them.
    """
    n = len(offsets)
    if not n:
        return []
    mode = config.mode
    if mode == "r3hf":
        raise ValueError("r3hf rewards come from mtrl.rewards.redistribution (they need prefix scores)")
    if mode == "sentence":
        out = [0.0] * n
        out[-1] = float(detection.score)
        return out
    out = spans_to_token_rewards(text, offsets, detection.spans, config.severity(), config.token_rewards)
    if mode == "token":  # an omission has no span: it belongs to the decision to stop
        out[-1] += detection.omission_penalty
    if mode == "hybrid":
        out[-1] += config.hybrid_weight * float(detection.score if sentence_score is None else sentence_score)
    return out

