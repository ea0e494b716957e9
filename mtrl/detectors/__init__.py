"""Error-span detectors: ``reference`` (embedded default), ``xcomet``, ``gold``; ``bleu``/``chrf`` (score only).

Modules are imported lazily so that the embedded default never pays for
``unbabel-comet``'s import time.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from mtrl.detectors.base import DEFAULT_XCOMET, Detection, Detector
from mtrl.errors import MtrlError
from mtrl.schema import Range

DetectorName = Literal["reference", "xcomet", "gold", "bleu", "chrf"]  # bleu/chrf: a score, no spans
DETECTORS: tuple[str, ...] = typing.get_args(DetectorName)


@dataclass
class DetectorConfig:
    """The ``detector:`` section of a recipe (and of ``mtrl score/label`` options)."""

    name: DetectorName = "reference"
    model: str | None = None  # xcomet: hub id or local checkpoint (default Unbabel/XCOMET-XL)
    batch_size: Annotated[int, Range(ge=1)] = 16
    use_reference: bool = False  # xcomet: QE (source + hypothesis) like Ramos et al., or with the reference
    path: str | None = None  # gold: annotated rows
    options: dict[str, Any] = field(default_factory=dict)  # more constructor options, e.g. reference: omission_weight

    def build(self) -> Detector:
        """The detector these settings describe (the one place that turns them into constructor options)."""
        if self.model and self.name != "xcomet":
            raise MtrlError(f"detector.model is only used by the xcomet detector, not {self.name}")
        opts: dict[str, Any] = {}
        if self.name == "xcomet":
            opts = {"model": self.model or DEFAULT_XCOMET, "batch_size": self.batch_size}
        elif self.name == "gold":
            if not self.path:
                raise MtrlError("the gold detector needs detector.path (a file of annotated rows)")
            opts = {"path": self.path}
        return load_detector(self.name, **opts, **self.options)


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


__all__ = ["DEFAULT_XCOMET", "DETECTORS", "Detection", "Detector", "DetectorConfig", "load_detector"]
