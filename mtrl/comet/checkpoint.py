"""Unbabel's COMET checkpoints, loaded as they are published, weights-only, without unbabel-comet or Lightning.

A model folder holds ``hparams.yaml`` (its ``class_identifier`` names the model type) and
``checkpoints/model.ckpt`` (a Lightning checkpoint: ``state_dict`` and ``hyper_parameters``, which
are the constructor arguments). The checkpoint is read with ``torch.load(weights_only=True)``: a file
that needs to run code to load is refused. ``hyper_parameters["pretrained_model"]`` names the encoder
whose config and tokenizer are read (its weights are in the checkpoint): a hub id, or a folder, which
is looked for next to the model folder when the stored path is relative or no longer exists.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

from mtrl.comet.encoder import ENCODERS, CometEncoder
from mtrl.comet.models import CometModel, RegressionMetric, UnifiedMetric
from mtrl.errors import MtrlError, one_line

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
MODEL_TYPES = ("xcomet_metric", "unified_metric", "regression_metric")
# Training-only buffers (loss weights, layer dropout) and buffers that transformers rebuilds itself.
IGNORED_KEYS = re.compile(r"^(wordloss|sentloss)\.|(^|\.)(position_ids|token_type_ids|dropout_mask|dropout_fill)$")


def resolve_checkpoint(model: str, label: str = "comet", hint: str = "") -> Path:
    """A local ``.ckpt`` file or model folder, or a hub id looked up in (then fetched into) the HF cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / "model.ckpt"
    if p.is_file():
        return p
    if not HUB_ID.match(model) or model.endswith(".ckpt"):
        raise MtrlError(f"{label}: checkpoint not found: {p} (expected a .ckpt file or a folder "
                        "with checkpoints/model.ckpt)")
    from huggingface_hub import snapshot_download

    hint = f"; {hint}" if hint else ""
    try:
        return Path(snapshot_download(repo_id=model, local_files_only=True)) / "checkpoints" / "model.ckpt"
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):  # as huggingface_hub reads it
        raise MtrlError(f"{label}: model {model!r} could not be loaded without network (not in the "
                        f"Hugging Face cache and HF_HUB_OFFLINE is set){hint}")
    try:
        return Path(snapshot_download(repo_id=model)) / "checkpoints" / "model.ckpt"
    except Exception as e:
        raise MtrlError(f"{label}: model {model!r} is not in the Hugging Face cache and could not be downloaded "
                        f"({one_line(e, 300)}){hint}") from None


def encoder_location(model_dir: Path, stored: str) -> str:
    """Where the encoder's config and tokenizer are: ``stored`` (a hub id or an existing folder), or a
    folder of that name next to the model folder (comet stores absolute paths, which break on a move)."""
    p = Path(stored).expanduser()
    if p.is_absolute() and p.exists():
        return str(p)
    candidate = model_dir / (p.name if p.is_absolute() else p)
    if candidate.exists():
        return os.path.abspath(candidate)
    return stored


def read_checkpoint(ckpt: Path, label: str = "comet") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hyper_parameters, state_dict)`` of a checkpoint, read weights-only."""
    import torch

    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise MtrlError(f"{label}: {ckpt} holds more than weights and plain values, so mtrl does not load it "
                        f"({one_line(e, 200)})") from None
    except Exception as e:
        raise MtrlError(f"{label}: could not read {ckpt}: {one_line(e, 300)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise MtrlError(f"{label}: {ckpt} is not a COMET checkpoint (no state_dict)")
    return dict(data.get("hyper_parameters") or {}), data["state_dict"]


def load_comet(model: str, label: str = "comet", hint: str = "") -> CometModel:
    """The COMET model at ``model`` (hub id, model folder or ``.ckpt``), in eval mode on the CPU in fp32."""
    import yaml

    ckpt = resolve_checkpoint(model, label, hint)
    ckpt = Path(os.path.abspath(ckpt))  # not resolve(): HF cache files are symlinks into blobs/
    model_dir = ckpt.parents[1]
    hparams_file = model_dir / "hparams.yaml"
    if not hparams_file.is_file():
        raise MtrlError(f"{label}: {hparams_file} is missing (a COMET model folder has it next to checkpoints/)")
    file_hparams = yaml.safe_load(hparams_file.read_text()) or {}
    identifier = file_hparams.get("class_identifier")
    if identifier not in MODEL_TYPES:
        raise MtrlError(f"{label}: {hparams_file}: class_identifier {identifier!r} is not supported "
                        f"(supported: {', '.join(MODEL_TYPES)})")
    hparams, state = read_checkpoint(ckpt, label)
    if file_hparams.get("layer_transformation") == "sparsemax_patch":  # comet >= 2.2.4 runs these with softmax
        hparams["layer_transformation"] = "softmax"
    try:
        encoder = build_encoder(hparams, model_dir)
        comet = (RegressionMetric(encoder, hparams) if identifier == "regression_metric"
                 else UnifiedMetric(encoder, hparams, xcomet=identifier == "xcomet_metric"))
    except MtrlError:
        raise
    except Exception as e:
        raise MtrlError(f"{label}: could not build the model of {ckpt}: {one_line(e, 300)}") from None
    load_weights(comet, state, ckpt, label)
    return comet.eval()


def build_encoder(hparams: dict[str, Any], model_dir: Path) -> CometEncoder:
    """The encoder named by ``encoder_model``/``pretrained_model``, with random weights (the checkpoint has them)."""
    from transformers import AutoConfig

    kind = hparams.get("encoder_model", "XLM-RoBERTa")
    if kind not in ENCODERS:
        raise MtrlError(f"encoder_model {kind!r} is not supported (supported: {', '.join(ENCODERS)})")
    where = encoder_location(model_dir, str(hparams.get("pretrained_model", "")))
    try:
        config = AutoConfig.from_pretrained(where)
        tokenizer = load_tokenizer(where)
    except Exception as e:
        raise MtrlError(f"the encoder {where!r} (config and tokenizer) could not be loaded: {one_line(e, 300)}") from None
    return CometEncoder(kind, config, tokenizer)


def load_tokenizer(where: str) -> Any:
    """The encoder's tokenizer as comet ran it: ``tokenizer.json`` as it is, when there is one.

    transformers 5's ``XLMRobertaTokenizer`` rebuilds the pipeline from its own definition (no
    NFKC normaliser, a whitespace pre-split): other subwords and offsets than comet's on some text.
    A tokenizer published without ``tokenizer.json`` is converted by transformers.
    """
    from transformers import PreTrainedTokenizerFast, XLMRobertaTokenizer

    try:
        return PreTrainedTokenizerFast.from_pretrained(where)
    except Exception:
        return XLMRobertaTokenizer.from_pretrained(where)


def load_weights(model: Any, state: dict[str, Any], ckpt: Path, label: str) -> None:
    """The checkpoint's weights into ``model``; a missing or unknown weight is an error that names it."""
    state = {k: v for k, v in state.items() if not IGNORED_KEYS.search(k)}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes that do not fit: the encoder config does not match the weights
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), one_line(e, 200))
        raise MtrlError(f"{label}: {ckpt}: {detail}") from None
    missing = [k for k in result.missing_keys if not IGNORED_KEYS.search(k)]
    for what, keys in (("misses", missing), ("has unknown", result.unexpected_keys)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise MtrlError(f"{label}: {ckpt} {what} weights for this model type: {', '.join(keys[:3])}{more}")
