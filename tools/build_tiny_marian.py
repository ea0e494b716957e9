"""Build the shipped tiny Marian model (``mtrl:tiny-marian``, ``mtrl/data/tiny-marian/``) from scratch.

RL needs a policy that already translates reasonably, and no pretrained model can be downloaded
without network, so mtrl ships a tiny English->German Marian model trained on the shipped Multi30k
with plain supervised learning. This script is how it was built; from the repository root::

    python tools/build_tiny_marian.py --output mtrl/data/tiny-marian

1. train a shared en+de subword tokenizer (:func:`mtrl.testing.train_tokenizer`: BPE, or Unigram);
2. build a small ``MarianMTModel`` from a ``MarianConfig`` (random init);
3. train it with AdamW, warmup + decay, label smoothing, length-bucketed batches;
4. save model (fp16) + tokenizer into ``--output`` atomically, with ``build.json`` (the settings, the
   training data's SHA-256, statistics, software versions and this command line).

``--help`` lists the options (one per :class:`TinyMarianConfig` field, plus ``--threads``); the
defaults build the shipped model. ``tests/test_build_tiny_marian.py`` loads this file by path.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import GenerationConfig, MarianConfig, MarianMTModel, PreTrainedTokenizerFast

from mtrl.datasets import load_parallel
from mtrl.errors import MtrlError, exit_status
from mtrl.testing import train_tokenizer

SETTINGS_FILE = "build.json"
PROG = "python tools/build_tiny_marian.py"


@dataclass
class TinyMarianConfig:
    """Everything that determines the model; the defaults build the shipped one.

    The defaults fit the quickstart's ~4 min CPU budget (2 cores). Measured on Multi30k test2016
    (greedy), a small model trained for more steps beat a bigger one trained for fewer: d_model 128
    with batch 32 reached BLEU ~29 where d_model 256 reached ~27.5 on the same CPU time; dropout and
    batch 64 only slowed learning in so few epochs, and lr 2e-3 diverged (Marian is post-LayerNorm).
    """

    # data
    data: str = "multi30k"  # load_parallel name or path (a .jsonl / .tsv file)
    split: str | None = "train"  # for builtin corpora; None for files
    reverse: bool = False  # True: de->en for Multi30k
    limit: int | None = None  # use only the first N training pairs (smoke tests)
    # tokenizer (shared source+target vocabulary)
    tokenizer: str = "bpe"  # "bpe" or "unigram" (tokenizers' Unigram trainer is not deterministic)
    vocab_size: int = 5000  # 5000 and 8000 gave the same BLEU; 5000 is cheaper (softmax) here and in RL
    max_length: int = 64  # training sentences are truncated to this many tokens (incl. </s>)
    # model (2.2M parameters with the defaults)
    d_model: int = 128
    encoder_layers: int = 3
    decoder_layers: int = 3
    heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.0  # < 3 epochs: regularisation only slows learning
    # optimisation (2800 steps x 32 pairs = ~3 epochs of Multi30k)
    max_steps: int = 2800
    batch_size: int = 32  # sentence pairs per step
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "linear"  # "linear" (warmup, then linear decay to 0) or "inverse_sqrt"
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    max_minutes: float | None = None  # also stop after this much wall time (not reproducible)

    def check(self) -> None:
        """A one-line :class:`MtrlError` naming the flag when a setting cannot train."""
        if self.tokenizer not in ("unigram", "bpe"):
            raise MtrlError(f"--tokenizer must be 'unigram' or 'bpe', got {self.tokenizer!r}")
        if self.schedule not in ("linear", "inverse_sqrt"):
            raise MtrlError(f"--schedule must be 'linear' or 'inverse_sqrt', got {self.schedule!r}")
        if self.max_steps < 1 or self.batch_size < 1 or self.max_length < 2:
            raise MtrlError("--max-steps and --batch-size must be >= 1, --max-length >= 2")
        if self.limit is not None and self.limit < 1:
            raise MtrlError(f"--limit must be >= 1, got {self.limit}")
        if self.vocab_size < 4:
            raise MtrlError(f"--vocab-size must be >= 4, got {self.vocab_size}")
        if min(self.d_model, self.heads, self.ffn_dim, self.encoder_layers, self.decoder_layers) < 1:
            raise MtrlError("--d-model, --heads, --ffn-dim, --encoder-layers and --decoder-layers must be >= 1")
        if self.d_model % self.heads:
            raise MtrlError(f"--d-model {self.d_model} is not divisible by --heads {self.heads}")


def train_from_scratch(
    cfg: TinyMarianConfig, pairs: list[tuple[str, str]], progress: bool = True
) -> tuple[MarianMTModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """Seed, train the tokenizer, build and train the model; returns (model, tokenizer, stats)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    tokenizer = train_tokenizer([s for p in pairs for s in p], cfg.vocab_size, cfg.tokenizer)
    model = build_model(cfg, len(tokenizer))
    stats = train(model, tokenizer, pairs, cfg, progress)
    stats.update(
        seconds=round(time.perf_counter() - t0, 1),
        cpu_seconds=round(time.process_time() - cpu0, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        parameters=sum(p.numel() for p in model.parameters()),
        train_pairs=len(pairs),
    )
    return model, tokenizer, stats


def fingerprint(pairs: list[tuple[str, str]]) -> str:
    """SHA-256 of the training text (recorded in ``build.json``)."""
    h = hashlib.sha256()
    for src, ref in pairs:
        h.update(f"{src}\t{ref}\n".encode())
    return h.hexdigest()


def build_model(cfg: TinyMarianConfig, vocab_size: int) -> MarianMTModel:
    """A randomly initialised Marian transformer with shared (tied) embeddings."""
    config = MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_dim,
        decoder_ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        scale_embedding=True,
    )
    model = MarianMTModel(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        forced_eos_token_id=1,
        bad_words_ids=[[0]],  # never generate <pad> (it is also the decoder start token)
        max_new_tokens=cfg.max_length * 2,  # not max_length, which a call's max_new_tokens would meet
        num_beams=1,
    )
    return model


def train(
    model: MarianMTModel, tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]], cfg: TinyMarianConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Supervised cross-entropy training for ``cfg.max_steps`` steps (or ``cfg.max_minutes``)."""
    src = tokenizer([s for s, _ in pairs], truncation=True, max_length=cfg.max_length)["input_ids"]
    tgt = tokenizer([r for _, r in pairs], truncation=True, max_length=cfg.max_length)["input_ids"]
    examples = [(torch.tensor(s), torch.tensor(t)) for s, t in zip(src, tgt)]
    lengths = [max(len(s), len(t)) for s, t in zip(src, tgt)]
    batches = bucketed_batches(lengths, cfg.batch_size, random.Random(cfg.seed))

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model.train()
    start = time.perf_counter()
    tokens, loss_ema, step = 0, None, 0
    bar = tqdm(total=cfg.max_steps, desc="tiny marian", unit="step", dynamic_ncols=True, disable=not progress)
    for step in range(1, cfg.max_steps + 1):
        input_ids, attention_mask, decoder_input_ids, labels = collate([examples[i] for i in next(batches)])
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
        ).logits
        loss = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=cfg.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()

        tokens += int(attention_mask.sum()) + int((labels != -100).sum())
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        elapsed = time.perf_counter() - start
        bar.update()
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tokens / elapsed:.0f}", refresh=False)
        if cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes:
            print(f"{PROG}: time budget of {cfg.max_minutes} min reached at step {step}", file=sys.stderr)
            break
    bar.close()
    model.eval()
    return {"steps": step, "final_loss": round(loss_ema or 0.0, 4), "train_seconds": round(elapsed, 1),
            "tokens_per_second": round(tokens / elapsed)}


def lr_lambda(cfg: TinyMarianConfig):
    """Multiplier on ``cfg.lr``: linear warmup, then linear decay to 0 or inverse-sqrt decay."""
    warmup = max(1, cfg.warmup_steps)

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        step += 1
        if step <= warmup:
            return step / warmup
        if cfg.schedule == "inverse_sqrt":
            return math.sqrt(warmup / step)
        return max(0.0, (cfg.max_steps - step + 1) / max(1, cfg.max_steps - warmup + 1))

    return factor


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of indices with similar lengths (little padding) in random order.

    Each epoch shuffles, sorts within pools of 50 batches by length, cuts into batches and
    shuffles the batches, so batches differ from epoch to epoch.
    """
    pool = 50 * batch_size
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = []
        for p in range(0, len(order), pool):
            chunk = sorted(order[p : p + pool], key=lengths.__getitem__)
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Pad a batch; decoder inputs are the targets shifted right after the start token (pad=0)."""
    src = torch.nn.utils.rnn.pad_sequence([s for s, _ in batch], batch_first=True, padding_value=0)
    tgt = torch.nn.utils.rnn.pad_sequence([t for _, t in batch], batch_first=True, padding_value=-100)
    decoder_input_ids = torch.zeros_like(tgt)
    decoder_input_ids[:, 1:] = tgt[:, :-1].clamp(min=0)
    return src, (src != 0).long(), decoder_input_ids, tgt


def save_atomically(model: MarianMTModel, tokenizer: PreTrainedTokenizerFast, settings: dict, out_dir: Path) -> None:
    """Write an fp16 copy of ``model`` (half the size; ``model`` itself is unchanged), the tokenizer and
    ``settings`` into a temp dir next to ``out_dir`` and rename it into place, so a crash never leaves a
    half-written model that would pass for a finished one."""
    model = copy.deepcopy(model).half()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); use the usual permissions
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        for f in tmp.iterdir():  # safetensors writes model.safetensors private (0600) too
            os.chmod(f, 0o666 & ~umask)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f"{tmp.name}-old")
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(cfg: TinyMarianConfig, out_dir: Path, command: str, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` and write ``out_dir`` (fp16 weights, tokenizer, build.json); returns the settings."""
    cfg.check()
    out_dir = Path(out_dir)
    # save_atomically replaces out_dir: never do that to something that is not an earlier build
    earlier = out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / SETTINGS_FILE).is_file())
    if out_dir.exists() and not earlier:
        raise MtrlError(f"--output {out_dir} exists and is not an (empty or earlier) build directory")
    pairs = load_parallel(cfg.data, cfg.split, reverse=cfg.reverse, limit=cfg.limit)
    if not pairs:
        raise MtrlError(f"--data {cfg.data!r}: no training pairs")
    model, tokenizer, stats = train_from_scratch(cfg, pairs, progress)
    settings = {
        "config": asdict(cfg),
        "data_sha256": fingerprint(pairs),
        "stats": {**stats, "threads": torch.get_num_threads()},
        "dtype": "fp16",
        "command": command,
        "software": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    save_atomically(model, tokenizer, settings, out_dir)
    return settings


# --- command line ----------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # "mtrl: error: ..." and status 2, like the mtrl CLI
        self.print_usage(sys.stderr)
        self.exit(2, f"mtrl: error: {message}\n")


_ARG_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROG,
        description="Train a tiny Marian model from scratch and save it in fp16 with its tokenizer and "
        "build.json (settings, stats, the command that rebuilds it). The defaults build the shipped "
        f"model: {PROG} --output mtrl/data/tiny-marian",
    )
    parser.add_argument("--output", required=True, type=Path,
                        help="directory to write (replaced atomically if it holds an earlier build)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice; results may depend on it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("training settings (the defaults build the shipped model)")
    for f in dataclasses.fields(TinyMarianConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, action="store_true", default=None, help=f"(default: {f.default})")
            continue
        kind = _ARG_TYPES[f.type.split(" | ")[0]]
        if f.name == "split":  # "none" for --data files; by default none for files, "train" for multi30k
            group.add_argument(flag, default=None, metavar="SPLIT",
                               help=f"'none' for data files (default: {f.default} for builtin corpora)")
            continue
        metavar = {int: "N", float: "X"}.get(kind, f.name.upper())
        group.add_argument(flag, type=kind, default=None, metavar=metavar, help=f"(default: {f.default})")
    return parser


def config_from_args(args: argparse.Namespace) -> TinyMarianConfig:
    names = [f.name for f in dataclasses.fields(TinyMarianConfig)]
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "split" in options:
        options["split"] = None if options["split"].lower() == "none" else options["split"]
    elif "data" in options and options["data"] != "multi30k":
        options["split"] = None
    cfg = TinyMarianConfig(**options)
    cfg.check()
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return exit_status(build_from_args, args, argv)


def build_from_args(args: argparse.Namespace, argv: list[str]) -> int:
    """The command: train with the flags' settings and write ``--output``."""
    cfg = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise MtrlError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    command = shlex.join([*PROG.split(), *argv])
    stats = build(cfg, args.output, command, progress=not args.quiet)["stats"]
    print(f"mtrl: wrote {args.output} ({stats['parameters']:,} parameters, {stats['steps']} steps, "
          f"final loss {stats['final_loss']}, {stats['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
