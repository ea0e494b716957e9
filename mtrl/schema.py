"""The allowed range of a numeric config key, declared next to the key.

Every ``int``/``float`` field of a config class reads ``name: Annotated[int, Range(ge=1)] = 100``; the
recipe loader (:mod:`mtrl.recipe`) checks the value when it builds the class and names the key and the range
on one line (``train.steps: must be >= 1, got 0``). NaN and infinities are outside every range. This module
imports nothing from :mod:`mtrl`, so that every config module can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """Bounds, each optional (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <), and ``also``: values allowed besides
    (e.g. -1 for "off"). ``Range()`` allows any finite number."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[Any, ...] = ()

    def __contains__(self, value: Any) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low, low_op, low_bracket = (self.gt, ">", "(") if self.gt is not None else (self.ge, ">=", "[")
        high, high_op, high_bracket = (self.lt, "<", ")") if self.lt is not None else (self.le, "<=", "]")
        if low is not None and high is not None:
            text = f"in {low_bracket}{_num(low)}, {_num(high)}{high_bracket}"
        elif low is not None:
            text = f"{low_op} {_num(low)}"
        elif high is not None:
            text = f"{high_op} {_num(high)}"
        else:
            text = "a finite number"
        return " or ".join([text, *map(str, self.also)])


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


FINITE = Range()  # the range of a number nothing else bounds (the elements of a tuple)
