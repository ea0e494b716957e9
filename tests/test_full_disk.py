"""A full disk (or a quota) while writing an output: one ``mtrl: error:`` line naming the path, no traceback, a
non-zero exit, and nothing half-written left behind (issue 22, item 4). Checkpoints and ``final/`` leave the run
resumable; ``mtrl label``'s ``.partial`` log keeps whole lines only.

The full disk is simulated (:class:`FullDisk`): every file opened for writing under a path prefix gets a write
that, once the disk is full, writes half of its data (a real partial file) and raises ``ENOSPC``. One test uses
a real, tiny tmpfs where user namespaces allow mounting one.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtrl.cli import main
from mtrl.errors import MtrlError
from mtrl.io import append_text, atomic_open, write_error, write_json
from tests.fixtures.runs import tiny_recipe

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


class FullDisk:
    """Writes to files whose path starts with ``prefix`` fail with ENOSPC after ``writes_ok`` whole writes
    (the failing write still writes half its data, as a disk filling up does)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, prefix: str | Path, writes_ok: int = 0) -> None:
        self.prefix, self.writes_ok, self.failed = str(prefix), writes_ok, 0
        real_open, real_fdopen, real_write = builtins.open, os.fdopen, os.write

        def fd_path(fd: int) -> str:
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return ""

        def patched_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writes = any(c in mode for c in "wax+")
            return Proxy(f, self) if writes and isinstance(file, (str, Path)) and self.matches(file) else f

        def patched_fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            return Proxy(f, self) if self.matches(fd_path(fd)) else f

        def patched_write(fd, data):
            if not self.matches(fd_path(fd)):
                return real_write(fd, data)
            cut = self.cut(data)
            if cut is not None:
                real_write(fd, cut)
                raise OSError(errno.ENOSPC, ENOSPC)
            return real_write(fd, data)

        monkeypatch.setattr(builtins, "open", patched_open)
        monkeypatch.setattr(os, "fdopen", patched_fdopen)
        monkeypatch.setattr(os, "write", patched_write)

    def matches(self, path: str | Path) -> bool:
        return os.path.abspath(path).startswith(self.prefix)

    def cut(self, data):
        """None: the write fits; else the part of ``data`` that lands before the disk is full."""
        if self.writes_ok > 0:
            self.writes_ok -= 1
            return None
        self.failed += 1
        return data[:len(data) // 2] if self.failed == 1 else data[:0]


class Proxy:
    """A file object whose ``write`` goes through the :class:`FullDisk`."""

    def __init__(self, f, disk: FullDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data):
        cut = self._disk.cut(data)
        if cut is not None:
            self._f.write(cut)
            self._f.flush()
            raise OSError(errno.ENOSPC, ENOSPC)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def one_error_line(capsys, *fragments: str, progress: str | None = None) -> str:
    """The one line on stderr (besides the command's own ``progress`` lines, when given)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not (progress and ln.startswith(progress))]
    assert len(lines) == 1 and lines[0].startswith("mtrl: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders (``.NAME.*.tmp``) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture()
def texts(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, hyp, ref = (tmp_path / f"{n}.txt" for n in ("src", "hyp", "ref"))
    src.write_text("A man rides a bike.\nTwo dogs play.\n" * 20)
    hyp.write_text("Ein Mann fährt 3 Fahrräder.\nZwei Hunde spielen.\n" * 20)
    ref.write_text("Ein Mann fährt Fahrrad.\nZwei Hunde spielen.\n" * 20)
    return src, hyp, ref


# --------------------------------------------------------------------------- the write helpers
def test_atomic_writes_leave_nothing_and_name_the_path(tmp_path, monkeypatch):
    out = tmp_path / "out"
    FullDisk(monkeypatch, out)
    with pytest.raises(MtrlError, match=f"^cannot write {out / 'eval.json'}: {ENOSPC}$"):
        write_json(out / "eval.json", {"x": "y" * 10_000})
    with pytest.raises(MtrlError, match=f"^cannot write {out / 'plot.png'}: {ENOSPC}$"):
        with atomic_open(out / "plot.png", "wb") as f:
            f.write(b"x" * 10_000)
    assert list(out.iterdir()) == []


def test_an_old_output_survives_a_failed_rewrite(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    write_json(path, {"before": 1})
    FullDisk(monkeypatch, tmp_path)
    with pytest.raises(MtrlError, match=ENOSPC):
        write_json(path, {"before": 1, "after": 2})
    assert json.loads(path.read_text()) == {"before": 1} and leftovers(tmp_path) == []


def test_a_failed_append_cuts_the_log_back_to_whole_lines(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    append_text(log, '{"step": 1}\n')
    FullDisk(monkeypatch, log)
    with pytest.raises(MtrlError, match=f"^cannot write {log}: {ENOSPC}$"):
        append_text(log, '{"step": 2, "reward": 0.5}\n' * 3)
    assert log.read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("error", [
    OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
    OSError(errno.EROFS, os.strerror(errno.EROFS)),
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors, tokenizers
])
def test_write_errors_of_every_kind_are_one_line(error):
    n = error.errno if isinstance(error, OSError) else errno.ENOSPC
    assert str(write_error("runs/x/final", error)) == f"cannot write runs/x/final: {os.strerror(n)}"


def test_other_errors_are_not_taken_for_write_errors():
    assert write_error("x", ValueError("a bug")) is None


# --------------------------------------------------------------------------- the commands
def test_score_output(texts, tmp_path, monkeypatch, capsys):
    src, hyp, ref = texts
    out = tmp_path / "out" / "scored.jsonl"
    out.parent.mkdir()
    FullDisk(monkeypatch, out.parent)
    rc = main(["score", "--src", str(src), "--hyp", str(hyp), "--ref", str(ref), "--output", str(out)])
    assert rc == 2
    one_error_line(capsys, f"cannot write {out}: {ENOSPC}")
    assert list(out.parent.iterdir()) == []


def test_eval_output(texts, tmp_path, monkeypatch, capsys):
    _, hyp, ref = texts
    out = tmp_path / "out" / "eval.json"
    FullDisk(monkeypatch, tmp_path / "out")
    rc = main(["eval", "--hyp", str(hyp), "--ref", str(ref), "--metrics", "bleu", "--bootstrap", "0",
               "--output", str(out)])
    assert rc == 2
    one_error_line(capsys, f"cannot write {out}: {ENOSPC}")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture()
def label_input(texts, tmp_path: Path) -> Path:
    src, hyp, ref = (p.read_text().splitlines() for p in texts)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"src": s, "mt": f"{h} {i}", "ref": r}) + "\n"
                            for i, (s, h, r) in enumerate(zip(src, hyp, ref))))
    return rows


@pytest.mark.parametrize("target", ["labels.jsonl.partial", "labels.jsonl", "labels.parquet"])
def test_label_outputs_and_the_rerun(label_input, tmp_path, monkeypatch, capsys, target):
    out = tmp_path / "out" / "labels.jsonl"
    out.parent.mkdir()
    argv = ["label", "--input", str(label_input), "--output", str(out), "--quiet"]
    with monkeypatch.context() as m:
        FullDisk(m, out.parent / (target if target.endswith("partial") else "." + target))
        assert main(argv) == 2
    one_error_line(capsys, f"cannot write {out.parent / target}: {ENOSPC}")
    assert not out.with_suffix(".parquet").exists() and leftovers(out.parent) == []
    partial = out.with_name(out.name + ".partial")
    if target.endswith("partial"):  # cut back: whole lines only (here: none)
        assert partial.read_text() == "" and not out.exists()
    else:  # everything was labelled: the rerun reuses it
        assert len(partial.read_text().splitlines()) == 40
    assert main(argv) == 0
    assert len(out.read_text().splitlines()) == 40 and out.with_suffix(".parquet").exists()
    assert not partial.exists()
    assert ("40 labelled now, 0 reused" if target.endswith("partial") else "0 labelled now, 40 reused") in \
        capsys.readouterr().err


def test_label_partial_keeps_the_chunks_before_the_full_disk(label_input, tmp_path, monkeypatch):
    from mtrl.label import label
    from mtrl.translations import read_translations
    from tests.fixtures.labels import rewarder

    rows = read_translations(label_input)
    out = tmp_path / "labels.jsonl"
    partial = out.with_name(out.name + ".partial")
    with monkeypatch.context() as m:
        FullDisk(m, partial, writes_ok=2)  # two chunks fit, the third fills the disk
        with pytest.raises(MtrlError, match=f"^cannot write {partial}: {ENOSPC}$"):
            label(rows, out, rewarder(None), chunk_size=8, progress=False)
    assert [json.loads(x)["mt"] for x in partial.read_text().splitlines()] == [r["mt"] for r in rows[:16]]
    counts = label(rows, out, rewarder(None), chunk_size=8, progress=False)
    assert counts["reused"] == 16 and counts["labelled"] == 24 and counts["rows"] == 40


def test_bench_report(tmp_path, monkeypatch, capsys):
    from mtrl.bench import cell_recipe, load_bench
    from mtrl.recipe import dump_recipe
    from tests.test_bench import fake_cell

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"policy": {"model": "x"}}))
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "output": "report", "seeds": [0, 1],
                                                          "schemes": {"token": []}}))
    bench = load_bench(tmp_path / "bench.yaml")
    for seed in (0, 1):  # finished cells with the bench's recipe: `mtrl bench` only writes the report
        cell = fake_cell(bench.output / "runs" / "token" / f"seed-{seed}", [1.0 + seed] * 20, {}, 50.0, 52.0)
        (cell / "recipe.yaml").write_text(dump_recipe(cell_recipe(bench, "token", seed)))
    report = bench.output
    for name in ("results.csv", "reward_curves.png"):
        with monkeypatch.context() as m:
            FullDisk(m, report / f".{name}")
            assert main(["bench", str(tmp_path / "bench.yaml"), "--quiet"]) == 2
        one_error_line(capsys, f"cannot write {report / name}: {ENOSPC}", progress="mtrl bench: [")
        assert not (report / name).exists() and leftovers(report) == []


def test_real_tiny_file_system(texts, tmp_path):
    """The probe of the issue on a real full disk: a 16 KiB tmpfs (skipped where it cannot be mounted)."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    src, hyp, ref = texts
    hyp.write_text(hyp.read_text() * 4)  # 160 rows, ~40 KiB scored (and no progress bar)
    ref.write_text(ref.read_text() * 4)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "scored.jsonl"
    cmd = (f"mount -t tmpfs -o size=16k tmpfs {mnt} || exit 99; {sys.executable} -m mtrl.cli score "
           f"--hyp {hyp} --ref {ref} --output {out}; rc=$?; ls -A {mnt}; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True)
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip("cannot mount a tmpfs here")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"mtrl: error: cannot write {out}: {ENOSPC}"]
    assert proc.stdout.strip() == ""  # `ls -A` of the file system: nothing left on it


# --------------------------------------------------------------------------- training runs
def write_recipe(tmp_path: Path, tiny_seq2seq, small_data, steps: int) -> tuple[Path, Path]:
    run = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    recipe = tiny_recipe(tiny_seq2seq, small_data, run, train={"steps": steps, "save_every": 1, "report_to": []})
    path.write_text(yaml.safe_dump(recipe))
    return path, run


def test_train_checkpoint_on_a_full_disk_then_resume(tiny_seq2seq, small_data, tmp_path, monkeypatch, capsys):
    path, run = write_recipe(tmp_path, tiny_seq2seq, small_data, steps=2)
    ckpts = run / "checkpoints"
    with monkeypatch.context() as m:
        FullDisk(m, ckpts / ".step-000002.tmp")  # step 1 is saved, then the disk is full
        assert main(["train", str(path), "--quiet"]) == 2
    line = one_error_line(capsys, f"cannot write {ckpts / 'step-000002'}: {ENOSPC}")
    assert f"continue from {ckpts / 'step-000001'}" in line and "--resume" in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000001"]
    assert (ckpts / "latest").read_text() == "step-000001\n"
    assert main(["train", str(run / "recipe.yaml"), "--resume", "--quiet"]) == 0
    assert (run / "final" / "config.json").exists() and "after" in json.loads((run / "eval.json").read_text())


def test_train_final_on_a_full_disk_then_resume(tiny_seq2seq, small_data, tmp_path, monkeypatch, capsys):
    """The weights are written by safetensors (Rust): its error names the os error in its message."""
    import safetensors
    import transformers.modeling_utils

    path, run = write_recipe(tmp_path, tiny_seq2seq, small_data, steps=1)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # half a file
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: {ENOSPC} (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(transformers.modeling_utils, "safe_save_file", full)
        assert main(["train", str(path), "--quiet"]) == 2
    line = one_error_line(capsys, f"cannot write {run / 'final'}: {ENOSPC}", "--resume")
    assert str(run / "checkpoints" / "step-000001") in line
    assert not (run / "final").exists() and leftovers(run) == []
    assert main(["train", str(run / "recipe.yaml"), "--resume", "--quiet"]) == 0
    assert (run / "final" / "model.safetensors").exists() and "after" in json.loads((run / "eval.json").read_text())
