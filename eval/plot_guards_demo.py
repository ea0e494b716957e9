"""Plot and summarise the length-guard demonstration (``mtrl bench eval/bench-guards.yaml`` first).

    python eval/plot_guards_demo.py [--runs eval/results/guards-demo/runs]

Writes ``guards_demo.png`` beside ``runs/``: per scheme (mean ± std over seeds), the training samples' length
ratio to their source and the share shorter than 0.9 x the source (the guard's trip rate, logged with or
without the guard), and held-out chrF and detector score over steps (step 0: ``eval.json``'s ``before``).
Prints ``name: value`` lines per scheme: those figures at the start and the end (mean over seeds), and the
share of seeds that ``mtrl stability`` flags for reward hacking and length drift.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from mtrl.stability import (
    load_eval_curve,
    load_eval_json,
    metric_curves,
    seed_band,
    stability_report,
)

ROOT = Path(__file__).resolve().parent
PANELS = [("length_ratio_mean", "length ratio to the source (train samples)"),
          ("guard_length", "share shorter than 0.9 x source (train)"),
          ("eval_chrf", "held-out chrF (test2016)"),
          ("eval_detector_score", "held-out detector score (no omission weight)")]


def eval_curve(run: Path, column: str) -> pd.Series:
    """A held-out score by step, with ``eval.json``'s ``before`` at step 0."""
    curve = load_eval_curve(run)
    series = curve.set_index("step")[column].astype(float) if column in curve else pd.Series(dtype=float)
    before = load_eval_json(run).get("before", {}).get(column.removeprefix("eval_"))
    if before is not None:
        series = pd.concat([pd.Series({0: before}), series])
    return series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "results" / "guards-demo" / "runs")
    args = ap.parse_args()
    runs = {d.name: sorted(d.glob("seed-*")) for d in sorted(args.runs.iterdir()) if d.is_dir()}
    runs = {"no-guard": runs["no-guard"], "length-guard": runs["length-guard"]}

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), layout="tight")
    axes = fig.subplots(2, 2).ravel()
    for ax, (column, title) in zip(axes, PANELS):
        for scheme, dirs in runs.items():
            curves = ([eval_curve(d, column) for d in dirs] if column.startswith("eval_")
                      else metric_curves(dirs, column))
            band = seed_band(curves)
            line = ax.plot(band.index, band["mean"], marker="o" if column.startswith("eval_") else None,
                           label=f"{scheme} (n={len(dirs)})")[0]
            ax.fill_between(band.index, band["mean"] - band["std"], band["mean"] + band["std"],
                            color=line.get_color(), alpha=0.2, linewidth=0)
            first, last = band["mean"].iloc[0], band["mean"].iloc[-1]
            print(f"{scheme}_{column}_start: {first:.4f}")
            print(f"{scheme}_{column}_end: {last:.4f}")
            ends = [c.iloc[-1] for c in curves]
            print(f"{scheme}_{column}_end_std: {np.std(ends, ddof=1):.4f}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    out = args.runs.parent / "guards_demo.png"
    with open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    for scheme, dirs in runs.items():
        reports = [stability_report(d) for d in dirs]
        for flag in ("reward_hacking", "length_drift"):
            print(f"{scheme}_frac_{flag}: {np.mean([r['flags'][flag] for r in reports]):.2f}")
        for key in ("bleu", "chrf", "detector_score"):
            after = [load_eval_json(d)["after"][key] for d in dirs]
            print(f"{scheme}_after_{key}: {np.mean(after):.2f} ± {np.std(after, ddof=1):.2f}")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
