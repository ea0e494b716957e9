"""Training recipes: a typed schema, validated on load.

A recipe is YAML whose sections are the config classes of the modules that use
them (``policy``/``generation``: :mod:`mtrl.policy`; ``detector``:
:mod:`mtrl.detectors`; ``reward``: :mod:`mtrl.rewards`; ``algorithm``: the chosen
algorithm's own config in :mod:`mtrl.algorithms`; ``offline``: :mod:`mtrl.algorithms.offline_data`).
Loading checks every key and value and names the bad key with the closest valid
one or the allowed values; a key the chosen algorithm does not use is an error
that names the algorithm. Every numeric key declares its range next to it
(``Annotated[int, Range(ge=1)]``), checked on load by :func:`mtrl.schema.build`; the rules that
tie keys together are in :func:`_check_semantics`.
``key.sub=value`` overrides (from the command line) are applied before validation.
The resolved recipe is saved in the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from mtrl.algorithms import ALGORITHMS, ONLINE, AlgorithmConfig, PPOConfig
from mtrl.algorithms.offline_data import OfflineConfig
from mtrl.detectors import DetectorConfig
from mtrl.errors import MtrlError
from mtrl.evaluate import EvaluationConfig
from mtrl.policy import GenerationConfig, PolicyConfig
from mtrl.rewards import RewardConfig
from mtrl.schema import Range, build


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
def _algorithm(value: Any, where: str) -> AlgorithmConfig:
    """The ``algorithm:`` section, validated against the config class of ``algorithm.name``."""
    if not isinstance(value, dict):
        raise MtrlError(f"{where}: expected a mapping, got {value!r}")
    name = value.get("name", "ppo")
    if name not in ALGORITHMS:
        raise MtrlError(f"{where}.name: {name!r} is not allowed; allowed: " + ", ".join(map(repr, ALGORITHMS)))
    try:
        return build(ALGORITHMS[name][0], value, where, owner=f" (algorithm {name} does not use it)")
    except MtrlError as e:
        if "does not use it" not in str(e):
            raise
        raise MtrlError(f"{e} (to switch algorithm with an override, replace the whole section: "
                        f"\"algorithm={{name: {name}, lr: ...}}\")") from None


def _check_semantics(r: Recipe) -> None:
    a = r.algorithm
    lo_hi = getattr(a, "return_range", None)  # qsft's
    checks = [  # what one key's declared range cannot say (each number's range is checked on load)
        (a.name != "rloo" or a.samples_per_prompt >= 2, "algorithm.samples_per_prompt must be >= 2 for rloo"),
        (a.name != "qsft" or r.reward.mode in ("token", "sentence"), "reward.mode must be 'token' or 'sentence' for qsft"),
        (lo_hi is None or lo_hi[1] > lo_hi[0], f"algorithm.return_range: must be [lo, hi] with hi > lo, got {lo_hi and list(lo_hi)}"),
        (bool(r.policy.model), "policy.model is required (a hub id, a local path or 'mtrl:tiny-marian')"),
        (r.detector.name != "gold" or r.detector.path, "detector.path is needed for the gold detector"),
        (a.name != "grpo" or not a.span_advantages or r.reward.mode != "r3hf",
         "algorithm.span_advantages needs the detector's spans; reward.mode r3hf has none (use sentence, token "
         "or hybrid)"),
        (r.generation.engine == "hf" or a.name in ONLINE,
         f"generation.engine vllm samples the rollouts of ppo, reinforce, rloo and grpo; algorithm {a.name} samples with "
         "hf (set generation.engine: hf)"),
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
    recipe = build(Recipe, data, sections={"algorithm": _algorithm})
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
