"""Where a COMET model runs, and in what precision: ``device`` auto | cpu | cuda | cuda:N, ``dtype`` auto | fp32 | fp16 | bf16.

``auto`` and ``cuda`` mean this process's GPU: ``cuda:LOCAL_RANK`` under a launcher that sets
``LOCAL_RANK`` (torchrun, accelerate), so that N training processes put N detectors on N GPUs
instead of all on the first; ``cuda:N`` is taken as given.
"""

from __future__ import annotations

import os
import re
from typing import Any

from mtrl.errors import MtrlError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "fp32", "fp16", "bf16")


def check_device(device: str, key: str = "detector.device") -> str:
    """``device`` if it is one of auto, cpu, cuda, cuda:N (a one-line :class:`MtrlError` otherwise)."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise MtrlError(f"{key}: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def check_dtype(dtype: str, key: str = "detector.dtype") -> str:
    """``dtype`` if it is one of :data:`DTYPES` (a one-line :class:`MtrlError` otherwise)."""
    if dtype not in DTYPES:
        raise MtrlError(f"{key}: must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    return dtype


def resolve_device(device: str, key: str = "detector.device") -> Any:
    """The ``torch.device``: auto -> this process's GPU if there is one, else the CPU; a CUDA device must exist."""
    import torch

    check_device(device, key)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cpu" or (device == "auto" and count == 0):
        return torch.device("cpu")
    index = int(device.partition(":")[2]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0")) % max(count, 1)
    if index >= count:
        raise MtrlError(f"{key}: {device!r} asked for, but {count} CUDA device(s) are visible")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str, device: Any, key: str = "detector.dtype") -> Any:
    """``auto`` -> fp16 on a GPU (what comet's own ``comet-score`` runs in), fp32 on the CPU."""
    import torch

    check_dtype(dtype, key)
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
