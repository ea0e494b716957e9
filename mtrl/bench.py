"""``mtrl bench BENCH.yaml``: reward schemes x seeds on one base recipe, same budget, one report.

A benchmark file::

    base: ../recipes/quickstart.yaml       # relative to the benchmark file
    output: results/bench-quickstart       # report directory (relative to the benchmark file)
    seeds: [0, 1, 2]
    overrides: [train.steps=100]           # applied to every cell
    schemes:                               # name -> overrides of that scheme
      sentence: [reward.mode=sentence]
      token: [reward.mode=token]

Every cell (scheme, seed) is a normal ``mtrl train`` run in ``OUTPUT/runs/SCHEME/seed-N``; a cell whose
``eval.json`` already has ``after`` is skipped, so an interrupted benchmark resumes. When the base recipe
has a warm start, it is trained once into ``OUTPUT/warmstart`` and every cell starts from it (same
initial policy for all schemes). The report: ``results.md`` and ``results.csv`` (mean ± std over seeds of
the held-out metrics and the stability indicators of :mod:`mtrl.stability`), ``reward_curves.png``,
``kl_entropy.png``, the resolved recipe of every cell under ``recipes/``, and ``command.txt``.
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
from mtrl.io import atomic_open
from mtrl.recipe import load_recipe, yaml_error


@dataclass
class Bench:
    base: Path
    output: Path
    seeds: list[int]
    schemes: dict[str, list[str]]
    overrides: list[str] = field(default_factory=list)


def load_bench(path: str | Path) -> Bench:
    p = Path(path)
    if not p.is_file():
        raise MtrlError(f"{path}: no such benchmark file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise yaml_error(path, e) from None
    allowed = {"base", "output", "seeds", "schemes", "overrides"}
    for key in data:
        if key not in allowed:
            raise MtrlError(f"{path}: unknown key '{key}'; allowed: {', '.join(sorted(allowed))}")
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
                  overrides=[str(x) for x in data.get("overrides", [])])
    for name, ovs in bench.schemes.items():  # validate every cell's recipe before running anything
        try:
            load_recipe(bench.base, [*bench.overrides, *ovs])
        except MtrlError as e:
            raise MtrlError(f"{path}: scheme '{name}': {e}") from None
    return bench


def cell_dir(bench: Bench, scheme: str, seed: int) -> Path:
    return bench.output / "runs" / scheme / f"seed-{seed}"


def is_done(run_dir: Path) -> bool:
    try:
        return "after" in json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return False


def run_bench(path: str | Path, quiet: bool = False) -> Path:
    """Run every missing cell, then write the report; returns the report directory."""
    from mtrl.runner import run

    bench = load_bench(path)
    bench.output.mkdir(parents=True, exist_ok=True)
    base = load_recipe(bench.base, bench.overrides)
    shared: list[str] = []
    if base.warm_start.enabled and base.policy.model == "warmstart":
        from mtrl.warmstart import warm_start

        print("mtrl bench: warm start (shared by every cell) ...", file=sys.stderr)
        model = warm_start(base.warm_start.options, bench.output, progress=not quiet)
        shared = [f"policy.model={model}", "warm_start.enabled=false"]
    cells = [(s, seed) for seed in bench.seeds for s in bench.schemes]  # every scheme once before any repeats
    for i, (scheme, seed) in enumerate(cells, 1):
        run_dir = cell_dir(bench, scheme, seed)
        if is_done(run_dir):
            print(f"mtrl bench: [{i}/{len(cells)}] {scheme} seed {seed}: done, skipped", file=sys.stderr)
            continue
        if run_dir.exists():  # an unfinished cell restarts from scratch (its steps were not all logged)
            shutil.rmtree(run_dir)
        print(f"mtrl bench: [{i}/{len(cells)}] {scheme} seed {seed} ...", file=sys.stderr)
        recipe = load_recipe(bench.base, [*bench.overrides, *shared, *bench.schemes[scheme], f"seed={seed}",
                                          f"run_dir={run_dir}"])
        t0 = time.perf_counter()
        run(recipe, quiet=quiet)
        print(f"mtrl bench: [{i}/{len(cells)}] {scheme} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    write_report(bench, Path(path))
    return bench.output


def _metric(ev: dict[str, Any], key: str) -> float:
    v = ev.get(key)
    v = v.get("score") if isinstance(v, dict) else v
    return float(v) if isinstance(v, (int, float)) else math.nan


def collect(bench: Bench) -> pd.DataFrame:
    """One row per finished cell: held-out metrics before/after and stability indicators."""
    from mtrl.stability import stability_report

    rows = []
    for scheme in bench.schemes:
        for seed in bench.seeds:
            run_dir = cell_dir(bench, scheme, seed)
            if not is_done(run_dir):
                continue
            ev = json.loads((run_dir / "eval.json").read_text())
            row: dict[str, Any] = {"scheme": scheme, "seed": seed}
            for m in ("bleu", "chrf", "detector_score"):
                row[m] = _metric(ev["after"], m)
                row[f"{m}_before"] = _metric(ev.get("before", {}), m)
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
    """mean ± std over seeds per scheme."""
    cols = [c for c in ("bleu", "chrf", "detector_score", "final_reward", "reward_slope_100", "final_kl",
                        "entropy_ratio") if c in df.columns]
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


def write_report(bench: Bench, bench_path: Path) -> None:
    from mtrl.stability import plot_kl_entropy, plot_reward_curves

    df = collect(bench)
    if df.empty:
        raise MtrlError("no finished cells to report")
    table = summarise(df, list(bench.schemes))
    out = bench.output
    with atomic_open(out / "results.csv") as f:
        df.to_csv(f, index=False)
    before = df[["bleu_before", "chrf_before", "detector_score_before"]].iloc[0]
    md = ["# Benchmark results", "",
          f"Base recipe `{bench.base.name}`, seeds {bench.seeds}, common overrides {bench.overrides or '-'}.",
          f"Held-out scores are on the recipe's eval set after training; the initial policy (same for every cell) "
          f"has BLEU {before['bleu_before']:.2f}, chrF {before['chrf_before']:.2f}, detector score "
          f"{before['detector_score_before']:.2f}. Mean ± sample std over seeds.", "",
          table.to_markdown(index=False), "", "Per cell: `results.csv`. Plots: `reward_curves.png`, `kl_entropy.png`."]
    with atomic_open(out / "results.md") as f:
        f.write("\n".join(md) + "\n")
    online = {s: [cell_dir(bench, s, seed) for seed in bench.seeds if is_done(cell_dir(bench, s, seed))]
              for s in bench.schemes if "final_reward" in df.columns
              and df[df["scheme"] == s]["final_reward"].notna().any()}
    if online:
        plot_reward_curves(online, out / "reward_curves.png")
        plot_kl_entropy(online, out / "kl_entropy.png")
    recipes = out / "recipes"
    recipes.mkdir(exist_ok=True)
    for scheme in bench.schemes:
        for seed in bench.seeds:
            src = cell_dir(bench, scheme, seed) / "recipe.yaml"
            if src.exists():
                shutil.copyfile(src, recipes / f"{scheme}-seed-{seed}.yaml")
    with atomic_open(out / "command.txt") as f:
        f.write(f"mtrl bench {bench_path}\n")
    print(table.to_markdown(index=False))
    print(f"report: {out}/results.md")
