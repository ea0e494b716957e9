"""Training recipes: a typed schema, validated on load.

A recipe is YAML whose sections mirror the dataclasses below. Loading checks
every key and value and names the bad key with the closest valid one or the
allowed values. ``key.sub=value`` overrides (from the command line) are applied
before validation. The resolved recipe is saved in the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtrl.errors import MtrlError


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class PolicyConfig:
    model: str = ""  # hub id, local path, or "warmstart" (the recipe's warm_start output); required
    kind: Literal["auto", "seq2seq", "causal"] = "auto"
    tokenizer: str | None = None  # defaults to the model's
    # Causal LMs: the user turn / prompt. {source}, {src_lang}, {tgt_lang} are filled in.
    prompt: str = "Translate the following {src_lang} text into {tgt_lang}.\n{src_lang}: {source}\n{tgt_lang}:"
    chat_template: Literal["auto", "never"] = "auto"  # use the tokenizer's chat template when it has one
    # Seq2seq: text put before each source (mT5 style), and NLLB/M2M language codes (e.g. eng_Latn, deu_Latn).
    source_prefix: str = ""
    src_lang_code: str | None = None
    tgt_lang_code: str | None = None
    max_source_tokens: int = 256
    lora: LoraConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    # PPO value head: a linear head on the final hidden state. "detached": the value loss trains the head only
    # (a large, noisy value loss cannot swamp the policy gradient through the shared trunk); "shared": also the trunk.
    value_trunk: Literal["detached", "shared"] = "detached"


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
    max_train_examples: int | None = None
    max_eval_examples: int | None = None


@dataclass
class DetectorConfig:
    name: Literal["reference", "xcomet", "gold", "bleu", "chrf"] = "reference"  # bleu/chrf: score only
    model: str | None = None  # xcomet: hub id or local checkpoint
    batch_size: int = 16
    use_reference: bool = False  # xcomet: QE (source + hypothesis) like Ramos et al., or with the reference
    path: str | None = None  # gold: annotated rows
    options: dict[str, Any] = field(default_factory=dict)  # more constructor options, e.g. reference: omission_weight


@dataclass
class RewardSection:
    mode: Literal["token", "sentence", "hybrid", "r3hf"] = "token"
    severity_map: str | dict[str, float] = "xcomet"
    token_rewards: Literal["max", "spread"] = "max"
    no_error: float = 0.0
    hybrid_weight: float = 1.0
    scale: float = 1.0  # multiply all task rewards (e.g. 0.1 to bring -10 penalties near the KL scale)
    # r3hf: the scorer of every prefix; hybrid: the sentence score added at the last token
    scorer: Literal["detector", "chrf", "bleu", "comet"] = "detector"
    scorer_model: str | None = None  # scorer comet: hub id or local checkpoint
    r3hf_level: Literal["token", "word"] = "token"
    hybrid_sentence: Literal["last", "r3hf"] = "last"  # hybrid: scorer's score on the last token, or r3hf-spread


@dataclass
class AlgorithmConfig:
    # qsft: offline, see the `offline` section; grpo: TRL's GRPOTrainer, sequence-level (causal policies)
    name: Literal["ppo", "reinforce", "rloo", "qsft", "grpo"] = "ppo"
    lr: float = 1e-5
    value_lr: float | None = 1e-3  # the value head's own learning rate (a fresh linear head); null: same as lr
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    batch_size: int = 32  # prompts per step
    samples_per_prompt: int = 1  # rloo needs >= 2
    epochs: int = 2  # PPO epochs over each batch of rollouts
    minibatch_size: int = 16
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = None  # adaptive KL controller (Ziegler et al. 2019) when set
    kl_horizon: int = 10000
    weight_decay: float = 0.0


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eval_num_beams: int = 1
    eval_batch_size: int = 64
    # rollout log-probs/values: from the sampling pass ("generate": no extra forward, keeps B x T x V logits
    # while sampling) or from a teacher-forced pass ("forward": less memory for very large vocabularies)
    rollout_logprobs: Literal["generate", "forward"] = "generate"


@dataclass
class OfflineConfig:
    """Offline RL (algorithm.name: qsft): a labelled dataset, or one sampled from the policy and labelled here."""

    data: str | None = None  # JSONL from `mtrl label` (token_ids, token_rewards); null: sample + label here
    num_sources: int = 500  # sources taken from data.train to sample from
    samples_per_source: int = 4
    temperature: float = 1.0  # sampling temperature; Q-SFT then reads π_β (and p_θ) at it
    qsft: dict[str, Any] = field(default_factory=dict)  # mtrl.algorithms.qsft.QSFTConfig fields


@dataclass
class TrainConfig:
    steps: int = 100
    log_every: int = 1
    save_every: int = 50
    eval_every: int = 0  # 0: evaluate only before and after
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False  # force CPU even when a GPU is there
    threads: int | None = None  # torch CPU threads


@dataclass
class Recipe:
    run_dir: str = "runs/mtrl"
    seed: int = 0
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)
    data: DataConfig = field(default_factory=DataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    reward: RewardSection = field(default_factory=RewardSection)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return origin.__name__
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None and len(others) == 1:  # X | None: X's own message says what is wrong
            return _convert(value, others[0], where)
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
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise MtrlError(f"{where}: expected {tp.__name__}, got {value!r}")
    if isinstance(value, tp):
        return value
    raise MtrlError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise MtrlError(f"unknown key '{path}'{hint}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _check_semantics(r: Recipe) -> None:
    a = r.algorithm
    checks = [
        (a.batch_size >= 1, "algorithm.batch_size must be >= 1"),
        (a.minibatch_size >= 1, "algorithm.minibatch_size must be >= 1"),
        (a.name not in ("rloo", "grpo") or a.samples_per_prompt >= 2,
         f"algorithm.samples_per_prompt must be >= 2 for {a.name}"),
        (0 <= a.lam <= 1 and 0 <= a.gamma <= 1, "algorithm.gamma and algorithm.lam must be in [0, 1]"),
        (a.lr > 0, "algorithm.lr must be > 0"),
        (r.train.steps >= 1, "train.steps must be >= 1"),
        (r.generation.max_new_tokens >= 1, "generation.max_new_tokens must be >= 1"),
        (r.generation.temperature > 0, "generation.temperature must be > 0"),
        (0 < r.generation.top_p <= 1, "generation.top_p must be in (0, 1]"),
        (bool(r.policy.model), "policy.model is required (a hub id, a local path, or 'warmstart')"),
        (r.policy.model != "warmstart" or r.warm_start.enabled,
         "policy.model is 'warmstart' but warm_start.enabled is false"),
        (r.detector.name != "gold" or r.detector.path, "detector.path is needed for the gold detector"),
    ]
    for ok, msg in checks:
        if not ok:
            raise MtrlError(msg)
    from mtrl.spans import get_severity_map

    get_severity_map(r.reward.severity_map)
    if a.name == "qsft":
        if r.reward.mode not in ("token", "sentence"):
            raise MtrlError("reward.mode must be 'token' or 'sentence' for qsft")
        from mtrl.algorithms.qsft import QSFTConfig

        allowed = [f.name for f in dataclasses.fields(QSFTConfig) if f.name not in ("policy", "src_lang", "tgt_lang")]
        hints = typing.get_type_hints(QSFTConfig)
        for key, value in r.offline.qsft.items():
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(allowed)}"
                raise MtrlError(f"unknown key 'offline.qsft.{key}'{hint}")
            r.offline.qsft[key] = _convert(value, hints[key], f"offline.qsft.{key}")  # types, as for any key


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
    data = dict(data or {})
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
        raise MtrlError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise MtrlError(f"{path}: a recipe must be a mapping of sections")
    return recipe_from_dict(data or {}, overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
