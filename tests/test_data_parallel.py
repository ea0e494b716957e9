"""Data parallelism on CPU: two gloo processes under ``torchrun`` (what ``accelerate launch`` does on GPUs).

Each run is the real ``mtrl train`` command on the shipped tiny model, with small budgets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (gloo)")

PER_PROCESS_BATCH = 3
ARGS = ["recipes/quickstart.yaml", "train.threads=1", "train.report_to=[]", "data.max_eval_examples=6",
        f"algorithm.batch_size={PER_PROCESS_BATCH}", "algorithm.minibatch_size=3", "generation.max_new_tokens=24"]
ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 1000), "-m", "mtrl.cli", *args]


def accelerate_launch(*args: str) -> list[str]:
    """The shipped multi-CPU accelerate config (what a user runs on a machine without GPUs)."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
            "recipes/accelerate-multicpu.yaml", "--main_process_port", str(31500 + os.getpid() % 1000),
            "-m", "mtrl.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_split_the_batch_and_write_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = subprocess.run(accelerate_launch("train", *ARGS, f"run_dir={run_dir}", "train.steps=3", "train.save_every=2"),
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # one line per step, not one per process
    # the two processes stepped on different sources: together they cover 2 x the per-process batch,
    # the sources a one-process run with batch 2 x B covers
    assert all(r["distinct_sources"] == 2 * PER_PROCESS_BATCH for r in rows)
    assert out.stdout.count("before") == 1 and out.stdout.count("run directory:") == 1  # one table
    assert out.stderr.count("evaluating the initial policy") == 1
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["processes"] == 2 and "after" in results
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    assert (run_dir / "final" / "config.json").is_file()


def test_kill_and_resume_under_two_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*ARGS, f"run_dir={run_dir}", "train.steps=6", "train.save_every=1"]
    proc = subprocess.Popen(torchrun("train", *args), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list((run_dir / "checkpoints").glob("step-00000[2-5]")):
            assert proc.poll() is None, "the run ended before its second checkpoint"
            assert time.time() < deadline, "no second checkpoint in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
        proc.wait()
    assert not (run_dir / "final").exists()
    out = subprocess.run(torchrun("train", *args, "--resume"), cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("mtrl: resumed from") == 1
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "final" / "config.json").is_file()
    # the same two-process run, never interrupted: the resumed run reproduces it, step by step and after
    whole = tmp_path / "whole"
    out = subprocess.run(torchrun("train", *ARGS, f"run_dir={whole}", "train.steps=6", "train.save_every=1"),
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    same = ("reward_mean", "kl", "sentence_score_mean", "policy_loss", "distinct_sources")
    assert [[r[k] for k in same] for r in rows] == [[r[k] for k in same] for r in metrics(whole)]
    after = [json.loads((d / "eval.json").read_text())["after"] for d in (run_dir, whole)]
    assert after[0]["chrf"]["score"] == after[1]["chrf"]["score"] and after[0]["detector_score"] == after[1]["detector_score"]


CHECK_SYNC = """
import torch
from accelerate import Accelerator
from mtrl.errors import MtrlError
from mtrl.runner import check_in_sync
acc = Accelerator(cpu=True)
model = torch.nn.Linear(3, 2)
check_in_sync(model, acc)  # same init seed in both processes: in sync
torch.nn.init.constant_(model.weight, float(acc.process_index))
try:
    check_in_sync(model, acc)
except MtrlError as e:
    open(f"caught-{acc.process_index}.txt", "w").write(str(e))
acc.wait_for_everyone()
acc.state.destroy_process_group()
"""


def test_check_in_sync_catches_processes_that_drifted(tmp_path: Path) -> None:
    script = tmp_path / "sync.py"
    script.write_text("import torch\ntorch.manual_seed(0)\n" + CHECK_SYNC)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(30500 + os.getpid() % 1000), str(script)], cwd=tmp_path, env=env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):  # both processes refuse, with the same message
        assert (tmp_path / f"caught-{rank}.txt").read_text().startswith("the processes ended with different weights")


def test_sharded_parameters_are_gathered_once_per_rollout_not_per_token(tmp_path: Path) -> None:
    """FSDP2 (``fully_shard``) on CPU: accelerate's FSDP configs are for GPUs, so the probe shards the shipped
    tiny Marian itself and samples under :func:`mtrl.algorithms.common.full_parameters`."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(32500 + os.getpid() % 1000), str(ROOT / "tests" / "fsdp_probe.py")], cwd=tmp_path,
                         env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [(tmp_path / f"rank-{rank}.txt").read_text() for rank in (0, 1)]  # one file each: no interleaving
    for line in lines:
        fields = dict(kv.split("=") for kv in line.split(": ", 1)[1].split())
        assert fields["same"] == "True"  # the sharded model samples what the whole one does
        assert int(fields["gathers"]) == int(fields["groups"]) < int(fields["tokens"]) * int(fields["groups"])
        assert fields["resharded"] == "True"  # and gives the memory back afterwards


KL_SYNC = """
import json
import torch
from accelerate import Accelerator
from mtrl.algorithms import PPOConfig, build_online
from mtrl.detectors import load_detector
from mtrl.policy import GenerationConfig, PolicyConfig, build_policy
from mtrl.rewards import RewardConfig, Rewarder

torch.set_num_threads(1)
acc = Accelerator(cpu=True)
torch.manual_seed(0)
policy = build_policy(PolicyConfig(model="mtrl:tiny-marian"), "mtrl:tiny-marian", "English", "German")
rewarder = Rewarder(RewardConfig(), load_detector("reference"), policy.tokenizer)
cfg = PPOConfig(batch_size=2, minibatch_size=2, epochs=1, kl_target=0.01, kl_horizon=20)
ppo = build_online(cfg, policy, rewarder, GenerationConfig(max_new_tokens=12), acc, 3)
torch.manual_seed(1 + acc.process_index)  # each process samples its own stream, as under mtrl train
sources = [["A man rides a bike.", "Two dogs play."], ["A woman reads a long book in the park.", "Hi."]]
refs = [["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen."], ["Eine Frau liest ein langes Buch im Park.", "Hallo."]]
for _ in range(3):
    metrics = ppo.step(sources[acc.process_index], refs[acc.process_index])
coefs = acc.gather(torch.tensor([ppo.kl_ctl.value], dtype=torch.float64)).tolist()
if acc.is_main_process:
    json.dump({"coefs": coefs}, open("kl.json", "w"))
acc.wait_for_everyone()
acc.state.destroy_process_group()
"""


def test_adaptive_kl_coefficient_is_one_across_processes(tmp_path: Path) -> None:
    """With kl_target set, each process's KL differs (its own sources and samples); the controller follows the
    global KL, so every process shapes its rewards with the same coefficient."""
    script = tmp_path / "kl.py"
    script.write_text(KL_SYNC)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(33500 + os.getpid() % 1000), str(script)], cwd=tmp_path, env=env(), capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    coefs = json.loads((tmp_path / "kl.json").read_text())["coefs"]
    assert len(coefs) == 2 and coefs[0] == coefs[1]
    assert coefs[0] != 0.05  # it moved: the test would not see processes that drift if it never moved
