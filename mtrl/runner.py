"""The runner: what every algorithm shares, from a recipe to checkpoints, logs and ``eval.json``.

``mtrl train RECIPE.yaml`` calls :func:`run`: prepare the run directory, get the initial
policy (the shipped tiny model, a hub id or path, or a supervised warm start), load the data,
build the detector and the :class:`~mtrl.rewards.Rewarder`, let the recipe's algorithm
(:mod:`mtrl.algorithms`) train, and evaluate before (once) and after. On-policy algorithms
(PPO, REINFORCE, RLOO) are stepped here, with checkpoints and resume; whole-run ones (GRPO,
Q-SFT) get one ``fit`` call.

Resumable: every ``save_every`` steps a checkpoint (policy, the algorithm's optimiser and
state, RNG states) is written atomically; the batch order is a pure function of (seed, step),
so 2 + 2 steps after ``--resume`` equal 4 steps straight. Ctrl-C finishes the current step,
saves and exits; a second Ctrl-C aborts at once (the last checkpoint stays valid).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtrl.algorithms import RunContext, build_algorithm
from mtrl.datasets import batch_indices, load_pairs
from mtrl.errors import MtrlError
from mtrl.evaluate import score_translations, translate
from mtrl.io import atomic_open, write_json
from mtrl.policy import build_policy, resolve_model
from mtrl.recipe import Recipe, dump_recipe
from mtrl.rewards import Rewarder

Pair = tuple[str, str]


# --------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, policy: Any, algorithm_state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step-N`` via a temporary directory and a rename; point ``latest`` at it."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in policy.state_dict().items()}, tmp / "policy.pt")
    torch.save({"algorithm": algorithm_state, "rng": rng_state(), "step": step}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with atomic_open(ckpt_root / "latest") as f:
        f.write(final.name + "\n")
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


# --------------------------------------------------------------------------- logging
class MetricsLogger:
    """``metrics.jsonl`` (one line per step), TensorBoard and W&B when asked."""

    def __init__(self, run_dir: Path, report_to: Sequence[str], recipe: Recipe, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # drop steps after the checkpoint we resume from (or all, on a fresh run)
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with atomic_open(self.path) as f:
                f.write("".join(ln + "\n" for ln in kept))
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise MtrlError("train.report_to has 'wandb' but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project="mtrl", dir=str(run_dir), config=recipe.to_dict(), resume="allow")

    def log(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "step":
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class StopFlag:
    """First Ctrl-C: stop after the current step and save. Second: abort now."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> StopFlag:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nmtrl: stopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._old)


# --------------------------------------------------------------------------- the run
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initial_model(recipe: Recipe, run_dir: Path, quiet: bool) -> str:
    """The weights RL starts from: a supervised warm start trained here (cached), or ``policy.model``."""
    if recipe.policy.model == "warmstart":
        from mtrl.warmstart import warm_start

        if not quiet:
            print("mtrl: warm start (supervised) ...", file=sys.stderr)
        return str(warm_start(recipe.warm_start.options, run_dir, progress=not quiet))
    return resolve_model(recipe.policy.model)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Create the run directory; returns the checkpoint to resume from, if any."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        print(f"mtrl: no checkpoint in {run_dir}/checkpoints; starting from step 0", file=sys.stderr)
    if overwrite and not resume:  # start afresh; a cached warm start is kept
        for name in ("checkpoints", "final", "tensorboard", "offline", "grpo"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "eval.json"):
            (run_dir / name).unlink(missing_ok=True)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise MtrlError(f"{run_dir} already holds a run; use --resume to continue it, --overwrite to start "
                        "it again (a cached warm start is kept), or another run_dir")
    return ckpt


def run(recipe: Recipe, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe end to end; returns ``{"before": ..., "after": ...}`` when there is an eval set."""
    from accelerate import Accelerator

    t_start = time.perf_counter()
    run_dir = Path(recipe.run_dir)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    ckpt = prepare_run_dir(run_dir, resume, overwrite)
    with atomic_open(run_dir / "recipe.yaml") as f:
        f.write(dump_recipe(recipe))
    seed_everything(recipe.seed)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))

    # 1. the policy to start from, the data, the reward pipeline
    model_path = initial_model(recipe, run_dir, quiet)
    seed_everything(recipe.seed)
    d = recipe.data
    train_pairs = load_pairs(d.train, d.source_field, d.reference_field, d.max_train_examples)
    eval_pairs = load_pairs(d.eval, d.source_field, d.reference_field, d.max_eval_examples) if d.eval else None
    detector = recipe.detector.build()
    accelerator = Accelerator(cpu=recipe.train.cpu, mixed_precision=recipe.train.mixed_precision)
    policy = build_policy(recipe.policy, model_path, d.src_lang, d.tgt_lang).to(accelerator.device)
    rewarder = Rewarder(recipe.reward, detector, policy.tokenizer, use_reference=recipe.detector.use_reference)

    # 2. the algorithm (it owns its optimiser, reference model and value head, if any)
    algo = build_algorithm(recipe.algorithm, policy, rewarder, recipe.generation, accelerator, recipe.train.steps)
    start_step = 0
    if ckpt is not None:
        policy.load_state_dict(torch.load(ckpt / "policy.pt", map_location=accelerator.device))
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
        algo.load_state_dict(state["algorithm"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        log(f"mtrl: resumed from {ckpt} (step {start_step})")

    # 3. evaluation before training, once (kept in eval.json across resumes)
    def evaluate(translate_fn: Any) -> dict[str, Any]:
        rng = rng_state()  # evaluation must not shift the sampling RNG
        sources, refs = [p[0] for p in eval_pairs], [p[1] for p in eval_pairs]
        out = score_translations(sources, translate_fn(sources), refs, rewarder.detect)
        set_rng_state(rng)
        return out

    results_path = run_dir / "eval.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if (ckpt and results_path.exists()) else {}
    policy_translate = lambda sources: translate(policy, sources, recipe.generation)  # noqa: E731
    if eval_pairs and "before" not in results:
        log(f"mtrl: evaluating the initial policy on {len(eval_pairs)} segments ...")
        results["before"] = evaluate(policy_translate)
        write_json(results_path, results)

    # 4. training
    logger = MetricsLogger(run_dir, recipe.train.report_to, recipe, start_step)
    try:
        if hasattr(algo, "step"):
            stopped = train_loop(algo, recipe, train_pairs, start_step, logger, rewarder, quiet,
                                 evaluate=(lambda: evaluate(policy_translate)) if eval_pairs else None)
            if stopped:
                log(f"mtrl: stopped at step {stopped}; checkpoint saved. Continue with: "
                    f"mtrl train {run_dir}/recipe.yaml --resume")
                raise KeyboardInterrupt
        else:
            algo.fit(RunContext(train_pairs, run_dir, recipe.seed, model_path, recipe.offline, log, logger.log,
                                progress=not quiet))
    finally:
        logger.close()

    # 5. the final model, and evaluation after training
    if not getattr(algo, "writes_final", False):
        save_final(policy, run_dir)
    if eval_pairs:
        log(f"mtrl: evaluating the trained policy on {len(eval_pairs)} segments ...")
        results["after"] = evaluate(getattr(algo, "translate", policy_translate))
    results["wall_time_s"] = results.get("wall_time_s", 0.0) + (time.perf_counter() - t_start)
    write_json(results_path, results)
    return results


def train_loop(algo: Any, recipe: Recipe, train_pairs: Sequence[Pair], start_step: int, logger: MetricsLogger,
               rewarder: Rewarder, quiet: bool, evaluate: Any = None) -> int:
    """Step an on-policy algorithm to ``train.steps``, logging and checkpointing; returns the step at which
    Ctrl-C stopped it, or 0 when it ran to the end."""
    t, run_dir = recipe.train, Path(recipe.run_dir)
    step = start_step
    bar = tqdm(total=t.steps, initial=start_step, desc=f"{recipe.algorithm.name} ({recipe.reward.mode} rewards)",
               disable=quiet, dynamic_ncols=True)
    with StopFlag() as stop:
        while step < t.steps and not stop.requested:
            idx = batch_indices(len(train_pairs), recipe.algorithm.batch_size, step, recipe.seed)
            metrics = algo.step([train_pairs[i][0] for i in idx], [train_pairs[i][1] for i in idx])
            step += 1
            metrics = {"step": step, **metrics,
                       "score_cache_hit_rate": rewarder.hits / max(1, rewarder.hits + rewarder.misses)}
            if step % t.log_every == 0 or step == t.steps:
                logger.log(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", score=f"{metrics['sentence_score_mean']:.3f}",
                            kl=f"{metrics['kl']:.3f}")
            if step % t.save_every == 0 or stop.requested or step == t.steps:
                save_checkpoint(run_dir, step, algo.policy, algo.state_dict())
            if t.eval_every and evaluate is not None and step % t.eval_every == 0:
                ev = evaluate()
                logger.log({"step": step, **{f"eval_{k}": v["score"] if isinstance(v, dict) else v
                                             for k, v in ev.items() if k != "examples"}})
    bar.close()
    return step if (stop.requested and step < t.steps) else 0


def save_final(policy: Any, run_dir: Path) -> Path:
    """``final/``: the model and tokenizer (save_pretrained), plus the value head when there is one."""
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.model.save_pretrained(tmp)
    policy.tokenizer.save_pretrained(tmp)
    if policy.value_head is not None:
        torch.save(policy.value_head.state_dict(), tmp / "value_head.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def print_summary(results: dict[str, Any], run_dir: str) -> None:
    from mtrl.evaluate import format_table

    rows = {k: {m: v for m, v in results[k].items() if m in ("bleu", "chrf", "ter", "detector_score")}
            for k in ("before", "after") if k in results}
    if rows:
        print(format_table(rows))
    held = [n for n in ("eval.json", "metrics.jsonl", "final/", "checkpoints/", "offline/") if (Path(run_dir) / n).exists()]
    print(f"run directory: {run_dir} ({', '.join(held)})")
