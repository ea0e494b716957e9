"""Data-parallel scaling of PPO on CPU: two processes x one thread vs one process x one thread.

    python eval/bench_dp.py [--steps 12] [--batch-size 32] [--repeats 3]

Both runs are the real ``mtrl train`` command on the quickstart recipe (the shipped tiny Marian model), with
the same per-process batch; the two-process run is launched with ``torchrun`` (gloo), as ``accelerate
launch`` would. Samples/s is the global batch over the mean PPO step time (``step_time_s`` in
``metrics.jsonl``, the first step left out as warm-up); tokens/s likewise, over the sampled tokens (the
two runs sample different sources, so translations differ in length). The pair of runs is repeated,
interleaved (``--repeats``), and the ratios are medians over the pairs: this machine is noisy. Prints
``name: value`` lines; the target for ``dp2_vs_dp1_samples_per_s`` is >= 1.6.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(n_proc: int, run_dir: Path, steps: int, batch_size: int) -> list[dict]:
    launcher = [sys.executable, "-m", "mtrl.cli"] if n_proc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_proc), "-m", "mtrl.cli"]
    cmd = [*launcher, "train", "recipes/quickstart.yaml", f"run_dir={run_dir}", f"train.steps={steps}",
           f"train.save_every={steps}", "train.threads=1", "train.report_to=[]", "data.eval=null",
           f"algorithm.batch_size={batch_size}", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def samples_per_s(rows: list[dict], global_batch: int) -> float:
    times = [r["step_time_s"] for r in rows[1:]]
    return global_batch / (sum(times) / len(times))


def tokens_per_s(rows: list[dict]) -> float:
    """Sampled tokens per second over the steps (``tokens_per_s`` is summed over processes in the log)."""
    return sum(r["tokens_per_s"] for r in rows[1:]) / (len(rows) - 1)


def phase_times(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per step of each phase (PPO's time_* metrics), the first step left out."""
    keys = ("time_generate_s", "time_reward_s", "time_forward_s", "time_update_s")
    return {k: sum(r[k] for r in rows[1:]) / (len(rows) - 1) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32, help="sources per step per process (the quickstart's)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs of runs")
    args = ap.parse_args()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            one = train(1, Path(tmp) / f"dp1-{i}", args.steps, args.batch_size)
            two = train(2, Path(tmp) / f"dp2-{i}", args.steps, args.batch_size)
            pairs.append((one, two))
            print(f"pair_{i}_dp2_vs_dp1_samples_per_s: "
                  f"{samples_per_s(two, 2 * args.batch_size) / samples_per_s(one, args.batch_size):.3f}", flush=True)
    median = lambda xs: statistics.median(xs)  # noqa: E731
    one_sps = median([samples_per_s(o, args.batch_size) for o, _ in pairs])
    two_sps = median([samples_per_s(t, 2 * args.batch_size) for _, t in pairs])
    # where a step's time goes, per process: > 1 means slower under two processes
    for k in ("time_generate_s", "time_reward_s", "time_forward_s", "time_update_s"):
        print(f"dp2_vs_dp1_{k.removeprefix('time_')}: "
              f"{median([phase_times(t)[k] / phase_times(o)[k] for o, t in pairs]):.3f}")
    print(f"dp1_samples_per_s: {one_sps:.2f}")
    print(f"dp2_samples_per_s: {two_sps:.2f}")
    print(f"dp2_vs_dp1_tokens_per_s: {median([tokens_per_s(t) / tokens_per_s(o) for o, t in pairs]):.3f}")
    print(f"dp2_vs_dp1_samples_per_s: {median([samples_per_s(t, 2 * args.batch_size) / samples_per_s(o, args.batch_size) for o, t in pairs]):.3f}")
    print(f"dp2_distinct_sources_per_step: {min(r['distinct_sources'] for _, t in pairs for r in t)}")


if __name__ == "__main__":
    main()
