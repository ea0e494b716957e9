"""Error-span detectors: ``reference`` (embedded default), ``xcomet``, ``gold``; ``bleu``/``chrf`` (score only).

Modules are imported lazily so that the embedded default never pays for
``unbabel-comet``'s import time.
"""

from __future__ import annotations

import re
from typing import Any

from mtrl.detectors.base import Detection, Detector
from mtrl.errors import MtrlError

DETECTORS = ("reference", "xcomet", "gold", "bleu", "chrf")


def load_detector(name: str, **options: Any) -> Detector:
    """Build a detector by name; ``options`` go to its constructor (an unknown one is a user error)."""
    try:
        return _build(name, options)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise MtrlError(f"{name} detector: " + re.sub(r"^\S*__init__\(\) ", "", str(e))) from None


def _build(name: str, options: dict[str, Any]) -> Detector:
    if name == "reference":
        from mtrl.detectors.reference import ReferenceDetector

        return ReferenceDetector(**options)
    if name == "xcomet":
        from mtrl.detectors.xcomet import XCometDetector

        return XCometDetector(**options)
    if name == "gold":
        from mtrl.detectors.gold import GoldDetector

        return GoldDetector(**options)
    if name in ("bleu", "chrf"):
        from mtrl.detectors.metric import MetricDetector

        return MetricDetector(name, **options)
    raise MtrlError(f"unknown detector {name!r}; allowed: {', '.join(DETECTORS)}")


__all__ = ["DETECTORS", "Detection", "Detector", "load_detector"]
