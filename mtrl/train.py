"""``mtrl train RECIPE.yaml``: the RL loop from recipe to checkpoints, logs and ``eval.json``.

Each step: take a batch of sources, sample translations (``rollout``), score
them with the detector and map the spans to token rewards, subtract the KL
penalty to the frozen reference, and update the policy with the recipe's
algorithm (PPO with token-level GAE, REINFORCE or RLOO). Runs on whatever
``accelerate`` gives (CPU here; GPUs, mixed precision, DeepSpeed/FSDP via
``accelerate launch``).

Resumable: every ``save_every`` steps a checkpoint (model, value head,
optimizer, scheduler, KL coefficient, RNG states) is written atomically; the
batch order is a pure function of (seed, step), so 2 + 2 steps after
``--resume`` equal 4 steps straight. Ctrl-C finishes the current step, saves
and exits; a second Ctrl-C aborts at once (the last checkpoint stays valid).
"""

from __future__ import annotations

import dataclasses
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

from mtrl.errors import MtrlError
from mtrl.io import atomic_open, write_json
from mtrl.recipe import Recipe, dump_recipe
from mtrl.spans import SEVERITIES

Pair = tuple[str, str]


# --------------------------------------------------------------------------- data
def load_pairs(spec: str, data_cfg: Any, limit: int | None = None) -> list[Pair]:
    """``multi30k:SPLIT``, a JSONL/TSV file, or ``hf:NAME[:CONFIG]:SPLIT`` (a `datasets` dataset)."""
    from mtrl.datasets import load_parallel

    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) not in (2, 3):
            raise MtrlError(f"data spec {spec!r} must look like hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
        import datasets

        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
            raise MtrlError(f"cannot load dataset {spec!r}: {str(e).splitlines()[0][:200]}") from None
        src_f, ref_f = data_cfg.source_field, data_cfg.reference_field
        pairs = []
        for row in ds:
            row = row.get("translation", row)
            if src_f not in row or ref_f not in row:
                raise MtrlError(f"dataset {spec!r} has no fields {src_f!r}/{ref_f!r}; set data.source_field and "
                                f"data.reference_field (fields: {', '.join(row)})")
            pairs.append((row[src_f], row[ref_f]))
    elif spec.startswith("multi30k"):
        _, _, split = spec.partition(":")
        pairs = load_parallel("multi30k", split or "train")
    else:
        pairs = load_parallel(spec, src_field=data_cfg.source_field, ref_field=data_cfg.reference_field)
    if not pairs:
        raise MtrlError(f"data {spec!r} is empty")
    return pairs[:limit] if limit else pairs


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of ``step``: a fresh permutation per epoch, a pure function of (seed, step)."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return out


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def translate_all(policy: Any, sources: Sequence[str], gen: Any) -> list[str]:
    """Greedy (or beam) translations of ``sources`` with the policy, in input order, length-sorted batches."""
    from mtrl.rollout import decode_responses

    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [""] * len(sources)
    for i in range(0, len(order), gen.eval_batch_size):
        idx = order[i:i + gen.eval_batch_size]
        q, qm = policy.encode_sources([sources[j] for j in idx])
        responses, mask = policy.generate(q, qm, gen, sample=False)
        texts, _, _ = decode_responses(policy.tokenizer, responses, mask)
        for j, t in zip(idx, texts):
            out[j] = t
    return out


def evaluate_policy(policy: Any, pairs: Sequence[Pair], gen: Any, rewarder: Any) -> dict[str, Any]:
    """Greedy translations of the eval set, scored by :func:`score_translations`."""
    sources, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    return score_translations(sources, translate_all(policy, sources, gen), refs, rewarder)


def score_translations(sources: Sequence[str], hyps: Sequence[str], refs: Sequence[str], rewarder: Any) -> dict[str, Any]:
    """BLEU/chrF/TER (sacrebleu, with signatures) and the detector's mean score and span counts."""
    from mtrl.evaluate import corpus_metrics

    result: dict[str, Any] = corpus_metrics(hyps, refs)
    dets = rewarder.detect(sources, hyps, refs)
    result["detector_score"] = float(np.mean([d.score for d in dets]))
    for sev in SEVERITIES:
        result[f"spans_{sev}_per_segment"] = float(np.mean([sum(s.severity == sev for s in d.spans) for d in dets]))
    result["examples"] = [{"src": s, "hyp": h, "ref": r} for s, h, r in list(zip(sources, hyps, refs))[:3]]
    return result


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


def save_checkpoint(run_dir: Path, step: int, policy: Any, optimizer: Any, scheduler: Any, extra: dict,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step-N`` via a temporary directory and a rename; point ``latest`` at it."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in policy.state_dict().items()}, tmp / "policy.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), **extra, "step": step}, tmp / "trainer_state.pt")
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


def train(recipe: Recipe, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe end to end; returns ``{"before": ..., "after": ...}`` when there is an eval set."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from mtrl.algorithms import ppo, reinforce
    from mtrl.detectors import load_detector
    from mtrl.policy import ReferencePolicy, build_policy
    from mtrl.rewards import RewardConfig
    from mtrl.rollout import CachedRewarder, collect_rollout

    t_start = time.perf_counter()
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        print(f"mtrl: no checkpoint in {run_dir}/checkpoints; starting from step 0", file=sys.stderr)
    if overwrite and not resume:  # start the RL part afresh; a cached warm start is kept
        for name in ("checkpoints", "final", "tensorboard", "offline"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "eval.json"):
            (run_dir / name).unlink(missing_ok=True)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise MtrlError(f"{run_dir} already holds a run; use --resume to continue it, --overwrite to start "
                        "it again (a cached warm start is kept), or another run_dir")
    with atomic_open(run_dir / "recipe.yaml") as f:
        f.write(dump_recipe(recipe))
    seed_everything(recipe.seed)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))

    # 1. the model to start from
    model_path = recipe.policy.model
    if model_path == "warmstart":
        from mtrl.warmstart import warm_start

        log("mtrl: warm start (supervised) ...")
        model_path = str(warm_start(recipe.warm_start.options, run_dir, progress=not quiet))
    seed_everything(recipe.seed)

    # 2. data, detector, rewards
    d = recipe.data
    train_pairs = load_pairs(d.train, d, d.max_train_examples)
    eval_pairs = load_pairs(d.eval, d, d.max_eval_examples) if d.eval else None
    det_opts: dict[str, Any] = {}
    if recipe.detector.name == "xcomet":
        det_opts = {"model": recipe.detector.model or "Unbabel/XCOMET-XL", "batch_size": recipe.detector.batch_size}
    elif recipe.detector.name == "gold":
        det_opts = {"path": recipe.detector.path}
    detector = load_detector(recipe.detector.name, **det_opts, **recipe.detector.options)
    rc = recipe.reward
    # every RewardConfig field comes from the recipe's reward section (which also holds `scale`)
    reward_cfg = RewardConfig(**{f.name: getattr(rc, f.name) for f in dataclasses.fields(RewardConfig) if f.init})
    rewarder = CachedRewarder(detector, reward_cfg, rc.scale, use_reference=recipe.detector.use_reference)

    # 3. policy, reference, optimiser
    accelerator = Accelerator(cpu=recipe.train.cpu, mixed_precision=recipe.train.mixed_precision)
    policy = build_policy(recipe.policy, model_path, d.src_lang, d.tgt_lang).to(accelerator.device)
    a = recipe.algorithm
    if a.name == "qsft":  # offline: no rollouts and no checkpoints of the loop below, see mtrl.offline
        from mtrl.offline import run_qsft

        results: dict[str, Any] = {}
        if eval_pairs:
            log(f"mtrl: evaluating the initial policy on {len(eval_pairs)} segments ...")
            results["before"] = evaluate_policy(policy, eval_pairs, recipe.generation, rewarder)
        del policy
        results = run_qsft(recipe, model_path, train_pairs, eval_pairs, rewarder, results, log, quiet)
        results["wall_time_s"] = time.perf_counter() - t_start
        write_json(run_dir / "eval.json", results)
        return results
    if a.name == "grpo":  # sequence-level baseline through TRL (causal policies)
        from mtrl.algorithms.grpo import train_grpo

        results = {}
        if eval_pairs:
            log(f"mtrl: evaluating the initial policy on {len(eval_pairs)} segments ...")
            results["before"] = evaluate_policy(policy, eval_pairs, recipe.generation, rewarder)
        train_grpo(recipe, policy, train_pairs, rewarder, run_dir)
        return _finish(policy, run_dir, eval_pairs, recipe, rewarder, results, t_start, log)
    reference = ReferencePolicy(policy)
    head = [p for p in policy.value_head.parameters() if p.requires_grad]
    body = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head.")]
    optimizer = torch.optim.AdamW([{"params": body}, {"params": head, "lr": a.value_lr or a.lr}], lr=a.lr,
                                  weight_decay=a.weight_decay)
    scheduler = get_scheduler(a.lr_schedule, optimizer, num_warmup_steps=a.warmup_steps,
                              num_training_steps=recipe.train.steps)
    wrapped, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    kl_ctl = ppo.AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
    algo = ppo if a.name == "ppo" else reinforce

    start_step = 0
    if ckpt is not None:
        policy.load_state_dict(torch.load(ckpt / "policy.pt", map_location=accelerator.device))
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.value = state["kl_coef"]
        set_rng_state(state["rng"])
        start_step = state["step"]
        log(f"mtrl: resumed from {ckpt} (step {start_step})")

    # 4. evaluation before RL
    results_path = run_dir / "eval.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if (ckpt and results_path.exists()) else {}
    if eval_pairs and "before" not in results:
        log(f"mtrl: evaluating the initial policy on {len(eval_pairs)} segments ...")
        rng = rng_state()
        results["before"] = evaluate_policy(policy, eval_pairs, recipe.generation, rewarder)
        set_rng_state(rng)  # evaluation must not shift the sampling RNG
        write_json(results_path, results)

    # 5. the loop
    logger = MetricsLogger(run_dir, recipe.train.report_to, recipe, start_step)
    step = start_step
    bar = tqdm(total=recipe.train.steps, initial=start_step, desc=f"{a.name} ({rc.mode} rewards)",
               disable=quiet, dynamic_ncols=True)
    with StopFlag() as stop:
        while step < recipe.train.steps and not stop.requested:
            t0 = time.perf_counter()
            idx = batch_indices(len(train_pairs), a.batch_size, step, recipe.seed)
            sources, refs = [train_pairs[i][0] for i in idx], [train_pairs[i][1] for i in idx]
            ro = collect_rollout(policy, reference, rewarder, sources, refs, recipe.generation,
                                 a.samples_per_prompt, with_values=a.name == "ppo")
            mask = ro.response_mask.float()
            kl = ppo.kl_penalty(ro.logprobs, ro.ref_logprobs, a.kl_estimator) * mask
            rewards = ro.scores - kl_ctl.value * kl
            stats = algo.update(wrapped, optimizer, accelerator, ro, rewards, a, recipe.generation.temperature)
            scheduler.step()
            step += 1
            seq_kl = float(kl.sum(1).mean())
            kl_ctl.update(seq_kl, len(idx))
            seq_reward = ro.scores.sum(1)
            elapsed = time.perf_counter() - t0
            metrics = {
                "step": step,
                "reward_mean": float(seq_reward.mean()),
                "reward_std": float(seq_reward.std()) if len(seq_reward) > 1 else 0.0,
                "total_reward_mean": float(rewards.sum(1).mean()),
                "sentence_score_mean": float(np.mean([dd.score for dd in ro.detections])),
                **{f"spans_{s}": sum(sp.severity == s for dd in ro.detections for sp in dd.spans)
                   for s in SEVERITIES},
                "kl": seq_kl,
                "kl_coef": kl_ctl.value,
                **stats,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": ro.stats["response_tokens"] / elapsed,
                "step_time_s": elapsed,
                "response_length_mean": ro.stats["response_length_mean"],
                "score_cache_hit_rate": rewarder.hits / max(1, rewarder.hits + rewarder.misses),
            }
            if step % recipe.train.log_every == 0 or step == recipe.train.steps:
                logger.log(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", score=f"{metrics['sentence_score_mean']:.3f}",
                            kl=f"{seq_kl:.3f}")
            if step % recipe.train.save_every == 0 or stop.requested or step == recipe.train.steps:
                save_checkpoint(run_dir, step, policy, optimizer, scheduler, {"kl_coef": kl_ctl.value})
            if recipe.train.eval_every and eval_pairs and step % recipe.train.eval_every == 0:
                rng = rng_state()
                ev = evaluate_policy(policy, eval_pairs, recipe.generation, rewarder)
                set_rng_state(rng)
                logger.log({"step": step, **{f"eval_{k}": v["score"] if isinstance(v, dict) else v
                                             for k, v in ev.items() if k != "examples"}})
    bar.close()
    logger.close()
    if stop.requested and step < recipe.train.steps:
        log(f"mtrl: stopped at step {step}; checkpoint saved. Continue with: mtrl train {run_dir}/recipe.yaml --resume")
        raise KeyboardInterrupt

    return _finish(policy, run_dir, eval_pairs, recipe, rewarder, results, t_start, log)


def _finish(policy: Any, run_dir: Path, eval_pairs: Any, recipe: Recipe, rewarder: Any, results: dict[str, Any],
            t_start: float, log: Any) -> dict[str, Any]:
    """Save the final model and evaluate it after RL."""
    results_path = run_dir / "eval.json"
    final = run_dir / "final"
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.model.save_pretrained(tmp)
    policy.tokenizer.save_pretrained(tmp)
    torch.save(policy.value_head.state_dict(), tmp / "value_head.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if eval_pairs:
        log(f"mtrl: evaluating the trained policy on {len(eval_pairs)} segments ...")
        results["after"] = evaluate_policy(policy, eval_pairs, recipe.generation, rewarder)
    results["wall_time_s"] = results.get("wall_time_s", 0.0) + (time.perf_counter() - t_start)
    write_json(results_path, results)
    return results


def print_summary(results: dict[str, Any], run_dir: str) -> None:
    from mtrl.evaluate import format_table

    rows = {k: {m: v for m, v in results[k].items() if m in ("bleu", "chrf", "ter", "detector_score")}
            for k in ("before", "after") if k in results}
    if rows:
        print(format_table(rows))
    held = [n for n in ("eval.json", "metrics.jsonl", "final/", "checkpoints/", "offline/") if (Path(run_dir) / n).exists()]
    print(f"run directory: {run_dir} ({', '.join(held)})")
