"""The runner: a recipe from start to finish, in four parts, each a function below.

1. :func:`setup`: check the run directory, load the data, build the detectors, the policy (the shipped tiny
   model, a hub id or a path), the :class:`~mtrl.rewards.Rewarder` and the recipe's algorithm, and read the
   checkpoint to resume from: everything that can fail on the user's input, before the run directory
   changes. Then the run starts: the previous run moves aside (``--overwrite``), the recipe is written;
2. :func:`evaluate`: the initial policy before training (once; kept in ``eval.json`` across resumes), and
   the trained one after;
3. :func:`train`: an online algorithm (:class:`~mtrl.algorithms.OnlineAlgorithm`) is stepped here, with
   logging, checkpoints, ``--resume`` and stop signals; an offline one gets one ``fit`` call;
4. :func:`finish`: ``final/`` and ``eval.json``.

Processes: launched by ``torchrun`` or ``accelerate launch`` (DDP; accelerate's FSDP and DeepSpeed
configs are accepted, see the README for what has run), every process takes its own
``algorithm.batch_size`` sources of each step (the global batch is batch_size x processes), samples from
its own RNG stream, and makes its own rollouts and rewards; the update averages gradients, and advantage
whitening and the logged metrics use the global batch (:mod:`mtrl.algorithms.common`). Evaluation is
sharded across processes and gathered. Only the main process writes (``metrics.jsonl``, checkpoints,
``final/``, ``eval.json``) and prints. Offline algorithms run in one process.

The run directory itself (what may be created, overwritten, resumed, and when) is
:mod:`mtrl.rundir`.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtrl.algorithms import (
    OFFLINE,
    FitResult,
    OfflineAlgorithm,
    OfflineData,
    OnlineAlgorithm,
    RunLog,
    build_offline,
    build_online,
)
from mtrl.algorithms.offline_data import load_offline_data, offline_rows
from mtrl.datasets import batch_indices, load_pairs
from mtrl.errors import DetectorOutOfMemory, MtrlError, one_line
from mtrl.evaluate import comet_scores, score_translations, translate
from mtrl.io import write_json
from mtrl.policy import Policy, build_policy
from mtrl.recipe import Recipe
from mtrl.rewards import Rewarder
from mtrl.rundir import (
    Checkpoint,
    MetricsLogger,
    RunDirGuard,
    RunDirLock,
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


def process_seed(seed: int, rank: int) -> int:
    """The sampling seed of process ``rank`` under data parallelism (its own stream)."""
    return seed + 100_003 * rank


def load_data(d: Any) -> tuple[list[Pair], list[Pair] | None]:
    """The train pairs and the eval pairs (None without ``data.eval``)."""
    train_pairs = load_pairs(d.train, d.source_field, d.reference_field, d.max_train_examples)
    eval_pairs = load_pairs(d.eval, d.source_field, d.reference_field, d.max_eval_examples) if d.eval else None
    return train_pairs, eval_pairs


def build_detector(cfg: Any) -> Any:
    """The detector, with its model loaded now: a missing xCOMET checkpoint must not wait for the first
    ``detect`` call, minutes into the "before" evaluation."""
    detector = cfg.build()
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


def read_prior(recipe: Recipe, run_dir: Path, device: Any, quiet: bool = False) -> Prior:
    """Read (only) what a resumed run continues from, refusing what cannot be continued."""
    ckpt, damaged = read_checkpoint(run_dir, device)
    if ckpt is None:
        if not quiet:
            print(f"mtrl: no checkpoint in {run_dir}/checkpoints; starting from step 0", file=sys.stderr)
        return Prior()
    results = previous_results(run_dir)
    wall = ckpt.state.get("wall_time_s", results.get("wall_time_s", 0.0))  # older checkpoints: eval.json's
    return Prior(ckpt, damaged, resume_changes(recipe, run_dir, ckpt.step), results,
                 kept_metrics(run_dir, ckpt.step), float(wall))


@dataclass
class Run:
    """What :func:`setup` built, and what the other parts read."""

    recipe: Recipe
    accelerator: Any
    n_proc: int  # read once: TRL's trainers reset accelerate's state that the accelerator reads them from
    rank: int
    guard: RunDirGuard
    train_pairs: list[Pair]
    eval_pairs: list[Pair] | None
    policy: Policy
    rewarder: Rewarder
    eval_detector: Any  # evaluation.detector, or None: the rewarder's detector
    algorithm: OnlineAlgorithm | OfflineAlgorithm
    prior: Prior
    quiet: bool
    t_start: float
    offline_data: list[dict[str, Any]] | None = None  # offline.data, read once in setup (checked, token ids added)

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.run_dir)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr)

    def elapsed(self) -> float:
        """The run's wall time so far, attempts before a resume included."""
        return self.prior.wall_time_s + (time.perf_counter() - self.t_start)

    def translate_policy(self, sources: Sequence[str]) -> list[str]:
        return translate(self.policy, sources, self.recipe.generation)


def run(recipe: Recipe, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe end to end; returns ``{"before": ..., "after": ...}`` when there is an eval set."""
    from accelerate import Accelerator

    t_start = time.perf_counter()
    # cpu=True without a GPU: accelerate then runs torchrun's processes as MULTI_CPU (gloo) data parallelism
    accelerator = Accelerator(cpu=recipe.train.cpu or not torch.cuda.is_available(),
                              mixed_precision=recipe.train.mixed_precision)
    main = accelerator.is_main_process
    quiet = quiet or not main
    guard, lock, r = RunDirGuard(Path(recipe.run_dir)), RunDirLock(Path(recipe.run_dir)), None
    try:
        if main:  # before anything else: a second run into this directory refuses at once
            lock.acquire()
        r = setup(recipe, accelerator, guard, resume, quiet, overwrite, t_start)
        results = r.prior.results
        if r.eval_pairs and "before" not in results:
            r.log(f"mtrl: evaluating the initial policy on {len(r.eval_pairs)} segments ...")
            results["before"] = evaluate(r, r.translate_policy)
            if r.main:
                write_json(r.run_dir / "eval.json", results)
        fitted = train(r)
        finish(r, results, fitted)
    except BaseException:
        if main:
            guard.failed(resumed=r is not None and r.prior.checkpoint is not None)
        raise
    finally:
        lock.release()
    if main:
        guard.finished()
    return results


# --------------------------------------------------------------------------- 1. setup
def setup(recipe: Recipe, accelerator: Any, guard: RunDirGuard, resume: bool, quiet: bool, overwrite: bool,
          t_start: float) -> Run:
    """Everything that can fail on the user's input, then the start of the run (see the module docstring)."""
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if quiet:  # transformers' own bars too (loading and saving weights): a quiet run, or not the main process
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    run_dir = Path(recipe.run_dir)
    check_run_dir(run_dir, resume, overwrite)  # every process reads; none writes before the barrier below
    check_report_to(recipe.train.report_to)
    if n_proc > 1 and recipe.algorithm.name in OFFLINE:
        raise MtrlError(f"algorithm {recipe.algorithm.name} runs in one process; launch it with "
                        "`mtrl train`, not torchrun or accelerate launch")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    train_pairs, eval_pairs = load_data(recipe.data)
    detector = build_detector(recipe.detector)
    eval_detector = build_detector(recipe.evaluation.detector) if recipe.evaluation.detector else None
    seed_everything(recipe.seed)  # the same initial weights (and value head) in every process
    policy = build_policy(recipe.policy, recipe.policy.model, recipe.data.src_lang,
                          recipe.data.tgt_lang).to(accelerator.device)
    rewarder = Rewarder(recipe.reward, detector, policy.tokenizer, use_reference=recipe.detector.use_reference,
                        language=recipe.data.tgt_lang, log_guards=True)
    # the algorithm owns its optimiser, reference model and value head, if any
    build = build_offline if recipe.algorithm.name in OFFLINE else build_online
    algorithm = build(recipe.algorithm, policy, rewarder, recipe.generation, accelerator, recipe.train.steps)
    offline_data = load_offline_data(recipe.offline, policy) if recipe.algorithm.name in OFFLINE else None
    if n_proc > 1:  # each process samples from its own stream
        seed_everything(process_seed(recipe.seed, rank))
    prior = read_prior(recipe, run_dir, "cpu", quiet) if resume else Prior()

    accelerator.wait_for_everyone()  # the run starts: the run directory changes from here on
    if accelerator.is_main_process:
        guard.start(overwrite)
        write_recipe(run_dir, recipe, prior.step, prior.changes,
                     (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr)))
        if prior.checkpoint:
            set_aside_damaged(prior.damaged, prior.checkpoint.path)
    return Run(recipe, accelerator, n_proc, rank, guard, train_pairs, eval_pairs, policy, rewarder, eval_detector, algorithm,
               prior, quiet, t_start, offline_data)


# --------------------------------------------------------------------------- 2. evaluate
def evaluate(r: Run, translate_fn: Callable[[Sequence[str]], list[str]], comet: bool = True) -> dict[str, Any]:
    """Each process translates and scores its share of the eval set; the shares are gathered.
    COMET (``evaluation.comet``) scores the before/after evaluations, not those during training."""
    from accelerate.utils import gather_object

    pairs, n_proc, rank = r.eval_pairs, r.n_proc, r.rank
    detect = r.eval_detector.detect if r.eval_detector else r.rewarder.detect
    rng = rng_state()  # evaluation must not shift the sampling RNG
    mine = list(range(rank, len(pairs), n_proc))
    src, ref = [pairs[i][0] for i in mine], [pairs[i][1] for i in mine]
    cut_before = r.policy.truncated_sources
    hyps = translate_fn(src)
    cut = r.policy.truncated_sources - cut_before
    hyps_all, dets_all, n_cut = [""] * len(pairs), [None] * len(pairs), 0
    for idx, hs, ds, c in gather_object([(mine, hyps, detect(src, hyps, ref), cut)]):
        n_cut += c
        for i, h, d in zip(idx, hs, ds, strict=True):
            hyps_all[i], dets_all[i] = h, d
    if n_cut:
        r.log(f"mtrl: {n_cut} of {len(pairs)} eval sources are longer than {r.policy.source_limit} tokens "
              "(policy.max_source_tokens, or the model's positions) and were cut")
    sources, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    out = score_translations(sources, hyps_all, refs, dets_all)
    if r.recipe.evaluation.comet and comet and r.main:
        out["comet"] = comet_scores(r.recipe.evaluation.comet, sources, hyps_all, refs)
    set_rng_state(rng)
    return out


# --------------------------------------------------------------------------- 3. train
def train(r: Run) -> FitResult:
    """Train the policy in place: step an online algorithm, or fit an offline one."""
    recipe = r.recipe
    logger = MetricsLogger(r.run_dir, recipe.train.report_to, recipe, r.prior.metrics) if r.main else NoLogger()
    r.guard.training = True
    try:
        if recipe.algorithm.name in OFFLINE:
            return fit_offline(r, r.algorithm, RunLog(r.log, logger.log, progress=not r.quiet))
        train_online(r, r.algorithm, logger)
        return FitResult()
    finally:
        logger.close()


def fit_offline(r: Run, algorithm: OfflineAlgorithm, log: RunLog) -> FitResult:
    """One ``fit`` call; the labelled rows are sampled and labelled into ``offline/`` when it asks for them."""
    recipe = r.recipe
    data = OfflineData(r.train_pairs, lambda: offline_rows(recipe.offline, r.policy, r.rewarder, r.train_pairs,
                                                           r.run_dir / "offline", recipe.generation.max_new_tokens,
                                                           recipe.seed, log, r.offline_data),
                       seed=recipe.seed, temperature=recipe.offline.temperature)
    return algorithm.fit(data, log)


def train_online(r: Run, algorithm: OnlineAlgorithm, logger: Any) -> None:
    """Resume from the checkpoint, if any, and step to ``train.steps``; a stop signal saves, prints the resume
    command and raises KeyboardInterrupt."""
    ckpt, n_proc, rank = r.prior.checkpoint, r.n_proc, r.rank
    if ckpt:
        apply_checkpoint(ckpt, r.policy, algorithm)
        saved = ckpt.state.get("rng_per_process") or [ckpt.state["rng"]]  # one per process of the run
        if len(saved) == n_proc:
            set_rng_state(saved[rank])
        else:
            r.log(f"mtrl: warning: resumed with {n_proc} processes where the checkpoint has {len(saved)}; "
                  "sampling continues from new RNG streams")
            seed_everything(process_seed(r.recipe.seed, rank) + ckpt.step)
        if r.main:
            print(f"mtrl: resumed from {ckpt.path} (step {ckpt.step})", file=sys.stderr)  # even with --quiet
    evaluate_now = (lambda: evaluate(r, r.translate_policy, comet=False)) if r.eval_pairs else None
    stopped = train_loop(algorithm, r.recipe, r.train_pairs, r.prior.step, logger, r.rewarder, r.quiet,
                         evaluate=evaluate_now, elapsed=r.elapsed, accelerator=r.accelerator)
    check_in_sync(r.policy, r.accelerator)
    if stopped:
        if r.main:  # even with --quiet: the one line a stopped run must leave
            print(f"mtrl: stopped at step {stopped}; checkpoint saved. Continue with: "
                  f"mtrl train {r.run_dir}/recipe.yaml --resume", file=sys.stderr)
        raise KeyboardInterrupt


# --------------------------------------------------------------------------- 4. finish
def finish(r: Run, results: dict[str, Any], fitted: FitResult) -> None:
    """``final/`` (the policy and the models the algorithm adds), the evaluation after training, ``eval.json``."""
    if r.main:
        save_final(r.policy, r.run_dir, fitted.models)
    if r.eval_pairs:
        r.log(f"mtrl: evaluating the trained policy on {len(r.eval_pairs)} segments ...")
        results["after"] = evaluate(r, fitted.translate or r.translate_policy)
    results["wall_time_s"] = r.elapsed()
    if r.n_proc > 1:
        results["processes"] = r.n_proc
    if r.main:
        write_json(r.run_dir / "eval.json", results)
    r.accelerator.wait_for_everyone()


class NoLogger:
    """The metrics logger of processes other than the main one: they log nothing."""

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def check_in_sync(policy: Any, accelerator: Any) -> None:
    """Data parallelism keeps one model: after training every process must hold the same weights."""
    if accelerator.num_processes == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in policy.parameters()]).sum().reshape(1)
    sums = accelerator.gather(total.to(accelerator.device)).cpu()
    if not bool((sums == sums[0]).all()):
        raise MtrlError(f"the processes ended with different weights (parameter sums {sums.tolist()}); "
                        "a process must have skipped an update")


def reduce_metrics(metrics: dict[str, Any], accelerator: Any) -> dict[str, Any]:
    """A step's metrics over the global batch: the mean over processes (equal shares), except counts and
    throughput (``spans_*``, ``sources_truncated``, ``tokens_per_s``), which add up."""
    if accelerator is None or accelerator.num_processes == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step")
    summed = accelerator.reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                                             device=accelerator.device), "sum").cpu().tolist()
    adds = lambda k: k.startswith("spans_") or k in ("tokens_per_s", "sources_truncated")  # noqa: E731
    return {**metrics, **{k: v if adds(k) else v / accelerator.num_processes for k, v in zip(keys, summed)}}


def train_loop(algo: Any, recipe: Recipe, train_pairs: Sequence[Pair], start_step: int, logger: Any,
               rewarder: Rewarder, quiet: bool, evaluate: Any = None,
               elapsed: Callable[[], float] | None = None, accelerator: Any = None) -> int:
    """Step an on-policy algorithm to ``train.steps``, logging and checkpointing; returns the step at which
    Ctrl-C stopped it, or 0 when it ran to the end. ``elapsed``: the run's wall time so far, kept in
    each checkpoint so that ``wall_time_s`` counts interrupted attempts too.

    With N processes, step s draws ``batch_size x N`` sources and process r takes the r-th share; the
    logged ``distinct_sources`` counts the sources all processes stepped on."""
    from accelerate.utils import gather_object

    t, run_dir = recipe.train, Path(recipe.run_dir)
    n_proc = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    main = rank == 0
    batch = recipe.algorithm.batch_size
    step = start_step
    bar = tqdm(total=t.steps, initial=start_step, desc=f"{recipe.algorithm.name} ({recipe.reward.mode} rewards)",
               disable=quiet, dynamic_ncols=True)
    cut_total = 0  # training sources cut so far (all processes)
    with StopFlag() as stop:
        stopped = False
        while step < t.steps and not stopped:
            idx = batch_indices(len(train_pairs), batch * n_proc, step, recipe.seed)[rank * batch:(rank + 1) * batch]
            cut, rng_before = algo.policy.truncated_sources, rng_state()
            try:
                metrics = algo.step([train_pairs[i][0] for i in idx], [train_pairs[i][1] for i in idx])
            except DetectorOutOfMemory as e:  # even in halves: keep what is done, say how to go on
                if main and n_proc == 1 and step > start_step and step % t.save_every:
                    set_rng_state(rng_before)  # the failed step's samples are drawn again on --resume
                    save_checkpoint(run_dir, step, algo.policy, algo.state_dict(),
                                    extra={"wall_time_s": elapsed()} if elapsed else {})
                if step == 0 or (n_proc > 1 and step % t.save_every):
                    raise
                raise MtrlError(f"{e}; the run is saved at step {step}: then continue it with "
                                f"mtrl train {run_dir}/recipe.yaml --resume") from None
            step += 1
            metrics = {"step": step, **metrics, "sources_truncated": algo.policy.truncated_sources - cut,
                       "score_cache_hit_rate": rewarder.hits / max(1, rewarder.hits + rewarder.misses)}
            metrics = reduce_metrics(metrics, accelerator)
            metrics["distinct_sources"] = len(set(gather_object(idx) if n_proc > 1 else idx))
            cut_total += metrics["sources_truncated"]
            if metrics["sources_truncated"] and cut_total == metrics["sources_truncated"] and not quiet:
                tqdm.write(f"mtrl: some training sources are longer than {algo.policy.source_limit} tokens "
                           "(policy.max_source_tokens, or the model's positions) and are cut; metrics.jsonl counts "
                           "them per step (sources_truncated)", file=sys.stderr)
            stopped = stopping(stop, accelerator)
            if step % t.log_every == 0 or step == t.steps:
                logger.log(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", score=f"{metrics['sentence_score_mean']:.3f}",
                            kl=f"{metrics['kl']:.3f}")
            if step % t.save_every == 0 or stopped or step == t.steps:
                extra: dict[str, Any] = {"wall_time_s": elapsed()} if elapsed else {}
                if n_proc > 1:  # every process's sampling stream, for --resume under the same process count
                    extra["rng_per_process"] = gather_object([rng_state()])
                if main:
                    save_checkpoint(run_dir, step, algo.policy, algo.state_dict(), extra=extra)
                if accelerator is not None:
                    accelerator.wait_for_everyone()
            if t.eval_every and evaluate is not None and step % t.eval_every == 0:
                ev = evaluate()
                logger.log({"step": step, **{f"eval_{k}": v.get("score") if isinstance(v, dict) else v
                                             for k, v in ev.items() if k != "examples"}})
    bar.close()
    return step if (stopped and step < t.steps) else 0


def stopping(stop: StopFlag, accelerator: Any) -> bool:
    """Ctrl-C in any process stops every process at the same step (else the others would wait forever)."""
    if accelerator is None or accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=accelerator.device)
    stop.requested = bool(accelerator.reduce(flag, "sum").item() > 0)
    return stop.requested


def save_final(policy: Any, run_dir: Path, models: dict[str, Any] | None = None) -> Path:
    """``final/``: the model and tokenizer (save_pretrained), the value head when there is one, and each of
    ``models`` in its own folder (Q-SFT's ``behaviour/``).

    Written into ``.final.tmp`` and renamed: a failure removes it; a failed write (a full disk) is one line
    naming ``final/`` and the checkpoint to resume from."""
    from mtrl.io import atomic_dir
    from mtrl.rundir import latest_checkpoint, save_torch

    final = run_dir / "final"
    try:
        with atomic_dir(final, run_dir / ".final.tmp") as tmp:
            policy.model.save_pretrained(tmp)
            policy.tokenizer.save_pretrained(tmp)
            if policy.value_head is not None:
                save_torch(policy.value_head.state_dict(), tmp / "value_head.pt")
            for name, model in (models or {}).items():
                model.save_pretrained(tmp / name)
                policy.tokenizer.save_pretrained(tmp / name)
    except MtrlError as e:
        kept = latest_checkpoint(run_dir)
        if kept is None:
            raise
        raise MtrlError(f"{e}; the run can continue from {kept} (mtrl train {run_dir}/recipe.yaml --resume)") from e
    return final


def print_run_summary(results: dict[str, Any], run_dir: str) -> None:
    from mtrl.evaluate import format_table

    rows = {k: {m: v for m, v in results[k].items() if m in ("bleu", "chrf", "ter", "detector_score")}
            for k in ("before", "after") if k in results}
    if rows:
        print(format_table(rows))
    held = [n for n in ("eval.json", "metrics.jsonl", "final/", "checkpoints/", "offline/") if (Path(run_dir) / n).exists()]
    print(f"run directory: {run_dir} ({', '.join(held)})")
