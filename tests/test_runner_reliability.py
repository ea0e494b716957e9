"""The runner never loses a run: checks before the run directory changes, --overwrite that can be undone,
resume after crash-truncated files, resume with changed settings (issue 14: items 1-3, 8, 9 and 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mtrl.errors import MtrlError
from mtrl.recipe import recipe_from_dict
from mtrl.runner import run as train
from tests.fixtures.runs import read_metrics, tiny_recipe

OUTPUTS = ("recipe.yaml", "metrics.jsonl", "eval.json", "final/config.json", "checkpoints/latest",
           "checkpoints/step-000001/policy.pt")


def snapshot(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in OUTPUTS}


@pytest.fixture()
def finished_run(tiny_seq2seq, small_data, tmp_path) -> Path:
    """A finished one-step run, to overwrite or resume."""
    run = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run, train={"steps": 1, "report_to": []})), quiet=True)
    return run


def spy_on_translate(monkeypatch) -> list:
    """Record calls of the evaluation's translate: a failure must come before the "before" evaluation."""
    import mtrl.runner

    calls, real = [], mtrl.runner.translate
    monkeypatch.setattr(mtrl.runner, "translate", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ------------------------------------------------------------------ nothing touched before the checks pass
def test_overwrite_with_a_bad_data_path_keeps_the_previous_run(finished_run, tiny_seq2seq, small_data):
    before = snapshot(finished_run)
    bad = tiny_recipe(tiny_seq2seq, small_data, finished_run)
    bad["data"]["train"] = str(finished_run / "missing.jsonl")
    with pytest.raises(MtrlError, match="missing.jsonl"):
        train(recipe_from_dict(bad), quiet=True, overwrite=True)
    assert snapshot(finished_run) == before and not (finished_run / ".previous-run").exists()


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_previous_run(
        finished_run, tiny_seq2seq, small_data, monkeypatch, capsys):
    import mtrl.runner

    before = snapshot(finished_run)

    def crash(*args, **kwargs):
        assert (finished_run / ".previous-run" / "final").is_dir()  # moved aside, not deleted, while it runs
        raise RuntimeError("out of memory")

    monkeypatch.setattr(mtrl.runner, "train_loop", crash)
    recipe = tiny_recipe(tiny_seq2seq, small_data, finished_run, seed=7, train={"steps": 1, "report_to": []})
    with pytest.raises(RuntimeError, match="out of memory"):
        train(recipe_from_dict(recipe), quiet=True, overwrite=True)
    assert snapshot(finished_run) == before and not (finished_run / ".previous-run").exists()
    assert "holds the previous run again" in capsys.readouterr().err


def test_overwrite_that_finishes_replaces_the_previous_run(finished_run, tiny_seq2seq, small_data):
    recipe = tiny_recipe(tiny_seq2seq, small_data, finished_run, seed=7, train={"steps": 1, "report_to": []})
    train(recipe_from_dict(recipe), quiet=True, overwrite=True)
    assert yaml.safe_load((finished_run / "recipe.yaml").read_text())["seed"] == 7
    assert not (finished_run / ".previous-run").exists() and len(read_metrics(finished_run)) == 1


def test_a_failing_fresh_run_leaves_no_run_directory(tiny_seq2seq, small_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    bad = tiny_recipe(tiny_seq2seq, small_data, run)
    bad["data"]["train"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(MtrlError, match="missing.jsonl"):
        train(recipe_from_dict(bad), quiet=True)
    assert not run.exists()
    import mtrl.runner  # a failure after the checks, during the "before" evaluation: the same

    monkeypatch.setattr(mtrl.runner, "score_translations", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run)), quiet=True)
    assert not run.exists()


def test_missing_xcomet_checkpoint_fails_before_the_evaluation(tiny_seq2seq, small_data, tmp_path, monkeypatch):
    calls, run = spy_on_translate(monkeypatch), tmp_path / "run"
    recipe = tiny_recipe(tiny_seq2seq, small_data, run, detector={"name": "xcomet", "model": "/nonexistent/model.ckpt"})
    with pytest.raises(MtrlError, match="xcomet: checkpoint not found: /nonexistent/model.ckpt"):
        train(recipe_from_dict(recipe), quiet=True)
    assert calls == [] and not run.exists()


# ------------------------------------------------------------------ resume
def test_resume_after_a_half_written_metrics_line(tiny_seq2seq, small_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run)), quiet=True)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward_me')  # what a crash in the middle of a write leaves
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run, train={"steps": 3})), resume=True, quiet=True)
    assert "line 3 is incomplete" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_resume_refuses_a_changed_learning_rate(finished_run, tiny_seq2seq, small_data):
    saved = (finished_run / "recipe.yaml").read_text()
    changed = tiny_recipe(tiny_seq2seq, small_data, finished_run, algorithm={"lr": 1e-2}, train={"steps": 2})
    with pytest.raises(MtrlError, match=r"cannot change algorithm\.lr \(saved 0\.001, now 0\.01\)") as err:
        train(recipe_from_dict(changed), resume=True, quiet=True)
    assert "train.steps" not in str(err.value).split(":")[0]  # an allowed change is not named as refused
    assert (finished_run / "recipe.yaml").read_text() == saved and not (finished_run / "changes.jsonl").exists()
    assert len(read_metrics(finished_run)) == 1


def test_resume_extending_the_steps_is_recorded(finished_run, tiny_seq2seq, small_data, capsys):
    capsys.readouterr()
    longer = tiny_recipe(tiny_seq2seq, small_data, finished_run, train={"steps": 3, "report_to": []})
    train(recipe_from_dict(longer), resume=True, quiet=True)
    assert [json.loads(ln) for ln in (finished_run / "changes.jsonl").read_text().splitlines()] == [
        {"step": 1, "changes": {"train.steps": [1, 3]}}]
    assert yaml.safe_load((finished_run / "recipe.yaml").read_text())["train"]["steps"] == 3
    assert [r["step"] for r in read_metrics(finished_run)] == [1, 2, 3]
    err = capsys.readouterr().err  # --quiet still says that it resumed, and from where
    assert f"mtrl: resumed from {finished_run / 'checkpoints' / 'step-000001'} (step 1)" in err


def test_resume_below_the_checkpoint_step_is_refused(tiny_seq2seq, small_data, tmp_path):
    run = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run)), quiet=True)
    with pytest.raises(MtrlError, match=r"train.steps=1 is below the step of the checkpoint resumed from \(2\)"):
        train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run, train={"steps": 1})), resume=True, quiet=True)


def test_wall_time_counts_the_attempt_before_a_crash(finished_run, tiny_seq2seq, small_data):
    ckpt = finished_run / "checkpoints" / "step-000001" / "trainer_state.pt"
    state = torch.load(ckpt, weights_only=False)
    assert state["wall_time_s"] > 0  # the checkpoint keeps the wall time so far
    state["wall_time_s"] = 1000.0  # as if the first attempt had run for 1000 s, then crashed
    torch.save(state, ckpt)
    results = json.loads((finished_run / "eval.json").read_text())
    del results["after"], results["wall_time_s"]  # a crash leaves eval.json with "before" only
    (finished_run / "eval.json").write_text(json.dumps(results))
    longer = tiny_recipe(tiny_seq2seq, small_data, finished_run, train={"steps": 2, "report_to": []})
    assert 1000.0 < train(recipe_from_dict(longer), resume=True, quiet=True)["wall_time_s"] < 1100.0


def test_truncated_policy_falls_back_to_the_previous_checkpoint(tiny_seq2seq, small_data, tmp_path, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    three = {"train": {"steps": 3, "save_every": 1, "report_to": []}}
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, straight, **three)), quiet=True)
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run)), quiet=True)
    policy = run / "checkpoints" / "step-000002" / "policy.pt"
    policy.write_bytes(policy.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run, **three)), resume=True, quiet=True)
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / 'step-000002'} cannot be read (policy.pt:" in err
    assert "(step 1)" in err and (run / "checkpoints" / "damaged-step-000002").is_dir()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    a = torch.load(straight / "checkpoints" / "step-000003" / "policy.pt")
    b = torch.load(run / "checkpoints" / "step-000003" / "policy.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the fallback resumes exactly: 1 + 2 steps = 3 steps


def test_no_readable_checkpoint_is_one_error_naming_them(tiny_seq2seq, small_data, tmp_path):
    run = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run)), quiet=True)
    for step in (1, 2):
        (run / "checkpoints" / f"step-00000{step}" / "policy.pt").write_bytes(b"")
    with pytest.raises(MtrlError, match=r"no checkpoint can be read: .*step-000002 \(policy.pt: .*step-000001"):
        train(recipe_from_dict(tiny_recipe(tiny_seq2seq, small_data, run)), resume=True, quiet=True)
    assert (run / "checkpoints" / "step-000002").is_dir()  # nothing renamed or removed when it fails


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_scheduler_signal_finishes_the_step_and_saves(tiny_seq2seq, small_data, tmp_path, monkeypatch, capsys,
                                                      signame):
    """Preemption (SIGTERM) or SLURM's warning (SIGUSR1) mid-step: the step ends, a checkpoint is saved, the
    resume command is printed and the CLI exits non-zero; --resume continues from there."""
    import os
    import signal

    from mtrl.algorithms.ppo import PPO
    from mtrl.errors import exit_status

    real, calls = PPO.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), getattr(signal, signame))  # arrives during the second step
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PPO, "step", step)
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_seq2seq, small_data, run, train={"steps": 6, "save_every": 100, "report_to": []})
    status = exit_status(lambda: train(recipe_from_dict(recipe), quiet=True))
    assert status == 130
    assert len(read_metrics(run)) == 2 and (run / "checkpoints" / "step-000002").is_dir()
    assert not (run / "final").exists()
    err = capsys.readouterr().err
    assert f"mtrl: {signame}: stopping after this step" in err and "--resume" in err
    assert signal.getsignal(getattr(signal, signame)) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(PPO, "step", real)
    train(recipe_from_dict(recipe), resume=True, quiet=True)
    assert len(read_metrics(run)) == 6 and (run / "final").is_dir()


class _RunsCode:
    """A pickle that calls a function when loaded: what a crafted checkpoint in a shared run directory holds."""

    def __reduce__(self):
        import os

        return (os.system, ("touch RAN",))


def test_resume_never_runs_code_from_a_checkpoint(finished_run, tmp_path, monkeypatch):
    """``trainer_state.pt`` is read weights-only: a crafted one is refused in one line, and nothing runs."""
    monkeypatch.chdir(tmp_path)
    state_file = finished_run / "checkpoints" / "step-000001" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)  # what mtrl writes loads weights-only
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    torch.save({**state, "payload": _RunsCode()}, state_file)
    recipe = yaml.safe_load((finished_run / "recipe.yaml").read_text())
    recipe["train"]["steps"] = 2
    with pytest.raises(MtrlError) as e:
        train(recipe_from_dict(recipe), resume=True, quiet=True)
    assert "holds more than tensors and plain values" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "RAN").exists()


def test_rng_state_round_trips():
    import random

    import numpy as np

    from mtrl.rundir import rng_state, set_rng_state

    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(3), torch.rand(5)  # move every stream on
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_second_run_into_a_directory_in_use_refuses_and_a_dead_ones_lock_does_not_block(
        tiny_seq2seq, small_data, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from mtrl.cli import main

    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_seq2seq, small_data, run,
                                                 train={"steps": 10_000, "save_every": 1, "report_to": []})))
    root = Path(__file__).resolve().parents[1]
    first = subprocess.Popen([sys.executable, "-m", "mtrl.cli", "train", str(recipe), "--quiet"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "latest").exists():  # the first run is training
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.1)
        for flags in ([], ["--resume"], ["--overwrite"]):
            assert main(["train", str(recipe), "--quiet", *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and "Traceback" not in err
            assert f"{run} is in use by another mtrl run (pid {first.pid} on " in err
        assert first.poll() is None  # the refused runs did not disturb it
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    steps = len(read_metrics(run))
    # the dead run's lock file is still there, and does not block: --resume continues it
    assert (run / ".lock").exists()
    assert main(["train", str(recipe), "--quiet", "--resume", "train.steps=" + str(steps + 1)]) == 0
    assert len(read_metrics(run)) == steps + 1


def test_detector_out_of_memory_saves_the_run_and_resume_reproduces_it(tiny_seq2seq, small_data, tmp_path,
                                                                          monkeypatch, capsys):
    """The detector runs out of memory even on one row, mid-run: one line, the steps done are saved (with the
    RNG of the failed step's start), and --resume with a smaller detector batch gives the uninterrupted run."""
    from mtrl.detectors.reference import ReferenceDetector
    from mtrl.errors import exit_status

    def recipe(run: Path, **train_keys) -> dict:
        return tiny_recipe(tiny_seq2seq, small_data, run, train={"steps": 4, "save_every": 100, "report_to": [],
                                                                  **train_keys})

    whole = tmp_path / "whole"
    train(recipe_from_dict(recipe(whole)), quiet=True)

    real, calls = ReferenceDetector.detect, []

    def detect(self, sources, *args, **kwargs):
        calls.append(len(sources))
        if len(calls) > 2:  # steps 1 and 2 (plus the "before" evaluation), then out of memory
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, sources, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(ReferenceDetector, "detect", detect)
    status = exit_status(lambda: train(recipe_from_dict(recipe(run)), quiet=True))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("mtrl: error:")]
    assert len(line) == 1 and "ran out of memory even on a single row" in line[0]
    assert f"the run is saved at step 1: then continue it with mtrl train {run}/recipe.yaml --resume" in line[0]
    assert (run / "checkpoints" / "step-000001").is_dir() and not (run / "final").exists()
    monkeypatch.setattr(ReferenceDetector, "detect", real)
    changed = recipe(run)
    changed["detector"] = {**changed["detector"], "batch_size": 2}  # lowered, as the message says
    train(recipe_from_dict(changed), resume=True, quiet=True)
    keys = ("reward_mean", "kl", "sentence_score_mean", "policy_loss")
    assert [[r[k] for k in keys] for r in read_metrics(run)] == [[r[k] for k in keys] for r in read_metrics(whole)]
