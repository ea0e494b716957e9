"""The runner: what every algorithm shares, from a recipe to checkpoints, logs and ``eval.json``.

``mtrl train RECIPE.yaml`` calls :func:`run`: check the run directory, load the data, build the
detector (and load its model), get the initial policy (the shipped tiny model, a hub id or path,
or a supervised warm start), build the :class:`~mtrl.rewards.Rewarder` and the recipe's algorithm
(:mod:`mtrl.algorithms`), read the checkpoint to resume from; only then start the run, evaluate
before (once), train and evaluate after. On-policy algorithms (PPO, REINFORCE, RLOO) are stepped
here, with checkpoints and resume; whole-run ones (GRPO, Q-SFT) get one ``fit`` call.

The run directory itself (what may be created, overwritten, resumed, and when) is
:mod:`mtrl.rundir`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtrl.algorithms import RunContext, build_algorithm
from mtrl.datasets import batch_indices, load_pairs
from mtrl.errors import one_line
from mtrl.evaluate import score_translations, translate
from mtrl.io import write_json
from mtrl.policy import build_policy, resolve_model
from mtrl.recipe import Recipe
from mtrl.rewards import Rewarder
from mtrl.rundir import (
    Checkpoint,
    MetricsLogger,
    RunDirGuard,
    StopFlag,
    apply_checkpoint,
    check_report_to,
    check_run_dir,
    kept_metrics,
    read_checkpoint,
    resume_changes,
    rng_state,
    save_checkpoint,
    set_aside_damaged,
    set_rng_state,
    write_recipe,
)

Pair = tuple[str, str]

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


def load_data(d: Any) -> tuple[list[Pair], list[Pair] | None]:
    """The train pairs and the eval pairs (None without ``data.eval``)."""
    train_pairs = load_pairs(d.train, d.source_field, d.reference_field, d.max_train_examples)
    eval_pairs = load_pairs(d.eval, d.source_field, d.reference_field, d.max_eval_examples) if d.eval else None
    return train_pairs, eval_pairs


def build_detector(cfg: Any) -> Any:
    """The detector, with its model loaded now: a missing xCOMET checkpoint must not wait for the first
    ``detect`` call, minutes into the "before" evaluation."""
    detector = cfg.build()
    if callable(getattr(detector, "load", None)):
        detector.load()
    return detector


def previous_results(run_dir: Path) -> dict[str, Any]:
    """``eval.json`` of the run resumed (its "before" evaluation is not repeated)."""
    path = run_dir / "eval.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        print(f"mtrl: warning: {path} cannot be read ({one_line(e)}); evaluating the initial policy again",
              file=sys.stderr)
        return {}


@dataclass
class Prior:
    """What ``--resume`` continues from (all empty on a fresh run or without a checkpoint)."""

    checkpoint: Checkpoint | None = None
    damaged: list[Path] = field(default_factory=list)  # checkpoints tried first that could not be read
    changes: dict[str, list[Any]] = field(default_factory=dict)  # allowed recipe changes: key -> [saved, new]
    results: dict[str, Any] = field(default_factory=dict)  # eval.json so far ("before")
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows up to the checkpoint
    wall_time_s: float = 0.0  # of the attempts before, up to the checkpoint

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint else 0


def read_prior(recipe: Recipe, run_dir: Path, device: Any) -> Prior:
    """Read (only) what a resumed run continues from, refusing what cannot be continued."""
    ckpt, damaged = read_checkpoint(run_dir, device)
    if ckpt is None:
        print(f"mtrl: no checkpoint in {run_dir}/checkpoints; starting from step 0", file=sys.stderr)
        return Prior()
    results = previous_results(run_dir)
    wall = ckpt.state.get("wall_time_s", results.get("wall_time_s", 0.0))  # older checkpoints: eval.json's
    return Prior(ckpt, damaged, resume_changes(recipe, run_dir, ckpt.step), results,
                 kept_metrics(run_dir, ckpt.step), float(wall))


def run(recipe: Recipe, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe end to end; returns ``{"before": ..., "after": ...}`` when there is an eval set."""
    from accelerate import Accelerator

    t_start = time.perf_counter()
    run_dir = Path(recipe.run_dir)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    check_run_dir(run_dir, resume, overwrite)
    check_report_to(recipe.train.report_to)
    guard, ckpt = RunDirGuard(run_dir), None
    try:
        # 1. everything that can fail on the user's input, before the run directory changes:
        #    the data, the detector, the policy, the algorithm, the checkpoint to resume from
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        seed_everything(recipe.seed)
        train_pairs, eval_pairs = load_data(recipe.data)
        detector = build_detector(recipe.detector)
        model_path = initial_model(recipe, run_dir, quiet)
        seed_everything(recipe.seed)
        accelerator = Accelerator(cpu=recipe.train.cpu, mixed_precision=recipe.train.mixed_precision)
        policy = build_policy(recipe.policy, model_path, recipe.data.src_lang,
                              recipe.data.tgt_lang).to(accelerator.device)
        rewarder = Rewarder(recipe.reward, detector, policy.tokenizer, use_reference=recipe.detector.use_reference)
        # the algorithm owns its optimiser, reference model and value head, if any (GRPO refuses seq2seq here)
        algo = build_algorithm(recipe.algorithm, policy, rewarder, recipe.generation, accelerator, recipe.train.steps)
        prior = read_prior(recipe, run_dir, accelerator.device) if resume else Prior()
        ckpt, start_step, results = prior.checkpoint, prior.step, prior.results
        elapsed = lambda: prior.wall_time_s + (time.perf_counter() - t_start)  # noqa: E731

        # 2. the run starts: the previous run moves aside (--overwrite), the recipe is written
        guard.start(overwrite)
        write_recipe(run_dir, recipe, start_step, prior.changes, log)
        if ckpt:
            set_aside_damaged(prior.damaged, ckpt.path)

        # 3. evaluation before training, once (kept in eval.json across resumes), of the initial policy
        def evaluate(translate_fn: Any) -> dict[str, Any]:
            rng = rng_state()  # evaluation must not shift the sampling RNG
            sources, refs = [p[0] for p in eval_pairs], [p[1] for p in eval_pairs]
            out = score_translations(sources, translate_fn(sources), refs, rewarder.detect)
            set_rng_state(rng)
            return out

        results_path = run_dir / "eval.json"
        policy_translate = lambda sources: translate(policy, sources, recipe.generation)  # noqa: E731
        if eval_pairs and "before" not in results:
            log(f"mtrl: evaluating the initial policy on {len(eval_pairs)} segments ...")
            results["before"] = evaluate(policy_translate)
            write_json(results_path, results)
        if ckpt:
            apply_checkpoint(ckpt, policy, algo)
            print(f"mtrl: resumed from {ckpt.path} (step {start_step})", file=sys.stderr)  # even with --quiet

        # 4. training
        logger = MetricsLogger(run_dir, recipe.train.report_to, recipe, prior.metrics)
        guard.training = True
        try:
            if hasattr(algo, "step"):
                stopped = train_loop(algo, recipe, train_pairs, start_step, logger, rewarder, quiet,
                                     evaluate=(lambda: evaluate(policy_translate)) if eval_pairs else None,
                                     elapsed=elapsed)
                if stopped:
                    log(f"mtrl: stopped at step {stopped}; checkpoint saved. Continue with: "
                        f"mtrl train {run_dir}/recipe.yaml --resume")
                    raise KeyboardInterrupt
            else:
                algo.fit(RunContext(train_pairs, run_dir, recipe.seed, model_path, recipe.offline, log,
                                    logger.log, progress=not quiet))
        finally:
            logger.close()

        # 5. the final model, and evaluation after training
        if not getattr(algo, "writes_final", False):
            save_final(policy, run_dir)
        if eval_pairs:
            log(f"mtrl: evaluating the trained policy on {len(eval_pairs)} segments ...")
            results["after"] = evaluate(getattr(algo, "translate", policy_translate))
        results["wall_time_s"] = elapsed()
        write_json(results_path, results)
    except BaseException:
        guard.failed(resumed=ckpt is not None)
        raise
    guard.finished()
    return results


def train_loop(algo: Any, recipe: Recipe, train_pairs: Sequence[Pair], start_step: int, logger: MetricsLogger,
               rewarder: Rewarder, quiet: bool, evaluate: Any = None,
               elapsed: Callable[[], float] | None = None) -> int:
    """Step an on-policy algorithm to ``train.steps``, logging and checkpointing; returns the step at which
    Ctrl-C stopped it, or 0 when it ran to the end. ``elapsed``: the run's wall time so far, kept in
    each checkpoint so that ``wall_time_s`` counts interrupted attempts too."""
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
                save_checkpoint(run_dir, step, algo.policy, algo.state_dict(),
                                extra={"wall_time_s": elapsed()} if elapsed else None)
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
