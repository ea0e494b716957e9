"""Training-stability indicators and plots from a run's ``metrics.jsonl`` (and several seeds of one scheme).

RL fine-tuning fails quietly: the reward can go up while the translations get worse, or the policy can
drift away from the reference model in a few steps. These indicators turn a run's log into numbers and
yes/no flags so that runs (and seeds of one scheme) can be compared without eyeballing curves.

Conventions. "Row" means one logged training step (``train.log_every`` may skip steps; slopes use the
``step`` column, windows count rows). The *initial* and *final* value of a column are the means of its
first and last ``k`` rows, ``k = max(1, min(EDGE_ROWS, rows // 5))``, so short runs use at most a fifth
of their rows at each end. When a step was logged twice (a resumed or appended log), the last line wins.
A half-written last line (a run killed while writing it) is dropped with a warning; a bad line anywhere
else is an error naming the file and line.
``reward_mean`` is the task reward per sequence, without the KL penalty (``total_reward_mean`` has it).

Indicators (``stability_report``) and the thresholds behind each flag (module constants below):

* **Reward trend.** ``slope_per_step``: least-squares slope of ``reward_mean`` against ``step``
  (``slope_per_100_steps`` = 100 x that). ``spearman``: rank correlation of ``reward_mean`` with ``step``
  (1 = never decreases); it ignores the reward's scale and is robust to single outliers.
  ``trend`` is ``"rising"`` when slope > 0 and spearman >= ``TREND_MIN_RHO``, ``"falling"`` when slope < 0
  and spearman <= -``TREND_MIN_RHO``, ``"flat"`` otherwise (``"unknown"`` under ``MIN_TREND_ROWS`` rows).
  ``monotone``: spearman >= ``MONOTONE_MIN_RHO``. ``drawdown``: peak minus last value of the reward
  smoothed by a trailing moving average of ``SMOOTH_WINDOW`` rows (how much was lost after the best point).
  Flag ``reward_falling``: trend is ``"falling"``.
* **KL.** ``final`` (last-k mean), ``max`` and its step, of the per-sequence KL to the reference.
  Flag ``kl_blowup``: some KL is infinite, or exceeds ``KL_BLOWUP_MAX`` nats, or exceeds
  ``KL_BLOWUP_FACTOR`` x the lowest KL of the previous ``KL_BLOWUP_WINDOW`` rows (that base clipped from
  below at ``KL_GROWTH_FLOOR``, since KL starts near 0 and any growth from 0 is an "infinite" factor).
  ``blowup_step`` is the first step where a rule fires. (With the ``k1`` estimator a batch's KL can be
  slightly negative; the floor keeps such values from making any later KL look like a blow-up.)
* **Entropy collapse.** ``initial``, ``final``, ``min`` and ``ratio = final / initial`` of the policy's
  per-token entropy (nats). Flag ``entropy_collapse``: final < ``ENTROPY_COLLAPSE_FRAC`` x initial, or
  final < ``ENTROPY_FLOOR``. A collapsed policy stops exploring, so later rewards say little.
* **Loss spikes.** For ``policy_loss``, ``value_loss`` (PPO) and ``grad_norm``: number of rows where
  ``|x| > median(|x|) + LOSS_SPIKE_K * MAD(|x|)`` (MAD = median absolute deviation, unscaled; with Gaussian
  noise that is median + 6.7 sigma for a loss away from 0, about 4.7 sigma for a loss centred on 0 like
  PPO's policy loss; not counted under ``MIN_SPIKE_ROWS`` finite rows). Flag ``loss_spikes``:
  any column has >= ``LOSS_SPIKE_MIN_COUNT`` spikes.
* **Non-finite values.** ``non_finite_rows``: step rows with a NaN/Infinity value (as ``json.dumps`` writes
  them). Flag ``non_finite``. Report values that would be NaN/inf are ``None`` so the report is strict JSON.
* **Reward hacking.** Held-out chrF change = last ``eval_chrf`` line minus a baseline (``before`` chrF of
  ``eval.json`` if present, else the first ``eval_chrf`` line); without ``eval_chrf`` lines,
  ``after - before`` chrF of ``eval.json``. Flag ``reward_hacking``: reward trend is ``"rising"`` and the
  held-out chrF change < -``HACKING_CHRF_DROP`` (chrF points): the policy is learning the detector, not
  translation. Or: reward trend is ``"rising"`` and some guard's trip rate rose (below): the reward went up
  on outputs that break a basic rule (wrong language, truncated or padded, copied, empty, looping).
  ``hacking_reasons`` lists why (``"heldout_chrf_fell"``, ``"guard_<name>_rose"``; empty when not set).
* **Reward guards.** ``guards``: for each logged ``guard_<name>`` column (``language``, ``length``, ``copy``,
  ``empty``, ``loop``: the share of a step's samples on which that guard tripped, logged whether or not the
  guards were applied to the reward) its ``initial``, ``final`` and ``change``. A guard *rose* when
  final - initial >= ``GUARD_RISE`` (absolute) and final >= 2 x initial: the change must be both noticeable
  and large next to where the run started, so a guard that trips often from the start does not count.
* **Output length and language.** ``length_ratio``: ``initial``, ``final``, ``change`` and
  ``relative_change = change / initial`` of ``length_ratio_mean`` (hypothesis / source length in characters,
  mean over a step's samples). Flag ``length_drift``: |relative_change| >= ``LENGTH_DRIFT``: the policy
  learnt to write longer or shorter (dropping content, or padding) than it started, a common shortcut
  around a per-token reward. ``target_language``: ``initial``, ``final``, ``change`` of
  ``target_language_share`` (share of a step's samples detected as the target language).
  Logs written before these columns existed give ``None`` (and ``{}`` for ``guards``) and set no flag.

Across seeds (``compare_runs``): per scheme, the mean and std over seeds (``SEED_STD_DDOF``: 1, the sample
std; NaN for a single seed) of the final reward, of ``after`` BLEU/chrF/detector score in ``eval.json``,
and of the main indicators (with the final length ratio and target-language share); the share of seeds
with each flag set.

``format_report`` renders one report for a person: the flags that are set with their reasons, then a
short table of the key figures (``mtrl stability``'s default; ``--format json`` prints the report itself).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtrl.errors import MtrlError
from mtrl.io import atomic_open, numbered_log
from mtrl.rewards.guards import GUARD_NAMES as GUARDS  # logged as guard_<name>

# --------------------------------------------------------------------------- thresholds
EDGE_ROWS = 10  # rows averaged for "initial" / "final" values (at most a fifth of the run)
SMOOTH_WINDOW = 10  # trailing moving-average window (rows) for noisy curves (drawdown, plots)
MIN_TREND_ROWS = 10  # fewer rows: trend "unknown" (a rank correlation of a handful of points is noise)
TREND_MIN_RHO = 0.3  # |spearman| needed to call the reward rising / falling
MONOTONE_MIN_RHO = 0.8  # spearman needed to call the reward monotone
KL_BLOWUP_MAX = 20.0  # nats per sequence
KL_BLOWUP_FACTOR = 10.0  # growth factor within KL_BLOWUP_WINDOW rows ...
KL_BLOWUP_WINDOW = 10
KL_GROWTH_FLOOR = 1.0  # ... measured from at least this KL (nats per sequence)
ENTROPY_COLLAPSE_FRAC = 0.2  # final entropy below this fraction of the initial one
ENTROPY_FLOOR = 0.05  # or below this many nats per token
LOSS_SPIKE_K = 10.0  # spike: |x| > median + K * MAD
LOSS_SPIKE_MIN_COUNT = 1  # spikes (in one column) that set the flag
MIN_SPIKE_ROWS = 20  # fewer rows: no spike counting (median and MAD of a few points are unreliable)
SPIKE_COLUMNS = ("policy_loss", "value_loss", "grad_norm")
HACKING_CHRF_DROP = 0.5  # chrF points the held-out score must lose
GUARD_RISE = 0.05  # rise of a guard's trip rate (absolute share of samples) that counts as hacking ...
GUARD_RISE_FACTOR = 2.0  # ... when it also ends at >= this many times its initial rate
LENGTH_DRIFT = 0.15  # |relative change| of the mean hypothesis/source length ratio that sets length_drift
SEED_STD_DDOF = 1  # sample std over seeds
EVAL_SCORES = ("bleu", "chrf", "ter", "detector_score")  # the held-out scores read from a run's eval.json

REQUIRED_KEYS = ("step", "reward_mean")
_NUMERIC = {"reward_std", "sentence_score_mean", "spans_minor", "spans_major", "spans_critical", "kl", "kl_coef",
            "entropy", "policy_loss", "value_loss", "clipfrac", "grad_norm", "tokens_per_s",
            "length_ratio_mean", "target_language_share", *(f"guard_{g}" for g in GUARDS)}  # checked when present
FLAGS = ("reward_falling", "kl_blowup", "entropy_collapse", "loss_spikes", "non_finite", "reward_hacking",
         "length_drift")


# --------------------------------------------------------------------------- loading
def _metrics_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.name.endswith(".jsonl") else p / "metrics.jsonl"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse(run_dir: str | Path) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """Step lines and eval lines of ``metrics.jsonl``, validated; errors name the file and line."""
    path = _metrics_path(run_dir)
    steps, evals = [], []
    for i, obj in numbered_log(path):
        step = obj.get("step")
        if not (isinstance(step, int) and not isinstance(step, bool)):
            raise MtrlError(f"{path}: line {i} has no integer 'step' (got {step!r})")
        is_eval = any(k.startswith("eval_") for k in obj)
        if not is_eval:
            for key in REQUIRED_KEYS:
                if key not in obj:
                    raise MtrlError(f"{path}: line {i} has no '{key}'")
        for k, v in obj.items():
            if k != "step" and v is not None and not _is_number(v) and (is_eval or k in REQUIRED_KEYS
                                                                           or k in _NUMERIC):
                raise MtrlError(f"{path}: line {i}: '{k}' is not a number (got {v!r})")
        bad = any(isinstance(v, float) and not math.isfinite(v) for v in obj.values())
        (evals if is_eval else steps).append({**obj, "_nonfinite": bad})
    if not steps:
        raise MtrlError(f"{path}: no training steps (the file is empty or has only eval lines)")
    return path, steps, evals


def _frame(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, int, int]:
    """Rows as a frame sorted by step, keeping the last line of a repeated step.

    Also returns how many lines were dropped as repeats and how many kept rows hold a NaN/inf value
    (counted from the lines, since a key missing from some lines also shows up as NaN in the frame).
    """
    df = pd.DataFrame(rows)
    before = len(df)
    df = df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    non_finite = int(df.pop("_nonfinite").sum())
    return df, before - len(df), non_finite


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """Training-step rows of ``metrics.jsonl`` (eval lines excluded), one per step, sorted by step.

    ``run_dir`` is the run directory or the ``metrics.jsonl`` file itself (as for every function here).
    """
    _, steps, _ = _parse(run_dir)
    return _frame(steps)[0]


def load_eval_curve(run_dir: str | Path) -> pd.DataFrame:
    """The ``eval_*`` lines of ``metrics.jsonl`` (one per step, sorted; empty frame if there are none)."""
    _, _, evals = _parse(run_dir)
    return _frame(evals)[0] if evals else pd.DataFrame(columns=["step"])


def load_eval_json(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """``before``/``after`` scores of ``eval.json`` as plain floats (``{}`` when the file is absent)."""
    path = _metrics_path(run_dir).parent / "eval.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MtrlError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MtrlError(f"{path}: expected a JSON object with 'before'/'after'")
    out: dict[str, dict[str, float]] = {}
    for phase in ("before", "after"):
        entry = data.get(phase)
        if not isinstance(entry, dict):
            continue
        scores = {}
        for m in EVAL_SCORES:
            v = entry.get(m)
            v = v.get("score") if isinstance(v, dict) else v
            if _is_number(v):
                scores[m] = float(v)
        out[phase] = scores
    return out


# --------------------------------------------------------------------------- indicators
def _float(x: Any) -> float | None:
    """A JSON-safe float: None for missing / NaN / inf."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _edge(n: int) -> int:
    return max(1, min(EDGE_ROWS, n // 5))


def smooth(values: pd.Series, window: int = SMOOTH_WINDOW) -> pd.Series:
    """Trailing moving average (the first points average what there is so far)."""
    return values.rolling(window, min_periods=1).mean()


def spearman(x: Iterable[float], y: Iterable[float]) -> float:
    """Rank correlation (average ranks for ties); 0 when either side is constant."""
    rx, ry = pd.Series(list(x)).rank(), pd.Series(list(y)).rank()
    if rx.nunique() < 2 or ry.nunique() < 2:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def reward_trend(df: pd.DataFrame) -> dict[str, Any]:
    """Slope, rank correlation with step, trend label, initial/final/gain and drawdown of ``reward_mean``."""
    d = df[["step", "reward_mean"]].astype(float)
    d = d[np.isfinite(d["reward_mean"])]
    n, k = len(d), _edge(len(d))
    out: dict[str, Any] = {"initial": None, "final": None, "gain": None, "slope_per_step": None,
                           "slope_per_100_steps": None, "spearman": None, "monotone": False,
                           "trend": "unknown", "drawdown": None}
    if n == 0:
        return out
    r = d["reward_mean"]
    sm = smooth(r)
    out.update(initial=_float(r.iloc[:k].mean()), final=_float(r.iloc[-k:].mean()),
               drawdown=_float(sm.max() - sm.iloc[-1]))
    out["gain"] = _float(out["final"] - out["initial"])
    if n < MIN_TREND_ROWS:
        return out
    slope = float(np.polyfit(d["step"], r, 1)[0])
    rho = spearman(d["step"], r)
    trend = "flat"
    if slope > 0 and rho >= TREND_MIN_RHO:
        trend = "rising"
    elif slope < 0 and rho <= -TREND_MIN_RHO:
        trend = "falling"
    out.update(slope_per_step=slope, slope_per_100_steps=100 * slope, spearman=rho,
               monotone=rho >= MONOTONE_MIN_RHO, trend=trend)
    return out


def kl_indicators(df: pd.DataFrame) -> dict[str, Any]:
    """Final and max KL to the reference and the first step where a blow-up rule fires (None: none)."""
    if "kl" not in df:
        return {"final": None, "max": None, "max_step": None, "blowup_step": None}
    kl = df["kl"].astype(float)
    steps = df["step"]
    finite = kl[np.isfinite(kl)]
    base = kl.shift(1).rolling(KL_BLOWUP_WINDOW, min_periods=1).min().clip(lower=KL_GROWTH_FLOOR)
    # inf counts as a blow-up; NaN (or a row without "kl") does not: NaN sets the non_finite flag instead
    fired = np.isinf(kl) | (kl > KL_BLOWUP_MAX) | (kl > KL_BLOWUP_FACTOR * base)
    k = _edge(len(finite)) if len(finite) else 0
    return {
        "final": _float(finite.iloc[-k:].mean()) if k else None,
        "max": _float(finite.max()) if k else None,
        "max_step": int(steps[finite.idxmax()]) if k else None,
        "blowup_step": int(steps[fired].iloc[0]) if fired.any() else None,
    }


def entropy_indicators(df: pd.DataFrame) -> dict[str, Any]:
    """Initial, final, min entropy and final/initial ratio; ``collapse`` by the thresholds above."""
    out: dict[str, Any] = {"initial": None, "final": None, "min": None, "ratio": None, "collapse": False}
    if "entropy" not in df:
        return out
    e = df["entropy"].astype(float)
    e = e[np.isfinite(e)]
    if e.empty:
        return out
    k = _edge(len(e))
    initial, final = float(e.iloc[:k].mean()), float(e.iloc[-k:].mean())
    out.update(initial=initial, final=final, min=float(e.min()),
               ratio=_float(final / initial) if initial > 0 else None)
    out["collapse"] = bool(final < ENTROPY_FLOOR or (initial > 0 and final < ENTROPY_COLLAPSE_FRAC * initial))
    return out


def count_spikes(values: pd.Series, k: float = LOSS_SPIKE_K, min_rows: int = MIN_SPIKE_ROWS) -> int:
    """Rows where ``|x|`` exceeds the run's median ``|x|`` by more than ``k`` MADs (0 under ``min_rows``)."""
    a = values.astype(float).abs()
    a = a[np.isfinite(a)]
    if len(a) < max(min_rows, 3):
        return 0
    med = a.median()
    mad = (a - med).abs().median()
    return int((a > med + k * max(mad, 1e-12 * max(med, 1.0))).sum())


def _edges(df: pd.DataFrame, column: str) -> tuple[float | None, float | None]:
    """Initial and final (first-k / last-k mean) of a column's finite values; ``(None, None)`` without any."""
    if column not in df:
        return None, None
    v = df[column].astype(float)
    v = v[np.isfinite(v)]
    if v.empty:
        return None, None
    k = _edge(len(v))
    return _float(v.iloc[:k].mean()), _float(v.iloc[-k:].mean())


def _change(initial: float | None, final: float | None) -> dict[str, float | None]:
    return {"initial": initial, "final": final,
            "change": _float(final - initial) if initial is not None and final is not None else None}


def guard_indicators(df: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """Initial, final and change of each logged ``guard_<name>`` trip rate, keyed by ``<name>``."""
    return {g: _change(*_edges(df, f"guard_{g}")) for g in GUARDS if f"guard_{g}" in df}


def guard_rose(g: Mapping[str, float | None]) -> bool:
    """A guard's trip rate rose by >= ``GUARD_RISE`` and to >= ``GUARD_RISE_FACTOR`` x its initial rate."""
    initial, final = g["initial"], g["final"]
    return (initial is not None and final is not None and final - initial >= GUARD_RISE
            and final >= GUARD_RISE_FACTOR * initial)


def length_ratio_indicators(df: pd.DataFrame) -> dict[str, float | None]:
    """Initial, final, change and relative change of ``length_ratio_mean`` (None when not logged)."""
    out: dict[str, float | None] = _change(*_edges(df, "length_ratio_mean"))
    initial, change = out["initial"], out["change"]
    out["relative_change"] = _float(change / initial) if change is not None and initial and initial > 0 else None
    return out


def heldout_chrf(df_eval: pd.DataFrame, eval_json: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Held-out chrF at the start and end of training and where they come from (see module docstring)."""
    before = eval_json.get("before", {}).get("chrf")
    after = eval_json.get("after", {}).get("chrf")
    curve = df_eval["eval_chrf"].astype(float).dropna() if "eval_chrf" in df_eval else pd.Series(dtype=float)
    points = ([before] if before is not None else []) + curve.tolist()
    if len(curve) and len(points) >= 2:
        source, start, end = "eval_lines", points[0], points[-1]
    elif before is not None and after is not None:
        source, start, end = "eval_json", before, after
    else:
        return {"source": None, "start": None, "end": None, "change": None}
    return {"source": source, "start": _float(start), "end": _float(end), "change": _float(end - start)}


def stability_report(run_dir: str | Path) -> dict[str, Any]:
    """All indicators and flags of one run, as a JSON-serialisable dict (see the module docstring)."""
    path, step_lines, eval_lines = _parse(run_dir)
    df, dropped, non_finite = _frame(step_lines)
    df_eval = _frame(eval_lines)[0] if eval_lines else pd.DataFrame(columns=["step"])
    evals = load_eval_json(run_dir)

    reward = reward_trend(df)
    kl = kl_indicators(df)
    entropy = entropy_indicators(df)
    spikes = {c: count_spikes(df[c]) for c in SPIKE_COLUMNS if c in df}
    held = heldout_chrf(df_eval, evals)
    guards = guard_indicators(df)
    length = length_ratio_indicators(df)
    language = _change(*_edges(df, "target_language_share"))

    hacking_reasons = []
    if reward["trend"] == "rising":
        if held["change"] is not None and held["change"] < -HACKING_CHRF_DROP:
            hacking_reasons.append("heldout_chrf_fell")
        hacking_reasons += [f"guard_{name}_rose" for name, g in guards.items() if guard_rose(g)]
    flags = {
        "reward_falling": reward["trend"] == "falling",
        "kl_blowup": kl["blowup_step"] is not None,
        "entropy_collapse": bool(entropy["collapse"]),
        "loss_spikes": any(n >= LOSS_SPIKE_MIN_COUNT for n in spikes.values()),
        "non_finite": non_finite > 0,
        "reward_hacking": bool(hacking_reasons),
        "length_drift": bool(length["relative_change"] is not None
                             and abs(length["relative_change"]) >= LENGTH_DRIFT),
    }
    return {
        "run_dir": str(path.parent),
        "rows": len(df),
        "first_step": int(df["step"].iloc[0]),
        "last_step": int(df["step"].iloc[-1]),
        "duplicate_steps_dropped": dropped,
        "reward": reward,
        "kl": kl,
        "entropy": entropy,
        "loss_spikes": spikes,
        "non_finite_rows": non_finite,
        "heldout_chrf": held,
        "eval": evals,
        "guards": guards,
        "length_ratio": length,
        "target_language": language,
        "flags": flags,
        "hacking_reasons": hacking_reasons,
    }


# --------------------------------------------------------------------------- text
def _num(x: Any, digits: int = 3, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals (``+`` for positive when ``sign``); ``-`` for a missing value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{'+' if sign else ''}.{digits}f}"


def _went(initial: float | None, final: float | None, digits: int = 2) -> str:
    """``rose 0.02 -> 0.41`` / ``fell ...`` / ``stayed ...`` (``went - -> 0.41`` when one is missing)."""
    if initial is None or final is None:
        return f"went {_num(initial, digits)} -> {_num(final, digits)}"
    word = "rose" if final > initial else "fell" if final < initial else "stayed"
    return f"{word} {_num(initial, digits)} -> {_num(final, digits)}"


def flag_reasons(report: Mapping[str, Any]) -> dict[str, str]:
    """Each flag that is set, with why in words and numbers (the thresholds are the module constants)."""
    r, kl, ent, held = report["reward"], report["kl"], report["entropy"], report["heldout_chrf"]
    why: dict[str, str] = {}
    flags = report["flags"]
    if flags.get("reward_falling"):
        why["reward_falling"] = (f"reward {_went(r['initial'], r['final'], 3)} (slope {_num(r['slope_per_100_steps'], 3)}"
                                 f" per 100 steps, spearman {_num(r['spearman'], 2)})")
    if flags.get("kl_blowup"):
        why["kl_blowup"] = (f"KL blew up at step {kl['blowup_step']} (max finite KL {_num(kl['max'], 2)} nats at step "
                            f"{kl['max_step']}; limits: inf, > {KL_BLOWUP_MAX:g} nats, or {KL_BLOWUP_FACTOR:g}x "
                            f"within {KL_BLOWUP_WINDOW} rows)")
    if flags.get("entropy_collapse"):
        why["entropy_collapse"] = (f"entropy {_went(ent['initial'], ent['final'], 3)} nats/token (ratio "
                                   f"{_num(ent['ratio'], 2)}; limits: < {ENTROPY_COLLAPSE_FRAC:g}x initial or "
                                   f"< {ENTROPY_FLOOR:g} nats)")
    if flags.get("loss_spikes"):
        counts = ", ".join(f"{c} {n}" for c, n in report["loss_spikes"].items() if n)
        why["loss_spikes"] = f"spikes (|x| > median + {LOSS_SPIKE_K:g} MAD): {counts}"
    if flags.get("non_finite"):
        why["non_finite"] = f"{report['non_finite_rows']} step row(s) hold NaN or Infinity"
    if flags.get("reward_hacking"):
        parts = []
        for reason in report.get("hacking_reasons", []):
            if reason == "heldout_chrf_fell":
                parts.append(f"held-out chrF {_went(held['start'], held['end'])} ({_num(held['change'], 2, True)})")
            elif reason.startswith("guard_") and reason.endswith("_rose"):
                name = reason[len("guard_"):-len("_rose")]
                g = report["guards"].get(name, {})
                parts.append(f"guard '{name}' trip rate {_went(g.get('initial'), g.get('final'))}")
            else:
                parts.append(reason)
        why["reward_hacking"] = "; ".join(parts) + " while reward rose"
    if flags.get("length_drift"):
        lr = report["length_ratio"]
        why["length_drift"] = (f"length ratio (hypothesis/source chars) {_went(lr['initial'], lr['final'])} "
                               f"({_num(100 * lr['relative_change'], 0, True)}%; limit ±{100 * LENGTH_DRIFT:g}%)")
    for name, value in flags.items():  # a flag this function does not know yet still shows
        if value and name not in why:
            why[name] = "set"
    return why


def _table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as aligned lines: first column left, numbers right, last column (notes) left."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


_HELD_SOURCES = {"eval_lines": "eval lines of metrics.jsonl", "eval_json": "eval.json before / after"}


def format_report(report: Mapping[str, Any]) -> str:
    """One run's report for a person: a title line, the flags that are set (with why), a table of key figures."""
    r, kl, ent, held = report["reward"], report["kl"], report["entropy"], report["heldout_chrf"]
    title = f"{report['run_dir']}: {report['rows']} steps logged ({report['first_step']}-{report['last_step']})"
    if report.get("duplicate_steps_dropped"):
        title += f", {report['duplicate_steps_dropped']} repeated step line(s) dropped"
    lines = [title]
    why = flag_reasons(report)
    lines += [f"  {name}: {text}" for name, text in why.items()] or ["  no flags set"]

    rows = [["", "initial", "final", "change", ""]]
    slope = r["slope_per_100_steps"]
    rows.append(["reward", _num(r["initial"]), _num(r["final"]), _num(r["gain"], sign=True),
                 f"trend {r['trend']}" + (f", {_num(slope, 3, True)}/100 steps, spearman {_num(r['spearman'], 2)}"
                                          if slope is not None else "")])
    rows.append(["KL (nats)", "", _num(kl["final"]), "",
                 f"max {_num(kl['max'])} at step {kl['max_step']}" if kl["max"] is not None else "max -"])
    rows.append(["entropy (nats/token)", _num(ent["initial"]), _num(ent["final"]),
                 _num(None if ent["initial"] is None else ent["final"] - ent["initial"], sign=True),
                 f"ratio {_num(ent['ratio'], 2)}"])
    rows.append(["held-out chrF", _num(held["start"], 2), _num(held["end"], 2), _num(held["change"], 2, True),
                 _HELD_SOURCES.get(held["source"], "")])
    evals = report.get("eval", {})
    if evals:
        before, after = evals.get("before", {}), evals.get("after", {})
        for m, label, d in (("bleu", "eval BLEU", 2), ("chrf", "eval chrF", 2), ("detector_score", "eval detector", 3)):
            b, a = before.get(m), after.get(m)
            rows.append([label, _num(b, d), _num(a, d), _num(None if a is None or b is None else a - b, d, True),
                         "eval.json before / after"])
    lr, lang = report.get("length_ratio", {}), report.get("target_language", {})
    rows.append(["length ratio (hyp/src)", _num(lr.get("initial")), _num(lr.get("final")),
                 _num(lr.get("change"), sign=True),
                 f"{_num(100 * lr['relative_change'], 1, True)}%" if lr.get("relative_change") is not None else ""])
    rows.append(["target-language share", _num(lang.get("initial")), _num(lang.get("final")),
                 _num(lang.get("change"), sign=True), ""])
    guards = report.get("guards", {})
    for name, g in guards.items():
        rows.append([f"guard {name} trip rate", _num(g["initial"]), _num(g["final"]), _num(g["change"], sign=True),
                     "rose" if guard_rose(g) else ""])
    if not guards:
        rows.append(["guard trip rates", "-", "-", "-", "not logged"])
    return "\n".join(lines + _table(rows))


# --------------------------------------------------------------------------- across seeds
def _mean_std(values: list[float | None]) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    std = float(np.std(v, ddof=SEED_STD_DDOF)) if len(v) > SEED_STD_DDOF else math.nan
    return float(np.mean(v)), std


def compare_runs(runs: Mapping[str, list[str | Path]]) -> pd.DataFrame:
    """One row per scheme: mean and std over its seeds of final reward, eval metrics and indicators."""
    rows = {}
    for scheme, dirs in runs.items():
        if not dirs:
            raise MtrlError(f"scheme {scheme!r} has no runs")
        reports = [stability_report(d) for d in dirs]
        columns: dict[str, list[float | None]] = {
            "final_reward": [r["reward"]["final"] for r in reports],
            "reward_slope_per_100_steps": [r["reward"]["slope_per_100_steps"] for r in reports],
            "reward_spearman": [r["reward"]["spearman"] for r in reports],
            "kl_final": [r["kl"]["final"] for r in reports],
            "kl_max": [r["kl"]["max"] for r in reports],
            "entropy_ratio": [r["entropy"]["ratio"] for r in reports],
            "loss_spikes": [sum(r["loss_spikes"].values()) for r in reports],
            "heldout_chrf_change": [r["heldout_chrf"]["change"] for r in reports],
            "length_ratio_final": [r["length_ratio"]["final"] for r in reports],
            "target_language_final": [r["target_language"]["final"] for r in reports],
        }
        for m in ("bleu", "chrf", "detector_score"):
            columns[f"after_{m}"] = [r["eval"].get("after", {}).get(m) for r in reports]
        row: dict[str, float] = {"n_seeds": len(reports)}
        for name, values in columns.items():
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(values)
        for flag in FLAGS:
            row[f"frac_{flag}"] = float(np.mean([r["flags"][flag] for r in reports]))
        rows[scheme] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("scheme")


# --------------------------------------------------------------------------- plots
def seed_band(curves: list[pd.Series]) -> pd.DataFrame:
    """Per step: mean, std (0 for one seed) and number of the seeds' curves; steps as index."""
    if not curves:
        return pd.DataFrame(columns=["mean", "std", "n"])
    wide = pd.concat(curves, axis=1).sort_index()  # outer join on step: seeds may stop at different steps
    return pd.DataFrame({"mean": wide.mean(axis=1), "std": wide.std(axis=1, ddof=SEED_STD_DDOF).fillna(0.0),
                         "n": wide.notna().sum(axis=1)})


def metric_curves(dirs: list[str | Path], column: str, window: int = SMOOTH_WINDOW) -> list[pd.Series]:
    """Each run's ``column`` by step, smoothed (runs that do not log it are left out)."""
    frames = [load_metrics(d) for d in dirs]
    return [smooth(df.set_index("step")[column].astype(float), window) for df in frames if column in df]


def _draw(ax: Any, runs: Mapping[str, list[str | Path]], column: str, window: int) -> None:
    for scheme, dirs in runs.items():
        band = seed_band(metric_curves(dirs, column, window))
        if band.empty:
            continue
        line = ax.plot(band.index, band["mean"], label=f"{scheme} (n={len(dirs)})")[0]
        ax.fill_between(band.index, band["mean"] - band["std"], band["mean"] + band["std"],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.grid(alpha=0.3)


def _save(fig: Any, out: str | Path) -> Path:
    """The figure as a PNG, written atomically (a failed write: one error line, no partial file)."""
    out = Path(out)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return out


def plot_reward_curves(runs: Mapping[str, list[str | Path]], out: str | Path,
                       window: int = SMOOTH_WINDOW) -> Path:
    """Reward mean +- across-seed std per step, one line per scheme (PNG); ``window=1``: no smoothing."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    _draw(ax, runs, "reward_mean", window)
    ax.set_xlabel("step")
    ax.set_ylabel("reward_mean")
    ax.set_title(f"Training reward (mean ± std over seeds, moving average {window})")
    ax.legend()
    return _save(fig, out)


def plot_kl_entropy(runs: Mapping[str, list[str | Path]], out: str | Path, window: int = SMOOTH_WINDOW) -> Path:
    """KL to the reference (top) and policy entropy (bottom) per step, mean +- std over seeds (PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6.5), layout="tight")
    ax_kl, ax_ent = fig.subplots(2, 1, sharex=True)
    _draw(ax_kl, runs, "kl", window)
    if ax_kl.get_ylim()[1] >= KL_BLOWUP_MAX / 2:  # only when near: it would flatten small-KL curves
        ax_kl.axhline(KL_BLOWUP_MAX, color="red", linestyle="--", linewidth=1, label=f"blow-up ({KL_BLOWUP_MAX:g})")
    ax_kl.set_ylabel("KL (nats / sequence)")
    ax_kl.legend()
    _draw(ax_ent, runs, "entropy", window)
    ax_ent.set_ylabel("entropy (nats / token)")
    ax_ent.set_xlabel("step")
    ax_kl.set_title(f"KL and entropy (mean ± std over seeds, moving average {window})")
    return _save(fig, out)
