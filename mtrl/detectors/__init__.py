"""Error-span detectors: ``reference`` (embedded default), ``xcomet``, ``gold``.

Modules are imported lazily so that the embedded default never pays for
``unbabel-comet``'s import time.
"""

from __future__ import annotations

from typing import Any

from mtrl.detectors.base import Detection, Detector

DETECTORS = ("reference", "xcomet", "gold")


def load_detector(name: str, **options: Any) -> Detector:
    """Build a detector by name; ``options`` go to its constructor."""
    if name == "reference":
        from mtrl.detectors.reference import ReferenceDetector

        return ReferenceDetector(**options)
    if name == "xcomet":
        from mtrl.detectors.xcomet import XCometDetector

        return XCometDetector(**options)
    if name == "gold":
        from mtrl.detectors.gold import GoldDetector

        return GoldDetector(**options)
    raise ValueError(f"unknown detector {name!r}; allowed: {', '.join(DETECTORS)}")


__all__ = ["DETECTORS", "Detection", "Detector", "load_detector"]
