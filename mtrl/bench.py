"""``mtrl bench BENCH.yaml``: reward schemes x seeds on one base recipe, same budget, one report.

A benchmark file::

    base: ../recipes/quickstart.yaml       # relative to the benchmark file
    output: results/bench-quickstart       # report directory (relative to the benchmark file)
    seeds: [0, 1, 2]
    overrides: [train.steps=100]           # applied to every cell
    evaluation:                            # one set of scorers for every cell (the recipe's `evaluation:`)
      detector: {name: reference}          # default: the embedded reference detector with its defaults
      comet: null                          # a COMET checkpoint (hub id or path) to add COMET; null: none
    schemes:                               # name -> overrides of that scheme
      sentence: [reward.mode=sentence]
      token: [reward.mode=token]

Every cell (scheme, seed) is a normal ``mtrl train`` run in ``OUTPUT/runs/SCHEME/seed-N``. Schemes are
trained on different rewards, so they are *evaluated* the same way: BLEU and chrF always, the bench's
``evaluation.detector`` (not the cell's training detector) and COMET when ``evaluation.comet`` is set and
can be found; the bench passes its ``evaluation`` to every cell as recipe overrides, so every cell's
``eval.json`` is on one scale. A cell whose ``eval.json`` already has ``after`` and whose saved recipe is the
one the bench would run now is skipped, so an interrupted benchmark resumes (and a cell run with another
evaluation or budget is run again).

The report: ``results.md`` and ``results.csv`` (mean ± std over seeds of the held-out scores and the
stability indicators of :mod:`mtrl.stability`); ``reward_curves.png``: one panel per scheme of its training
reward's change from its start (each scheme's reward has its own scale, so raw curves side by side look
flat), beside held-out chrF over steps (the ``eval_chrf`` rows of cells run with ``train.eval_every``);
``kl_entropy.png``; the resolved recipe of every cell under ``recipes/``; and ``command.txt``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mtrl.errors import MtrlError
from mtrl.io import atomic_open, writing
from mtrl.recipe import Recipe, dump_recipe, load_recipe, yaml_error
from mtrl.stability import EDGE_ROWS, SMOOTH_WINDOW, load_eval_curve, load_metrics, seed_band, smooth

BENCH_KEYS = ("base", "evaluation", "output", "overrides", "schemes", "seeds")
EVALUATION_KEYS = ("comet", "detector")
DEFAULT_DETECTOR: dict[str, Any] = {"name": "reference"}  # the embedded reference detector, its defaults
SCORES = ("bleu", "chrf", "detector_score", "comet")  # the held-out scores of eval.json, in table order


@dataclass
class Bench:
    base: Path
    output: Path
    seeds: list[int]
    schemes: dict[str, list[str]]
    overrides: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=lambda: {"detector": dict(DEFAULT_DETECTOR), "comet": None})


# --------------------------------------------------------------------------- the benchmark file
def _evaluation(path: str | Path, value: Any) -> dict[str, Any]:
    """The ``evaluation:`` key with its defaults; a detector must be given (null would mean each cell's own)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise MtrlError(f"{path}: 'evaluation' must be a mapping with keys {', '.join(EVALUATION_KEYS)}, "
                        f"e.g. {{detector: {{name: reference}}}}; got {value!r}")
    for key in value:
        if key not in EVALUATION_KEYS:
            raise MtrlError(f"{path}: unknown key 'evaluation.{key}'; allowed: {', '.join(EVALUATION_KEYS)}")
    detector = value.get("detector", DEFAULT_DETECTOR)
    if not isinstance(detector, dict):
        raise MtrlError(f"{path}: 'evaluation.detector' must be a detector mapping such as {{name: reference}} "
                        f"(one scorer for every cell; null would score each cell with its own training detector)")
    comet = value.get("comet")
    if comet is not None and not isinstance(comet, str):
        raise MtrlError(f"{path}: 'evaluation.comet' must be a COMET checkpoint (hub id or path) or null")
    return {"detector": detector, "comet": comet}


def evaluation_override(evaluation: dict[str, Any]) -> str:
    """The recipe override that replaces a cell's whole ``evaluation`` section (JSON is YAML)."""
    return "evaluation=" + json.dumps(evaluation)


def load_bench(path: str | Path) -> Bench:
    p = Path(path)
    if not p.is_file():
        raise MtrlError(f"{path}: no such benchmark file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise yaml_error(path, e) from None
    for key in data:
        if key not in BENCH_KEYS:
            raise MtrlError(f"{path}: unknown key '{key}'; allowed: {', '.join(BENCH_KEYS)}")
    for key in ("base", "schemes"):
        if key not in data:
            raise MtrlError(f"{path}: '{key}' is required")
    schemes = data["schemes"]
    if not isinstance(schemes, dict) or not schemes or not all(isinstance(v, list) for v in schemes.values()):
        raise MtrlError(f"{path}: 'schemes' must map scheme names to lists of key=value overrides")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise MtrlError(f"{path}: 'seeds' must be a list of integers")
    bench = Bench(base=(p.parent / data["base"]).resolve(), output=(p.parent / data.get("output", "bench")).resolve(),
                  seeds=seeds, schemes={str(k): [str(x) for x in v] for k, v in schemes.items()},
                  overrides=[str(x) for x in data.get("overrides", [])],
                  evaluation=_evaluation(path, data.get("evaluation")))
    for where, ovs in [("overrides", bench.overrides), *[(f"scheme '{n}'", o) for n, o in bench.schemes.items()]]:
        for ov in ovs:
            if ov.split("=", 1)[0].strip().split(".")[0] == "evaluation":
                raise MtrlError(f"{path}: {where}: '{ov}' is not allowed: the bench file's 'evaluation' key "
                                f"sets one evaluation for every cell")
    # validate every cell's recipe before running anything, each error under the key that caused it
    try:
        load_recipe(bench.base, bench.overrides)
    except MtrlError as e:
        raise MtrlError(f"{path}: {e}") from None
    try:
        load_recipe(bench.base, [*bench.overrides, evaluation_override(bench.evaluation)])
    except MtrlError as e:
        raise MtrlError(f"{path}: evaluation: {e}") from None
    for name, ovs in bench.schemes.items():
        try:
            load_recipe(bench.base, [*bench.overrides, *ovs])
        except MtrlError as e:
            raise MtrlError(f"{path}: scheme '{name}': {e}") from None
    return bench


def cell_dir(bench: Bench, scheme: str, seed: int) -> Path:
    return bench.output / "runs" / scheme / f"seed-{seed}"


def cell_recipe(bench: Bench, scheme: str, seed: int, evaluation: dict[str, Any] | None = None) -> Recipe:
    """A cell's recipe: base, common overrides, the scheme, its seed and run directory, and last the bench's
    evaluation (``evaluation``: that with COMET dropped when it is not at hand)."""
    return load_recipe(bench.base, [*bench.overrides, *bench.schemes[scheme], f"seed={seed}",
                                    f"run_dir={cell_dir(bench, scheme, seed)}",
                                    evaluation_override(evaluation or bench.evaluation)])


def is_done(run_dir: Path) -> bool:
    try:
        return "after" in json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return False


def changed_sections(run_dir: Path, recipe: Recipe) -> list[str]:
    """Top-level recipe sections whose saved value (``run_dir/recipe.yaml``) differs from ``recipe``'s."""
    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return ["recipe.yaml"]
    now = yaml.safe_load(dump_recipe(recipe))
    return [k for k in sorted(set(now) | set(saved)) if now.get(k) != saved.get(k)]


def comet_unavailable(model: str | None) -> str | None:
    """Why COMET cannot be scored (None: the checkpoint is at hand). Checked once, not in every cell."""
    if not model:
        return "no COMET checkpoint given (evaluation.comet in the bench file)"
    try:
        from mtrl.comet import resolve_checkpoint

        resolve_checkpoint(model)
    except MtrlError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- running
def run_bench(path: str | Path, quiet: bool = False) -> Path:
    """Run every missing cell, then write the report; returns the report directory."""
    from mtrl.runner import run

    bench = load_bench(path)
    with writing(bench.output):
        bench.output.mkdir(parents=True, exist_ok=True)
    evaluation = dict(bench.evaluation)
    comet_skipped = comet_unavailable(evaluation["comet"])
    if comet_skipped and evaluation["comet"]:
        print(f"mtrl bench: COMET is skipped: {comet_skipped}", file=sys.stderr)
        evaluation["comet"] = None
    cells = [(s, seed) for seed in bench.seeds for s in bench.schemes]  # every scheme once before any repeats
    for i, (scheme, seed) in enumerate(cells, 1):
        run_dir = cell_dir(bench, scheme, seed)
        recipe = cell_recipe(bench, scheme, seed, evaluation)
        name = f"mtrl bench: [{i}/{len(cells)}] {scheme} seed {seed}"
        if is_done(run_dir):
            changed = changed_sections(run_dir, recipe)
            if not changed:
                print(f"{name}: done, skipped", file=sys.stderr)
                continue
            print(f"{name}: ran with another recipe ({', '.join(changed)} changed), running it again",
                  file=sys.stderr)
        if run_dir.exists():  # an unfinished or changed cell restarts from scratch
            shutil.rmtree(run_dir)
        print(f"{name} ...", file=sys.stderr)
        t0 = time.perf_counter()
        run(recipe, quiet=quiet)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    write_report(bench, Path(path), comet_skipped)
    return bench.output


# --------------------------------------------------------------------------- results
def _metric(ev: dict[str, Any], key: str) -> float:
    v = ev.get(key)
    v = v.get("score") if isinstance(v, dict) else v
    return float(v) if isinstance(v, (int, float)) else math.nan


def collect(bench: Bench) -> pd.DataFrame:
    """One row per finished cell: held-out scores before/after, why COMET was skipped, stability indicators."""
    from mtrl.stability import stability_report

    rows = []
    for scheme in bench.schemes:
        for seed in bench.seeds:
            run_dir = cell_dir(bench, scheme, seed)
            if not is_done(run_dir):
                continue
            ev = json.loads((run_dir / "eval.json").read_text())
            row: dict[str, Any] = {"scheme": scheme, "seed": seed}
            for m in SCORES:
                row[m] = _metric(ev["after"], m)
                row[f"{m}_before"] = _metric(ev.get("before", {}), m)
            comet = ev["after"].get("comet")
            row["comet_skipped"] = comet.get("skipped") if isinstance(comet, dict) else None
            try:
                rep = stability_report(run_dir)
            except MtrlError:  # offline schemes (qsft) log trainer losses, not rollout rewards
                rep = None
            if rep:
                row.update(final_reward=rep["reward"].get("final"), reward_slope_100=rep["reward"].get("slope_per_100_steps"),
                           final_kl=rep["kl"].get("final"), entropy_ratio=rep["entropy"].get("ratio"),
                           flags=",".join(k for k, v in rep["flags"].items() if v) or "-")
            rows.append(row)
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """mean ± std over seeds per scheme (a column with no number at all is left out)."""
    cols = [c for c in (*SCORES, "final_reward", "reward_slope_100", "final_kl", "entropy_ratio")
            if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any()]
    out = []
    for scheme in order:
        part = df[df["scheme"] == scheme]
        if part.empty:
            continue
        row = {"scheme": scheme, "seeds": len(part)}
        for c in cols:
            vals = pd.to_numeric(part[c], errors="coerce").dropna()
            row[c] = f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}" if len(vals) > 1 else (
                f"{vals.mean():.2f}" if len(vals) else "n/a")
        if "flags" in part.columns:
            flags = sorted({f for x in part["flags"].dropna() for f in str(x).split(",") if f and f != "-"})
            row["flags (any seed)"] = ", ".join(flags) or "-"
        out.append(row)
    return pd.DataFrame(out)


def describe_detector(detector: dict[str, Any]) -> str:
    """``reference detector with its defaults`` / ``... with omission_weight 10``, for the report."""
    opts = {**{k: v for k, v in detector.items() if k not in ("name", "options") and v is not None},
            **detector.get("options", {})}
    return f"{detector['name']} detector with {', '.join(f'{k} {v}' for k, v in opts.items()) or 'its defaults'}"


def score_labels(evaluation: dict[str, Any]) -> dict[str, str]:
    """Report column names of the held-out scores: they name the fixed scorer, e.g. "reference-detector score"."""
    return {"bleu": "BLEU", "chrf": "chrF", "detector_score": f"{evaluation['detector']['name']}-detector score",
            "comet": "COMET", "final_reward": "final reward", "reward_slope_100": "reward slope / 100 steps",
            "final_kl": "final KL", "entropy_ratio": "entropy ratio"}


def comet_note(df: pd.DataFrame, evaluation: dict[str, Any], skipped: str | None) -> str:
    """One sentence on COMET: which checkpoint scored it, or why it was skipped."""
    if "comet" in df and df["comet"].notna().any():
        return f"COMET: `{evaluation['comet']}`."
    reasons = sorted({str(r) for r in df.get("comet_skipped", pd.Series(dtype=object)).dropna()})
    if skipped or reasons:
        return f"COMET: skipped: {'; '.join(reasons) if reasons else skipped}."
    if evaluation.get("comet"):
        return f"COMET: `{evaluation['comet']}` was set, but no cell's `eval.json` has a COMET score."
    return f"COMET: skipped: {comet_unavailable(None)}."


def write_report(bench: Bench, bench_path: Path, comet_skipped: str | None = None) -> None:
    from mtrl.stability import plot_kl_entropy

    df = collect(bench)
    if df.empty:
        raise MtrlError("no finished cells to report")
    table = summarise(df, list(bench.schemes))
    labels = score_labels(bench.evaluation)
    out = bench.output
    with atomic_open(out / "results.csv") as f:
        df.to_csv(f, index=False)
    first = df.iloc[0]
    before = ", ".join(f"{labels[m]} {first[f'{m}_before']:.2f}" for m in SCORES
                       if not math.isnan(first[f"{m}_before"]))
    every = load_recipe(bench.base, bench.overrides).train.eval_every
    md = ["# Benchmark results", "",
          f"Base recipe `{bench.base.name}`, seeds {bench.seeds}, common overrides {bench.overrides or '-'}.",
          f"Every cell is scored by the same scorers on the recipe's eval set, whatever reward it was trained on: "
          f"BLEU and chrF (sacrebleu defaults) and the {describe_detector(bench.evaluation['detector'])} "
          f"(column \"{labels['detector_score']}\"). {comet_note(df, bench.evaluation, comet_skipped)}",
          f"The initial policy (the same for every cell) has {before}. Scores after training, mean ± sample std "
          f"over seeds.", "",
          table.rename(columns=labels).to_markdown(index=False), "",
          "Per cell: `results.csv`. `reward_curves.png`: each scheme's training reward minus its mean over its "
          f"first logged steps (moving average {SMOOTH_WINDOW}, mean ± std over seeds), one panel per scheme, and "
          + (f"held-out chrF every {every} steps" if every else "held-out chrF before and after training")
          + ". `kl_entropy.png`: KL to the reference and policy entropy."]
    with atomic_open(out / "results.md") as f:
        f.write("\n".join(md) + "\n")
    dirs = {s: [cell_dir(bench, s, seed) for seed in bench.seeds if is_done(cell_dir(bench, s, seed))]
            for s in bench.schemes}
    online = {s: d for s, d in dirs.items() if "final_reward" in df.columns
              and df[df["scheme"] == s]["final_reward"].notna().any()}
    if online:
        plot_reward_changes(online, {s: d for s, d in dirs.items() if d}, out / "reward_curves.png")
        plot_kl_entropy(online, out / "kl_entropy.png")
    recipes = out / "recipes"
    for scheme in bench.schemes:
        for seed in bench.seeds:
            src = cell_dir(bench, scheme, seed) / "recipe.yaml"
            if src.exists():
                data = src.read_bytes()
                with atomic_open(recipes / f"{scheme}-seed-{seed}.yaml", "wb") as f:
                    f.write(data)
    with atomic_open(out / "command.txt") as f:
        f.write(f"mtrl bench {bench_path}\n")
    print(table.rename(columns=labels).to_markdown(index=False))
    print(f"report: {out}/results.md")


# --------------------------------------------------------------------------- curves (numbers, then plots)
def reward_change(metrics: pd.DataFrame, window: int = SMOOTH_WINDOW, start_rows: int = EDGE_ROWS) -> pd.Series:
    """One run's ``reward_mean`` minus its mean over its first rows, smoothed; indexed by step.

    The start is stability's "initial" value (the first ``start_rows`` rows, at most a fifth of the run), so
    every scheme's curve starts near 0 whatever its reward's scale.
    """
    r = metrics.set_index("step")["reward_mean"].astype(float)
    k = max(1, min(start_rows, len(r) // 5))
    return smooth(r - r.iloc[:k].mean(), window)


def reward_change_bands(runs: dict[str, list[Path]], window: int = SMOOTH_WINDOW) -> dict[str, pd.DataFrame]:
    """Per scheme: its reward's change from the start, mean ± std over seeds."""
    return {s: seed_band([reward_change(load_metrics(d), window) for d in dirs]) for s, dirs in runs.items() if dirs}


def chrf_curve(run_dir: Path) -> pd.Series:
    """Held-out chrF by step: ``before`` of ``eval.json`` at step 0, then the ``eval_chrf`` rows (empty if none)."""
    try:
        curve = load_eval_curve(run_dir)
    except (MtrlError, OSError):  # no metrics.jsonl, or an offline algorithm's log (no rollout rewards)
        return pd.Series(dtype=float)
    if "eval_chrf" not in curve:
        return pd.Series(dtype=float)
    ev = json.loads((run_dir / "eval.json").read_text())
    points = curve.set_index("step")["eval_chrf"].astype(float).dropna()
    return pd.concat([pd.Series({0: _metric(ev.get("before", {}), "chrf")}).dropna(), points])


def chrf_bands(runs: dict[str, list[Path]]) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Per scheme, held-out chrF (mean ± std over seeds): curves of schemes with ``eval_chrf`` rows, and
    before/after (index 0, 1) of the others (whole-run algorithms, or cells run without ``train.eval_every``)."""
    curves, ends = {}, {}
    for scheme, dirs in runs.items():
        series = [chrf_curve(d) for d in dirs]
        if series and all(len(c) > 1 for c in series):
            curves[scheme] = seed_band(series)
        elif dirs:
            evs = [json.loads((d / "eval.json").read_text()) for d in dirs]
            ends[scheme] = seed_band([pd.Series([_metric(e.get("before", {}), "chrf"), _metric(e["after"], "chrf")])
                                      for e in evs])
    return curves, ends


def _band(ax: Any, band: pd.DataFrame, color: Any, label: str, **kw: Any) -> None:
    ax.plot(band.index, band["mean"], color=color, label=label, **kw)
    ax.fill_between(band.index, band["mean"] - band["std"], band["mean"] + band["std"], color=color, alpha=0.2,
                    linewidth=0)


def plot_reward_changes(online: dict[str, list[Path]], runs: dict[str, list[Path]], out: Path,
                        window: int = SMOOTH_WINDOW) -> Path:
    """One panel per online scheme (reward change from its start) and a panel of held-out chrF (PNG).

    ``online``: schemes with rollout rewards in ``metrics.jsonl``; ``runs``: every scheme (for chrF).
    Whole-run schemes and cells without ``eval_chrf`` rows show before -> after as two dashed points.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    colors = {s: colormaps["tab10"](i % 10) for i, s in enumerate(runs)}
    rewards = reward_change_bands(online, window)
    curves, ends = chrf_bands(runs)
    n = len(rewards) + 1
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (scheme, band) in zip(axes, rewards.items()):
        _band(ax, band, colors[scheme], scheme)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{scheme} (n={len(online[scheme])})", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("reward − start")
        ax.grid(alpha=0.3)
    ax = axes[len(rewards)]
    last = max([int(b.index.max()) for b in curves.values()] + [int(b.index.max()) for b in rewards.values()] + [1])
    for scheme, band in curves.items():
        _band(ax, band, colors[scheme], scheme, marker="o", markersize=3)
    for scheme, band in ends.items():  # no curve: before at 0, after at the end of the longest curve
        _band(ax, band.set_axis(band.index * last), colors[scheme], f"{scheme} (before/after)", marker="s",
              linestyle="--")
    ax.set_title("held-out chrF", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("chrF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for extra in axes[n:]:
        extra.set_visible(False)
    fig.suptitle(f"Training reward: change from its start (mean ± std over seeds, moving average {window})",
                 fontsize=11)
    out = Path(out)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return out
