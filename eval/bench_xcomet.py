"""Throughput of the resident xCOMET detector against a plain forward of the same model.

Both score the same segments in calls of ``--call-size`` rows (a reward call in RL):

* ``detector``: :class:`mtrl.detectors.xcomet.XCometDetector` (resident :mod:`mtrl.comet` model,
  length buckets, truncation counting and span repair);
* ``raw_forward``: the same model's ``predict`` (tokenize, forward passes, span decoding) on batches of
  ``--call-size`` sorted by source length; nothing else. The ceiling.

unbabel-comet's own ``predict`` is gone with the dependency; its last figures (detector 2.1x faster with
references, 2.3x in QE, on the same machine kind) stay in ``eval/results/bench_xcomet.txt`` as the old anchor.

The methods are interleaved within each repeat (order rotated) and the reported numbers are medians;
ratios are medians of the per-repeat ratios (paired). ``fixed_cost_ms`` is the median time of a
one-segment call. Default model: the tiny xCOMET of :func:`mtrl.testing.build_tiny_xcomet` (built in a
temporary folder, a few seconds), so the numbers measure per-call overhead more than the encoder.

    python eval/bench_xcomet.py --segments 256 --repeats 7 --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from mtrl.detectors.xcomet import XCometDetector
from mtrl.testing import ERROR_WORD, build_tiny_xcomet, training_pairs


def segments(n: int) -> tuple[list[str], list[str], list[str]]:
    """``n`` Multi30k rows (cycled when asked for more); every third hypothesis carries the error word."""
    pairs = training_pairs(min(n, 800))
    pairs = [pairs[i % len(pairs)] for i in range(n)]
    hyps = [r.replace(" ", f" {ERROR_WORD} ", 1) if i % 3 == 0 else r for i, (_, r) in enumerate(pairs)]
    return [s for s, _ in pairs], hyps, [r for _, r in pairs]


def calls(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def make_methods(ckpt: str, device: str, dtype: str, call_size: int, with_ref: bool
                 ) -> dict[str, Callable[[list[str], list[str], list[str]], Any]]:
    """name -> function scoring one call's rows."""
    det = XCometDetector(ckpt, batch_size=call_size, device=device, dtype=dtype)
    model = det.load()

    def detector(s: list[str], h: list[str], r: list[str]) -> Any:
        return det.detect(s, h, r if with_ref else None)

    def raw_forward(s: list[str], h: list[str], r: list[str]) -> Any:
        samples = [{"src": a, "mt": b} | ({"ref": c} if with_ref else {}) for a, b, c in zip(s, h, r, strict=True)]
        samples.sort(key=lambda x: len(x["src"]))
        out = []
        with torch.inference_mode():
            for i in range(0, len(samples), call_size):
                pred = model.predict(samples[i:i + call_size])
                out.append((pred.scores.float().cpu().tolist(), pred.error_spans))
        return out

    return {"detector": detector, "raw_forward": raw_forward}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_pass(fn: Callable, rows: tuple[list[str], list[str], list[str]], chunks: list[range]) -> float:
    """Seconds to score every row, one call per chunk."""
    src, hyp, ref = rows
    sync()
    t = time.perf_counter()
    for c in chunks:
        fn(src[c.start:c.stop], hyp[c.start:c.stop], ref[c.start:c.stop])
    sync()
    return time.perf_counter() - t


def bench_mode(prefix: str, ckpt: str, args: argparse.Namespace, with_ref: bool) -> None:
    methods = make_methods(ckpt, args.device, args.dtype, args.call_size, with_ref)
    rows = segments(args.segments)
    chunks = calls(args.segments, args.call_size)
    names = list(methods)
    for fn in methods.values():  # warm-up: first-call costs (allocator, lazy imports) are not throughput
        run_pass(fn, rows, chunks[:2])
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
            times[name].append(run_pass(methods[name], rows, chunks))
    one = (rows[0][:1], rows[1][:1], rows[2][:1])
    fixed: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats * 5):
        for name in names:
            fixed[name].append(run_pass(methods[name], one, [range(1)]))
    for name in names:
        print(f"{prefix}{name}_seg_per_s: {args.segments / statistics.median(times[name]):.1f}")
    for name in names:
        print(f"{prefix}{name}_fixed_cost_ms: {1000 * statistics.median(fixed[name]):.2f}")
    ratio = statistics.median(o / d for d, o in zip(times["detector"], times["raw_forward"], strict=True))
    print(f"{prefix}detector_vs_raw_forward: {ratio:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=256, help="rows per timed pass")
    ap.add_argument("--repeats", type=int, default=7, help="timed passes per method (interleaved)")
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    ap.add_argument("--call-size", type=int, default=8, help="rows per call (and the batch size)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--model", default=None, help="an xCOMET checkpoint (default: build the tiny xCOMET)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"# command: python eval/bench_xcomet.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# machine: {os.cpu_count()}-core CPU ({platform.machine()}){gpu}; "
          f"load_average_1min at start {os.getloadavg()[0]:.2f}")
    print(f"# date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.model or str(build_tiny_xcomet(tmp))
        probe = XCometDetector(ckpt, device=args.device, dtype=args.dtype)
        p = next(probe.load().parameters())
        print(f"device: {p.device}\ndtype: {str(p.dtype).removeprefix('torch.')}\nthreads: {args.threads}")
        print(f"segments: {args.segments}\ncall_size: {args.call_size}\nrepeats: {args.repeats}")
        del probe
        bench_mode("", ckpt, args, with_ref=True)
        bench_mode("qe.", ckpt, args, with_ref=False)
    print(f"# load_average_1min at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
