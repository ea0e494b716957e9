"""Error-span detectors: ``reference`` (embedded default), ``xcomet``, ``gold``; ``bleu``/``chrf`` (score only).

Modules are imported lazily so that the embedded default never pays for
loading a model library it does not use.
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
DetectorDType = Literal["auto", "fp32", "fp16", "bf16"]
# Only the xcomet detector runs a model; these keys are an error for the others.
XCOMET_ONLY = ("model", "device", "dtype", "max_tokens")


@dataclass
class DetectorConfig:
    """The ``detector:`` section of a recipe (and of ``mtrl score/label`` options)."""

    name: DetectorName = "reference"
    model: str | None = None  # xcomet: hub id or local checkpoint (default Unbabel/XCOMET-XL)
    batch_size: Annotated[int, Range(ge=1)] = 16  # xcomet: the most rows per forward pass
    # xcomet, kept on one device: auto (cuda:0 when there is a GPU, else cpu), cpu, cuda or cuda:N
    # (a second GPU for the detector is common); not a Literal because of N, checked when built
    device: str | None = None
    dtype: DetectorDType | None = None  # xcomet: auto = fp16 on a GPU (as comet-score), fp32 on the CPU
    max_tokens: Annotated[int, Range(ge=1)] | None = None  # xcomet: padded subwords per forward pass (8192)
    use_reference: bool = False  # xcomet: QE (source + hypothesis) like Ramos et al., or with the reference
    path: str | None = None  # gold: annotated rows
    options: dict[str, Any] = field(default_factory=dict)  # more constructor options, e.g. reference: omission_weight

    def build(self) -> Detector:
        """The detector these settings describe (the one place that turns them into constructor options)."""
        if self.name != "xcomet":
            for key in XCOMET_ONLY:
                if getattr(self, key) not in (None, ""):
                    raise MtrlError(f"detector.{key} is only used by the xcomet detector, not {self.name}")
        opts: dict[str, Any] = {}
        if self.name == "xcomet":
            opts = {"model": self.model or DEFAULT_XCOMET, "batch_size": self.batch_size}
            # Unset keys keep XCometDetector's defaults; it checks the values (one-line MtrlError).
            opts |= {key: getattr(self, key) for key in ("device", "dtype", "max_tokens")
                     if getattr(self, key) is not None}
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
