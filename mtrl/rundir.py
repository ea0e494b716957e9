"""The run directory: checkpoints, resume, ``--overwrite``, the metrics log (used by :mod:`mtrl.runner`).

Nothing in the run directory is created, changed or deleted until every check of the runner has passed.
So a bad path, a missing detector checkpoint or an algorithm that refuses the policy costs seconds, not a
"before" evaluation, and takes nothing away. If a new run fails before training started (in the
"before" evaluation, or Ctrl-C), what it wrote is removed again, and the run directory too when
this run created it. A resumed run that fails leaves everything in place: resume it again.

``--overwrite`` does not delete the previous run up front: when the new run starts, the previous
outputs (checkpoints, final/, metrics.jsonl, eval.json, recipe.yaml, ...) are moved into
``run_dir/.previous-run/``, deleted when the new run finishes, and moved back if it fails before
its first checkpoint. Once the new run has a checkpoint it is the one to continue (``--resume``),
so a later failure keeps ``.previous-run/`` and says where it is.

Resumable: every ``save_every`` steps a checkpoint (policy, the algorithm's optimiser and
state, RNG states, the wall time so far) is written atomically; the batch order is a pure function
of (seed, step), so 2 + 2 steps after ``--resume`` equal 4 steps straight. Ctrl-C finishes the
current step, saves and exits; a second Ctrl-C aborts at once (the last checkpoint stays valid).
A checkpoint that cannot be read (a truncated ``policy.pt``) is named in a warning, renamed to
``checkpoints/damaged-step-N`` and the previous one (two are kept) is used; when none can be read
the run stops with one line naming them.

On ``--resume`` the recipe is compared with the saved ``recipe.yaml``. Only the keys in
:data:`RESUME_MAY_CHANGE` may differ: how long the run is, how often it saves, logs and evaluates,
where it logs to, the CPU threads; not what a step computes. They are ``train.steps`` (extend or
shorten a run, not below the checkpoint's step; with a non-constant ``algorithm.lr_schedule`` the
rest of the schedule is stretched to the new total), ``train.save_every``, ``train.log_every``,
``train.eval_every``, ``train.report_to``, ``train.threads``, ``reward.cache_size`` and the detector's batching
(``detector.batch_size``, ``detector.max_tokens``: lowered after it ran out of memory; the reference
detector's scores do not depend on the batch, xCOMET's may move in the last digits with the padding). ``run_dir`` is not compared (a run directory may be moved). Any other change
is refused with one line naming the keys and their saved and new values: the restored optimiser
and state were made with the saved ones. Allowed changes are appended to ``run_dir/changes.jsonl``
as ``{"step": <the step resumed from>, "changes": {"train.steps": [old, new]}}`` before
``recipe.yaml`` is updated.

``wall_time_s`` in ``eval.json`` counts every attempt: a checkpoint records the wall time so far
and a resumed run adds its own to it. An interrupted attempt counts up to the checkpoint that
was resumed from; its steps after that checkpoint were done again and count once.

"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtrl.errors import MtrlError, one_line
from mtrl.io import append_text, atomic_dir, atomic_open, read_log, writing
from mtrl.recipe import Recipe, dump_recipe, recipe_from_dict

# What a run writes in its run directory; ``--overwrite`` moves these aside.
OUTPUTS = ("checkpoints", "final", "tensorboard", "offline", "metrics.jsonl", "eval.json",
           "recipe.yaml", "changes.jsonl")
LOCK = ".lock"  # see RunDirLock
PREVIOUS = ".previous-run"  # the outputs an --overwrite is replacing, until the new run finishes

# Recipe keys that ``--resume`` may change (see the module docstring): none changes what a step computes
# (train.steps: the length of a non-constant LR schedule).
RESUME_MAY_CHANGE = frozenset({"train.steps", "train.save_every", "train.log_every", "train.eval_every",
                               "train.report_to", "train.threads", "reward.cache_size", "detector.batch_size",
                               "detector.max_tokens"})


# --------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so that a checkpoint loads weights-only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, flushed to disk: a full disk is then an ``OSError`` (errno 28), not
    torch's ``RuntimeError: unexpected pos`` of a path it writes itself."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, policy: Any, algorithm_state: dict, keep: int = 2,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step-N`` via a temporary directory and a rename; point ``latest`` at it.

    ``extra`` goes into ``trainer_state.pt`` too (the runner keeps the wall time so far there).
    A failed write (a full disk) removes the temporary directory and is one :class:`MtrlError` line naming
    the checkpoint and the one kept from before (resume from it).
    """
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    try:
        with atomic_dir(final, ckpt_root / f".step-{step:06d}.tmp") as tmp:
            save_torch({k: v.detach().cpu() for k, v in policy.state_dict().items()}, tmp / "policy.pt")
            save_torch({"algorithm": algorithm_state, "rng": rng_state(), "step": step, **(extra or {})},
                       tmp / "trainer_state.pt")
        with atomic_open(ckpt_root / "latest") as f:
            f.write(final.name + "\n")
    except MtrlError as e:
        kept = latest_checkpoint(run_dir)
        if kept is None:
            raise
        raise MtrlError(f"{e}; the run can continue from {kept} (mtrl train {run_dir}/recipe.yaml --resume)") from e
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first.

    A ``step-N`` folder appears only by the rename at the end of :func:`save_checkpoint`, so each
    is complete as written; newest-first (not the ``latest`` pointer) also covers a crash between
    that rename and the pointer update.
    """
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file()), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[0] if dirs else None


@dataclass
class Checkpoint:
    """A checkpoint read into memory: applied only once the run has started (see :func:`run`)."""

    path: Path
    policy: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def read_checkpoint(run_dir: Path, device: Any) -> tuple[Checkpoint | None, list[Path]]:
    """The newest checkpoint that loads, and the damaged ones tried before it.

    A truncated ``policy.pt`` (a full disk, a copy cut short) would otherwise be a raw torch
    traceback; the previous checkpoint is a few steps older and just as valid.
    """
    damaged: list[tuple[Path, str]] = []
    for path in checkpoint_dirs(run_dir):
        try:
            name = "policy.pt"
            policy = torch.load(path / name, map_location=device, weights_only=True)
            name = "trainer_state.pt"
            state = torch.load(path / name, map_location="cpu", weights_only=True)  # never runs code from a file
        except pickle.UnpicklingError:  # an object beyond tensors and plain values: an older mtrl's, or crafted
            damaged.append((path, f"{name}: holds more than tensors and plain values, so it is not loaded "
                                  "(checkpoints of mtrl before 2026-12 cannot be resumed)"))
            print(f"mtrl: warning: checkpoint {path} refused ({damaged[-1][1]}); trying the previous one",
                  file=sys.stderr)
            continue
        except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
            damaged.append((path, f"{name}: {one_line(e)}"))
            print(f"mtrl: warning: checkpoint {path} cannot be read ({damaged[-1][1]}); "
                  "trying the previous one", file=sys.stderr)
            continue
        return Checkpoint(path, policy, state), [p for p, _ in damaged]
    if damaged:
        raise MtrlError("no checkpoint can be read: " + "; ".join(f"{p} ({why})" for p, why in damaged)
                        + ". Start the run again with --overwrite")
    return None, []


def set_aside_damaged(damaged: Sequence[Path], loaded: Path) -> None:
    """Rename damaged checkpoints out of ``step-*`` so that pruning and the next resume skip them."""
    for path in damaged:
        dest = path.with_name("damaged-" + path.name)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(path, dest)
        print(f"mtrl: warning: the damaged checkpoint is kept as {dest}", file=sys.stderr)
    if damaged:
        with atomic_open(loaded.parent / "latest") as f:
            f.write(loaded.name + "\n")


def apply_checkpoint(ckpt: Checkpoint, policy: Any, algo: Any) -> None:
    policy.load_state_dict(ckpt.policy)
    algo.load_state_dict(ckpt.state["algorithm"])
    set_rng_state(ckpt.state["rng"])


# --------------------------------------------------------------------------- resume: what may change
_ABSENT = "(not set)"


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _saved_recipe(path: Path) -> dict[str, Any]:
    """The saved recipe as flat keys, with defaults filled in as the current schema has them."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MtrlError(f"{path}: cannot read the saved recipe to compare the resumed run with "
                        f"({one_line(e)})") from None
    if not isinstance(data, dict):
        raise MtrlError(f"{path}: the saved recipe is not a mapping of sections")
    try:
        data = yaml.safe_load(dump_recipe(recipe_from_dict(data)))
    except MtrlError:
        pass  # written by another version: compare what it says
    return _flat(data)


def resume_changes(recipe: Recipe, run_dir: Path, step: int) -> dict[str, list[Any]]:
    """Keys whose value differs from the saved ``recipe.yaml``: ``{key: [saved, new]}``.

    The restored optimiser and algorithm state were made with the saved values, so a change
    outside :data:`RESUME_MAY_CHANGE` would make ``recipe.yaml`` describe a run that did not happen.
    """
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return {}
    saved, new = _saved_recipe(path), _flat(yaml.safe_load(dump_recipe(recipe)))
    changes = {k: [saved.get(k, _ABSENT), new.get(k, _ABSENT)] for k in sorted(saved.keys() | new.keys())
               if k != "run_dir" and saved.get(k, _ABSENT) != new.get(k, _ABSENT)}
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        what = ", ".join(f"{k} (saved {old!r}, now {new!r})" for k, (old, new) in refused.items())
        raise MtrlError(f"--resume cannot change {what}: the checkpoint was trained with the saved values; "
                        f"resume without these overrides, or start a new run (another run_dir, or --overwrite). "
                        f"A resumed run may change only {', '.join(sorted(RESUME_MAY_CHANGE))}")
    if recipe.train.steps < step:
        raise MtrlError(f"train.steps={recipe.train.steps} is below the step of the checkpoint resumed from "
                        f"({step}); give train.steps >= {step}")
    return changes


def write_recipe(run_dir: Path, recipe: Recipe, step: int, changes: dict[str, list[Any]], log: Any) -> None:
    """Record allowed resume changes (``changes.jsonl``, with the step they take effect), then the recipe."""
    if changes:
        append_text(run_dir / "changes.jsonl", json.dumps({"step": step, "changes": changes}) + "\n")
        log("mtrl: changed on resume at step " + str(step) + ": "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            + f" (recorded in {run_dir / 'changes.jsonl'})")
    with atomic_open(run_dir / "recipe.yaml") as f:
        f.write(dump_recipe(recipe))


# --------------------------------------------------------------------------- logging
def check_report_to(report_to: Sequence[str]) -> None:
    """A missing logging package would otherwise be found only after the "before" evaluation."""
    for name in ("tensorboard", "wandb"):
        if name in report_to and importlib.util.find_spec(name) is None:
            raise MtrlError(f"train.report_to has '{name}' but {name} is not installed (pip install {name}); "
                            "or drop it from train.report_to")


def kept_metrics(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` rows up to the checkpoint resumed from.

    Read with :func:`mtrl.io.read_log`: a crash can leave the last line half-written, which is
    dropped with a warning instead of stopping the resume.
    """
    path = run_dir / "metrics.jsonl"
    return [row for row in read_log(path) if row.get("step", 0) <= step] if path.exists() else []


class MetricsLogger:
    """``metrics.jsonl`` (one line per step), TensorBoard and W&B when asked.

    ``kept``: the rows of earlier attempts to keep (those up to the checkpoint resumed from; none on
    a fresh run); the file is rewritten with them, so a resumed run logs no step twice.
    """

    def __init__(self, run_dir: Path, report_to: Sequence[str], recipe: Recipe, kept: Sequence[dict[str, Any]]):
        self.path = run_dir / "metrics.jsonl"
        if kept or self.path.exists():
            with atomic_open(self.path) as f:
                f.write("".join(json.dumps(row) + "\n" for row in kept))
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in report_to:  # installed: check_report_to made sure before the run started
            import wandb

            self.wandb = wandb.init(project="mtrl", dir=str(run_dir), config=recipe.to_dict(), resume="allow")

    def log(self, metrics: dict[str, Any]) -> None:
        append_text(self.path, json.dumps(metrics) + "\n")
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
    """Ctrl-C, SIGTERM (schedulers' preemption, ``scancel``, ``docker stop``) or SIGUSR1 (SLURM's ``--signal``
    ahead of the time limit): stop after the current step and save. A second one: abort now."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> StopFlag:
        self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\nmtrl: {name}: stopping after this step (once more to abort without saving)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- the run directory
def holds_run(run_dir: Path) -> bool:
    """A checkpoint (on-policy runs) or ``final/`` (every finished run, Q-SFT included)."""
    return latest_checkpoint(run_dir) is not None or (run_dir / "final").is_dir()


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse what would lose a run, before anything is loaded (reads only)."""
    if resume and overwrite:
        raise MtrlError("--resume and --overwrite exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise MtrlError(f"run_dir {run_dir} is a file, not a directory")
    previous = run_dir / PREVIOUS
    if overwrite and previous.exists() and holds_run(run_dir):
        raise MtrlError(f"{previous} holds the run that an unfinished --overwrite is replacing; finish the new run "
                        f"with --resume (which then deletes it), or move {previous} back or delete it yourself")
    if not resume and not overwrite and (holds_run(run_dir) or previous.exists()):
        raise MtrlError(f"{run_dir} already holds a run; use --resume to continue it, --overwrite to start "
                        "it again, or another run_dir")


def _remove_outputs(run_dir: Path) -> None:
    for name in OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class RunDirGuard:
    """What this run does to its run directory, so that a failure can undo it.

    :meth:`start` is the one point where the run directory starts to change: after every check.
    :meth:`failed` undoes what a failed run did (see the module docstring); :meth:`finished`
    deletes the previous run an ``--overwrite`` replaced.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.previous = run_dir, run_dir / PREVIOUS
        self.existed = run_dir.exists()
        self.started = self.training = self.moved_aside = False

    def start(self, overwrite: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._move_aside()
        self.started = True

    def _move_aside(self) -> None:
        if self.previous.exists():
            # left by an --overwrite whose run failed without a checkpoint (check_run_dir refuses
            # otherwise): what lies on top cannot be resumed, the run it replaced is still aside
            _remove_outputs(self.run_dir)
        else:
            present = [n for n in OUTPUTS if (self.run_dir / n).exists()]
            if not present:
                return
            self.previous.mkdir()
            for name in present:
                os.replace(self.run_dir / name, self.previous / name)
        self.moved_aside = True

    def failed(self, resumed: bool) -> None:
        """Undo a failed run's changes where nothing worth keeping came of it."""
        if not self.started:
            self._remove_if_created()
        elif resumed:
            return  # the checkpoint resumed from is still there: resume again
        elif self.moved_aside:
            if latest_checkpoint(self.run_dir) is not None:
                print(f"mtrl: the previous run's outputs are in {self.previous}, deleted when this run finishes "
                      f"(mtrl train {self.run_dir}/recipe.yaml --resume)", file=sys.stderr)
            else:
                _remove_outputs(self.run_dir)
                for path in self.previous.iterdir():
                    os.replace(path, self.run_dir / path.name)
                self.previous.rmdir()
                print(f"mtrl: the new run failed before its first checkpoint; {self.run_dir} holds the previous "
                      "run again", file=sys.stderr)
        elif not self.training and latest_checkpoint(self.run_dir) is None:
            _remove_outputs(self.run_dir)
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        """A run directory this run created goes again."""
        if not self.existed and self.run_dir.is_dir():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def finished(self) -> None:
        shutil.rmtree(self.previous, ignore_errors=True)


class RunDirLock:
    """Held by the main process for the length of a run, so that a second run into the same directory refuses
    at once and names the holder.

    ``fcntl.flock`` on ``RUN_DIR/.lock``: the kernel releases it when the holder's process ends in any way
    (kill -9 included), so a lock left by a dead run never blocks. The file stays (unlinking a locked file
    would let two runs lock two different files of one name); its text names the last holder.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.file: Any = None

    def acquire(self) -> None:
        import fcntl
        import socket

        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise MtrlError(f"run_dir {self.path.parent} is a file, not a directory")
        with writing(self.path):  # an unwritable place is one line
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise MtrlError(f"{self.path.parent} is in use by another mtrl run ({holder}); wait for it to end, "
                            "or use another run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the lock
            self.file = None
