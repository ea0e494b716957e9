"""Training recipes: a typed schema, validated on load.

A recipe is YAML whose sections are the config classes of the modules that use
them (``policy``/``generation``: :mod:`mtrl.policy`; ``detector``:
:mod:`mtrl.detectors`; ``reward``: :mod:`mtrl.rewards`; ``algorithm``: the chosen
algorithm's own config in :mod:`mtrl.algorithms`; ``offline``: :mod:`mtrl.label`).
Loading checks every key and value and names the bad key with the closest valid
one or the allowed values; a key the chosen algorithm does not use is an error
that names the algorithm. Every numeric key declares its range next to it
(``Annotated[int, Range(ge=1)]``, see :mod:`mtrl.schema`), checked here on load.
``key.sub=value`` overrides (from the command line) are applied before validation.
The resolved recipe is saved in the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from mtrl.algorithms import ALGORITHMS, AlgorithmConfig, PPOConfig
from mtrl.detectors import DetectorConfig
from mtrl.errors import MtrlError
from mtrl.evaluate import EvaluationConfig
from mtrl.label import OfflineConfig
from mtrl.policy import GenerationConfig, PolicyConfig
from mtrl.rewards import RewardConfig
from mtrl.schema import FINITE, Range


@dataclass
class WarmStartSection:
    """Supervised warm start of a tiny Marian model (the offline quickstart); see mtrl.warmstart."""

    enabled: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    train: str = "multi30k:train"  # builtin name:split, a JSONL/TSV file, or "hf:NAME[:CONFIG]:SPLIT"
    eval: str | None = "multi30k:test2016"
    src_lang: str = "English"
    tgt_lang: str = "German"
    source_field: str = "src"
    reference_field: str = "ref"
    max_train_examples: Annotated[int, Range(ge=1)] | None = None  # null: all
    max_eval_examples: Annotated[int, Range(ge=1)] | None = None  # null: all


@dataclass
class TrainConfig:
    steps: Annotated[int, Range(ge=1)] = 100
    log_every: Annotated[int, Range(ge=1)] = 1
    save_every: Annotated[int, Range(ge=1)] = 50
    eval_every: Annotated[int, Range(ge=0)] = 0  # 0: evaluate only before and after
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False  # force CPU even when a GPU is there
    threads: Annotated[int, Range(ge=1)] | None = None  # torch CPU threads; null: torch's default


@dataclass
class Recipe:
    run_dir: str = "runs/mtrl"
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 0  # numpy's seed range
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)
    data: DataConfig = field(default_factory=DataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=PPOConfig)  # its keys depend on algorithm.name
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return origin.__name__
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, rng: Range = FINITE, nullable: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses. A number must lie in ``rng``
    (its declared :class:`Range`, or any finite number); ``nullable``: null is allowed too (for the message)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:  # a number and its declared range
        base, *meta = typing.get_args(tp)
        declared = [m for m in meta if isinstance(m, Range)]
        return _convert(value, base, where, declared[0] if declared else rng, nullable)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None and len(others) == 1:  # X | None: X's own message says what is wrong
            return _convert(value, others[0], where, nullable=True)
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, where)
            except MtrlError:
                pass
        raise MtrlError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise MtrlError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise MtrlError(f"{where}: {value!r} is not allowed; allowed: "
                        + ", ".join(repr(a) for a in typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MtrlError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:  # fixed length, from a YAML list
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise MtrlError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise MtrlError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MtrlError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {k: _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp in (int, float):
        number = _number(value, tp, where)
        if number not in rng:
            shown = number if isinstance(value, str) else value  # as written; 'nan' read as a string shows nan
            raise MtrlError(f"{where}: must be {rng}{' or null' if nullable else ''}, got {shown!r}")
        return number
    if isinstance(value, tp):
        return value
    raise MtrlError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _number(value: Any, tp: type, where: str) -> int | float:
    """``value`` as an int or a float (an int is a float too; YAML 1.1 reads 2e-5, no dot, as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (tp is int and not isinstance(value, int)):
        raise MtrlError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is int:
        return value
    try:
        return float(value)
    except ValueError:
        raise MtrlError(f"{where}: expected float, got {value!r}") from None
    except OverflowError:  # an int too large for a float
        raise MtrlError(f"{where}: must be a finite number, got {value!r}") from None


def _build(cls: Any, data: dict[str, Any], where: str, owner: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)  # with the declared ranges
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise MtrlError(f"unknown key '{path}'{owner}{hint}")
        if cls is Recipe and key == "algorithm":
            kwargs[key] = _algorithm(value, path)
        else:
            kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _algorithm(value: Any, where: str) -> AlgorithmConfig:
    """The ``algorithm:`` section, validated against the config class of ``algorithm.name``."""
    if not isinstance(value, dict):
        raise MtrlError(f"{where}: expected a mapping, got {value!r}")
    name = value.get("name", "ppo")
    if name not in ALGORITHMS:
        raise MtrlError(f"{where}.name: {name!r} is not allowed; allowed: " + ", ".join(map(repr, ALGORITHMS)))
    try:
        return _build(ALGORITHMS[name][0], value, where, owner=f" (algorithm {name} does not use it)")
    except MtrlError as e:
        if "does not use it" not in str(e):
            raise
        raise MtrlError(f"{e} (to switch algorithm with an override, replace the whole section: "
                        f"\"algorithm={{name: {name}, lr: ...}}\")") from None


def _check_semantics(r: Recipe) -> None:
    a = r.algorithm
    checks = [  # what one key's declared range cannot say (each number's range is checked on load)
        (a.name != "rloo" or a.samples_per_prompt >= 2, "algorithm.samples_per_prompt must be >= 2 for rloo"),
        (a.name != "qsft" or r.reward.mode in ("token", "sentence"), "reward.mode must be 'token' or 'sentence' for qsft"),
        (bool(r.policy.model), "policy.model is required (a hub id, a local path, 'mtrl:tiny-marian' or 'warmstart')"),
        (r.policy.model != "warmstart" or r.warm_start.enabled,
         "policy.model is 'warmstart' but warm_start.enabled is false"),
        (r.detector.name != "gold" or r.detector.path, "detector.path is needed for the gold detector"),
    ]
    for ok, msg in checks:
        if not ok:
            raise MtrlError(msg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed YAML value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise MtrlError(f"override {text!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def recipe_from_dict(data: dict[str, Any], overrides: list[str] = ()) -> Recipe:
    data = copy.deepcopy(data or {})  # overrides must not reach into the caller's nested sections
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {} if node.get(k) is None else node[k]
                if not isinstance(node[k], dict):
                    raise MtrlError(f"override {ov!r}: '{k}' is not a section")
            node = node[k]
        node[keys[-1]] = value
    recipe = _build(Recipe, data, "")
    _check_semantics(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a YAML recipe (with ``key.sub=value`` overrides)."""
    p = Path(path)
    if not p.is_file():
        raise MtrlError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise yaml_error(path, e) from None
    except UnicodeDecodeError as e:
        raise MtrlError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if data is not None and not isinstance(data, dict):
        raise MtrlError(f"{path}: a recipe must be a mapping of sections")
    return recipe_from_dict(data or {}, overrides)


def yaml_error(path: str | Path, e: yaml.YAMLError) -> MtrlError:
    """One line for a YAML syntax error: the file, the line and column, what is wrong there."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return MtrlError(f"{path}: invalid YAML ({str(e).splitlines()[0]})")
    text = f"{path}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None:
        text += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    return MtrlError(" ".join(text.split()))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
