"""Error spans and severity maps: the data model every detector returns.

A span is a character interval ``[start, end)`` into the *exact* hypothesis
string that was scored, with an MQM severity. Severity maps turn spans into
reward values; token rewards are built from them in :mod:`mtrl.rewards`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mtrl.errors import MtrlError

SEVERITIES: tuple[str, ...] = ("minor", "major", "critical")


class SpanError(MtrlError, ValueError):
    """A span that cannot be used (unknown severity, outside its hypothesis...)."""


@dataclass(frozen=True)
class ErrorSpan:
    start: int
    end: int  # exclusive
    severity: str
    category: str | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise SpanError(
                f"unknown severity {self.severity!r}; allowed: {', '.join(SEVERITIES)}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ErrorSpan:
        """Build from a JSON-like dict (COMET / MQM field names); severities are case-insensitive."""
        try:
            start, end = int(d["start"]), int(d["end"])
        except (KeyError, TypeError, ValueError) as e:
            raise SpanError(f"span needs integer 'start' and 'end': {dict(d)!r}") from e
        severity = str(d.get("severity", "")).strip().lower()
        conf = d.get("confidence")
        return cls(start, end, severity, d.get("category") or None,
                   None if conf is None else float(conf))

    def to_dict(self, text: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"start": self.start, "end": self.end, "severity": self.severity}
        if text is not None:
            out["text"] = text[self.start:self.end]
        if self.category is not None:
            out["category"] = self.category
        if self.confidence is not None:
            out["confidence"] = self.confidence
        return out


def sanitize_spans(text: str, spans: Iterable[ErrorSpan]) -> list[ErrorSpan]:
    """Clip spans to the string, strip whitespace at their edges, drop empty ones.

    Rules (documented, never a crash): offsets are clipped to ``[0, len(text)]``;
    leading/trailing whitespace is trimmed (xCOMET spans usually start at the space
    before a word); a span that is empty or whitespace-only after that is dropped.
    The result is sorted by position.
    """
    n = len(text)
    out = []
    for s in spans:
        start, end = max(0, min(s.start, n)), max(0, min(s.end, n))
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            out.append(ErrorSpan(start, end, s.severity, s.category, s.confidence))
    return sorted(out, key=lambda s: (s.start, s.end))


def check_spans_inside(text: str, spans: Iterable[ErrorSpan]) -> None:
    """Raise :class:`SpanError` when a span lies (partly) outside ``text`` (for gold input)."""
    for s in spans:
        if not (0 <= s.start <= s.end <= len(text)):
            raise SpanError(
                f"span [{s.start}, {s.end}) lies outside its hypothesis of {len(text)} characters"
            )


@dataclass(frozen=True)
class SeverityMap:
    """Reward value of each severity (negative = penalty) and of error-free tokens.

    ``category_values`` overrides the severity value for (severity, category
    prefix) pairs, e.g. WMT's minor ``Fluency/Punctuation`` = -0.1; ``"*"``
    matches any severity.
    """

    values: Mapping[str, float]
    no_error: float = 0.0
    category_values: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def value(self, span: ErrorSpan) -> float:
        if span.category:
            cat = span.category.lower()
            for (sev, prefix), v in self.category_values.items():
                if sev in (span.severity, "*") and cat.startswith(prefix.lower()):
                    return v
        return float(self.values[span.severity])

    def penalty(self, spans: Iterable[ErrorSpan]) -> float:
        """Sum of span values (an MQM-style score; <= 0 for penalty maps)."""
        return sum(self.value(s) for s in spans)


SEVERITY_MAPS: dict[str, SeverityMap] = {
    # xCOMET's own MQM weights (comet/models/multitask/xcomet_metric.py).
    "xcomet": SeverityMap({"minor": -1.0, "major": -5.0, "critical": -10.0}),
    # Freitag et al. 2021 weights; "critical" is treated like Non-translation.
    "wmt-mqm": SeverityMap(
        {"minor": -1.0, "major": -5.0, "critical": -25.0},
        category_values={("*", "non-translation"): -25.0, ("minor", "fluency/punctuation"): -0.1},
    ),
}


def get_severity_map(spec: str | Mapping[str, Any] | SeverityMap, no_error: float | None = None) -> SeverityMap:
    """A named map (``xcomet``, ``wmt-mqm``) or custom values ``{minor: -1, major: -5, critical: -10}``.

    A custom mapping may also hold ``no_error``. ``no_error`` given here overrides both.
    """
    if isinstance(spec, SeverityMap):
        smap = spec
    elif isinstance(spec, str):
        if spec not in SEVERITY_MAPS:
            raise SpanError(
                f"unknown severity map {spec!r}; allowed: {', '.join(SEVERITY_MAPS)} or a mapping of "
                f"{', '.join(SEVERITIES)} to numbers"
            )
        smap = SEVERITY_MAPS[spec]
    else:
        spec = dict(spec)
        extra = set(spec) - set(SEVERITIES) - {"no_error"}
        if extra:
            raise SpanError(
                f"unknown key(s) in severity map: {', '.join(sorted(extra))}; allowed: "
                f"{', '.join(SEVERITIES)}, no_error"
            )
        missing = [s for s in SEVERITIES if s not in spec]
        if missing:
            raise SpanError(f"severity map is missing: {', '.join(missing)}")
        try:
            values = {s: float(spec[s]) for s in SEVERITIES}
            ne = float(spec.get("no_error", 0.0))
        except (TypeError, ValueError) as e:
            raise SpanError(f"severity map values must be numbers: {spec!r}") from e
        smap = SeverityMap(values, ne)
    if no_error is not None:
        smap = SeverityMap(smap.values, float(no_error), smap.category_values)
    return smap
