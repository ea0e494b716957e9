"""The ``mtrl`` command line: ``score``, ``train`` and friends.

User mistakes (bad files, bad options) print one ``mtrl: error: ...`` line on
stderr and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from mtrl.errors import MtrlError, exit_status

SEVERITY_COLORS = {"minor": "33", "major": "31", "critical": "1;35"}


# --------------------------------------------------------------------------- checks before the work
def check_at_least(value: float | None, flag: str, low: int) -> None:
    """``value`` (when given) is >= ``low``; else one error line naming the flag and the allowed range."""
    if value is not None and value < low:
        raise MtrlError(f"{flag} must be >= {low} (got {value})")


def check_positive(value: float | None, flag: str) -> None:
    """``value`` (when given) is a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise MtrlError(f"{flag} must be a number > 0 (got {value})")


def check_writable(path: str | Path | None, flag: str) -> None:
    """Fail now, not after the work, when ``path`` cannot be written: it is a directory, a parent is a file,
    or the nearest existing folder is not writable. Creates nothing (missing parents are made when writing)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise MtrlError(f"{flag} {path}: is a directory, expected a file name")
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MtrlError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MtrlError(f"{flag} {path}: cannot write in {parent} (permission denied)")


# --------------------------------------------------------------------------- score
def _parse_severity_map(spec: str) -> Any:
    """``xcomet`` | ``wmt-mqm`` | ``minor=-1,major=-5,critical=-10`` | a JSON object."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            return json.loads(spec)
        except json.JSONDecodeError as e:
            raise MtrlError(f"--severity-map: invalid JSON ({e.msg})") from None
    if "=" in spec:
        out = {}
        for part in spec.split(","):
            key, _, value = part.partition("=")
            out[key.strip()] = value.strip()
        return out
    return spec


def _field(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if n in row:
            return row[n]
    return None


def load_score_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Input rows as dicts with ``src``/``mt``/``ref`` (plus whatever else the input had)."""
    from mtrl.io import read_lines
    from mtrl.translations import read_translations

    if args.input:
        if args.src or args.hyp or args.ref:
            raise MtrlError("give either --input or --src/--hyp/--ref, not both")
        rows = read_translations(args.input)
        where = args.input
    else:
        if not args.hyp:
            raise MtrlError("give the hypotheses: --input FILE.jsonl, or --hyp FILE (with --src/--ref)")
        hyps = read_lines(args.hyp)
        cols = {"mt": hyps}
        for name, path in (("src", args.src), ("ref", args.ref)):
            if path:
                lines = read_lines(path)
                if len(lines) != len(hyps):
                    raise MtrlError(f"{path} has {len(lines)} lines but {args.hyp} has {len(hyps)}")
                cols[name] = lines
        rows = [{"src": cols.get("src", [None] * len(hyps))[i], "mt": h,
                 "ref": cols.get("ref", [None] * len(hyps))[i]} for i, h in enumerate(hyps)]
        where = args.hyp
    if not rows:
        raise MtrlError(f"{where}: no segments to score")
    return rows


REWARD_FLAGS = ("severity_map", "token_rewards", "reward_mode", "no_error_reward", "hybrid_weight", "scorer",
                "scorer_model", "r3hf_level", "hybrid_sentence", "reward_scale")


def reward_from_args(args: argparse.Namespace) -> Any:
    """The reward section: the recipe's (``--recipe``), or built from the reward flags (defaults: token/xcomet/max)."""
    from mtrl.rewards import RewardConfig

    given = {k: getattr(args, k) for k in REWARD_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "guards", "auto") != "auto":
        given["guards"] = {"enabled": args.guards == "default"}
    if getattr(args, "recipe", None):
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise MtrlError(f"--recipe sets the reward; drop {flags} (or override in the recipe)")
        return None
    names = {"reward_mode": "mode", "no_error_reward": "no_error", "reward_scale": "scale"}
    cfg = {names.get(k, k): v for k, v in given.items()}
    if "severity_map" in cfg:
        cfg["severity_map"] = _parse_severity_map(cfg["severity_map"])
    return RewardConfig.from_dict(cfg)


def placement_from_args(args: argparse.Namespace, detector: str) -> dict[str, str]:
    """``--device``/``--dtype`` as detector settings, checked before anything loads (xcomet only)."""
    from mtrl.comet import check_device, check_dtype

    given = {k: getattr(args, k) for k in ("device", "dtype") if getattr(args, k, None) is not None}
    if given and detector != "xcomet":
        raise MtrlError(f"{', '.join('--' + k for k in given)}: only the xcomet detector runs a model "
                        f"(the detector is {detector})")
    if "device" in given:
        check_device(given["device"], "--device")
    if "dtype" in given:
        check_dtype(given["dtype"], "--dtype")
    return given


def cmd_score(args: argparse.Namespace) -> int:
    from mtrl.detectors import DetectorConfig
    from mtrl.detectors.gold import parse_spans
    from mtrl.io import atomic_open
    from mtrl.rewards import Rewarder
    from mtrl.score import load_tokenizer, score, summarize

    check_at_least(args.batch_size, "--batch-size", 1)
    check_writable(args.output, "--output")
    reward = reward_from_args(args)
    rows = load_score_rows(args)
    gold = None
    if args.detector == "gold":
        if any("error_spans" not in r for r in rows):
            raise MtrlError("the gold detector reads spans from --input: JSON lines with 'error_spans' "
                            "(or a Google MQM .tsv); some rows have none")
        gold = [parse_spans(r["error_spans"], r["mt"], f"{args.input}: row {i}") for i, r in enumerate(rows, 1)]
    if args.recipe:  # the recipe's detector, reward and (default) tokenizer: what training computes
        from mtrl.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        if args.detector or args.model:
            raise MtrlError("--recipe sets the detector; drop --detector/--model")
        det_cfg, reward = recipe.detector, recipe.reward
        for key, value in placement_from_args(args, det_cfg.name).items():  # where, not what: results unchanged
            setattr(det_cfg, key, value)
        tok_name = args.tokenizer or recipe.policy.tokenizer or _recipe_model(recipe)
        language = args.tgt_lang or recipe.data.tgt_lang
    else:
        det_cfg = DetectorConfig(name=args.detector or "reference", model=args.model, batch_size=args.batch_size,
                                 use_reference=True, **placement_from_args(args, args.detector or "reference"))
        tok_name, language = args.tokenizer, args.tgt_lang
    tokenizer = load_tokenizer(tok_name) if tok_name else None
    if gold is not None and reward.guards.floor is None:  # given MQM spans: the floor on their scale
        from mtrl.detectors.gold import GoldDetector

        reward.guards.floor = GoldDetector.worst_score
    needs_detector = gold is None and reward.uses_detector
    detector = det_cfg.build() if needs_detector else None
    refs = [r["ref"] for r in rows]
    # without references xCOMET scores in QE mode, and the guards are on (unless --guards none)
    use_reference = det_cfg.use_reference and not all(x is None for x in refs)
    rewarder = Rewarder(reward, detector, tokenizer, use_reference=use_reference, language=language)
    segments = score(
        [r["mt"] for r in rows], [r["src"] or "" for r in rows],
        None if all(x is None for x in refs) and det_cfg.name != "reference" else refs,
        rewarder=rewarder, gold_spans=gold, progress=len(rows) > 200 or args.progress,
    )
    if args.format == "jsonl":
        text = "".join(json.dumps({**row, **seg.to_dict()}, ensure_ascii=False) + "\n"
                       for row, seg in zip(rows, segments))
    else:
        color = args.output is None and sys.stdout.isatty() and "NO_COLOR" not in os.environ
        text = "".join(render_pretty(i, seg, color) for i, seg in enumerate(segments, 1))
    if args.output:
        with atomic_open(args.output) as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(summarize(segments), file=sys.stderr)
    return 0


def _recipe_model(recipe: Any) -> str:
    """The recipe's initial policy, whose tokenizer the rewards are for."""
    from mtrl.policy import resolve_model

    return resolve_model(recipe.policy.model)


def render_pretty(index: int, seg: Any, color: bool) -> str:
    """The hypothesis with its spans highlighted (ANSI colours, or [text]{severity} without)."""
    parts, pos = [], 0
    for sp in seg.spans:
        if sp.start < pos:  # overlapping spans: show the first
            continue
        parts.append(seg.hypothesis[pos:sp.start])
        text = seg.hypothesis[sp.start:sp.end]
        parts.append(f"\033[{SEVERITY_COLORS[sp.severity]}m{text}\033[0m" if color else f"[{text}]{{{sp.severity}}}")
        pos = sp.end
    parts.append(seg.hypothesis[pos:])
    tripped = f"  guards: {', '.join(seg.guards)}" if seg.guards else ""
    out = f"#{index}  score {seg.score:.4f}  spans {len(seg.spans)}{tripped}\n  {''.join(parts)}\n"
    if seg.tokens is not None:
        toks = " ".join(f"{t}:{r:g}" if r else t for t, r in zip(seg.tokens, seg.token_rewards))
        out += f"  tokens: {toks}\n"
    return out


def add_reward_flags(p: argparse.ArgumentParser, modes: tuple[str, ...] | None = None) -> None:
    """The reward section as flags (defaults: token rewards, xcomet severity map, max)."""
    from mtrl.rewards import allowed

    p.add_argument("--severity-map", help="xcomet | wmt-mqm | minor=-1,major=-5,critical=-10 (default xcomet)")
    p.add_argument("--no-error-reward", type=float, help="reward of tokens with no error (default 0)")
    p.add_argument("--token-rewards", choices=allowed("token_rewards"),
                   help="max: each token gets its most severe span's value; spread: a span's value is "
                        "split over its tokens (sums are kept); default max")
    p.add_argument("--reward-mode", choices=modes or allowed("mode"),
                   help="token: severity map on tokens; sentence: the score on the last token; hybrid: both; "
                        "r3hf: score differences of successive prefixes (default token)")
    p.add_argument("--hybrid-weight", type=float, help="weight of the sentence score in hybrid mode (default 1)")
    p.add_argument("--hybrid-sentence", choices=allowed("hybrid_sentence"),
                   help="hybrid: the sentence score on the last token, or spread over the tokens by R3HF")
    p.add_argument("--scorer", choices=allowed("scorer"),
                   help="r3hf/hybrid: the sentence scorer (chrf/bleu: sacrebleu, 0-100; default detector)")
    p.add_argument("--scorer-model", help="--scorer comet: COMET hub id or local checkpoint")
    p.add_argument("--r3hf-level", choices=allowed("r3hf_level"),
                   help="r3hf prefixes at every token, or only at word ends (cheaper)")
    p.add_argument("--reward-scale", type=float, help="multiply every reward (default 1)")
    p.add_argument("--guards", choices=("auto", "default", "none"), default="auto",
                   help="checks for empty, too short or long, copied, wrong-language and looping output "
                        "(reward.guards): default: on, with their default bounds; none: off; auto: on when the "
                        "detector scores without references (default auto). Output rows list the tripped guards")


def add_score_parser(sub: Any) -> None:
    from mtrl.detectors import DETECTORS

    p = sub.add_parser("score", help="mark error spans and compute token-level rewards",
                       description="Score translations with the reward pipeline; with --tokenizer (or --recipe) "
                                   "also write per-token rewards.")
    p.add_argument("--input", help="JSON lines with src/mt/ref (or source/hypothesis/reference; gold spans in "
                                   "error_spans), or a Google MQM .tsv")
    p.add_argument("--src", help="source file, one segment per line")
    p.add_argument("--hyp", help="hypothesis file, one segment per line")
    p.add_argument("--ref", help="reference file, one segment per line")
    p.add_argument("--recipe", help="take the detector, the reward and the tokenizer from this training recipe: "
                                    "the token rewards it trains on")
    p.add_argument("--detector", choices=DETECTORS,
                   help="reference: embedded, needs references (default); xcomet: an xCOMET model; "
                        "gold: spans given in --input")
    p.add_argument("--model", help="xCOMET hub id or local checkpoint (default Unbabel/XCOMET-XL)")
    p.add_argument("--tokenizer", help="hub id or local path: write per-token rewards for this tokenizer")
    p.add_argument("--tgt-lang", help="the target language (name or ISO 639-1 code) for the language guard "
                                      "(default: the recipe's data.tgt_lang)")
    add_reward_flags(p)
    p.add_argument("--batch-size", type=int, default=16, help="detector batch size (xcomet), >= 1")
    p.add_argument("--device", help="xcomet: auto (this process's GPU, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", help="xcomet: auto (fp16 on a GPU, fp32 on the CPU), fp32, fp16 or bf16")
    p.add_argument("--output", help="output file (written atomically); stdout when absent")
    p.add_argument("--format", choices=("jsonl", "pretty"), default="jsonl")
    p.add_argument("--progress", action="store_true", help="always show the progress bar")
    p.set_defaults(func=cmd_score)


# --------------------------------------------------------------------------- label
def cmd_label(args: argparse.Namespace) -> int:
    from mtrl.detectors import DetectorConfig
    from mtrl.label import label, print_label_summary, sample_rows
    from mtrl.rewards import Rewarder
    from mtrl.score import load_tokenizer
    from mtrl.translations import read_translations

    if bool(args.input) == bool(args.policy):
        raise MtrlError("give either --input (existing MT outputs) or --policy with --samples and --data")
    for flag in ("max_sources", "samples", "max_new_tokens", "batch_size", "max_tokens"):
        check_at_least(getattr(args, flag), "--" + flag.replace("_", "-"), 1)
    check_positive(args.temperature, "--temperature")
    output = Path(args.output)
    if output.suffix == ".parquet":
        raise MtrlError(f"--output {args.output}: give the JSON-lines name (the .parquet copy is written beside it)")
    for path in (output, output.with_suffix(".parquet"), *(output.with_name(output.name + x)
                                                             for x in (".partial", ".samples.jsonl"))):
        check_writable(path, "--output")
    reward = reward_from_args(args)
    placement = placement_from_args(args, args.detector)
    if args.policy:
        from mtrl.datasets import load_pairs

        pairs = load_pairs(args.data, limit=args.max_sources)
        from mtrl.policy import PolicyConfig, build_policy

        rows = sample_rows(lambda: build_policy(PolicyConfig(model=args.policy), args.policy, args.src_lang,
                                                args.tgt_lang),
                           pairs, args.samples, args.temperature, args.max_new_tokens, seed=args.seed,
                           progress=not args.quiet, cache=output.with_name(output.name + ".samples.jsonl"),
                           policy_id={"model": args.policy, "src_lang": args.src_lang, "tgt_lang": args.tgt_lang})
    else:
        rows = read_translations(args.input, args.ref_column)
    if not rows:
        raise MtrlError("no rows to label")
    tok_name = args.tokenizer or args.policy
    if tok_name:
        from mtrl.policy import resolve_model

        tok_name = resolve_model(tok_name)
    detector = DetectorConfig(name=args.detector, model=args.model, batch_size=args.batch_size,
                              use_reference=True, **placement).build()
    # rows without references: xCOMET scores in QE mode, and the guards are on (unless --guards none)
    use_reference = not all(r.get("ref") is None for r in rows)
    rewarder = Rewarder(reward, detector, load_tokenizer(tok_name) if tok_name else None,
                        use_reference=use_reference, language=args.tgt_lang)
    counts = label(rows, output, rewarder, max_tokens=args.max_tokens, progress=not args.quiet)
    if args.policy:  # the labels are complete: the sampled rows are in OUTPUT now
        output.with_name(output.name + ".samples.jsonl").unlink(missing_ok=True)
    print_label_summary(counts, output)
    return 0


def add_label_parser(sub: Any) -> None:
    p = sub.add_parser("label", help="label MT outputs or policy samples with a detector (offline RL data)",
                       description="Write detector spans, scores and per-token rewards for (source, hypothesis, "
                                   "reference) rows: JSON lines plus a Parquet copy. Resumable.")
    p.add_argument("--input", help="JSONL (src/mt/ref) or a WMT-style TSV (source, ref_A, hyp_<SYSTEM> columns)")
    p.add_argument("--ref-column", default="ref_A", help="reference column of a TSV input (default ref_A)")
    p.add_argument("--policy", help="sample hypotheses from this model (hub id, local path or mtrl:tiny-marian)")
    p.add_argument("--samples", type=int, default=4, help="samples per source with --policy, >= 1 (default 4)")
    p.add_argument("--data", default="multi30k:train", help="sources to sample from: multi30k:SPLIT or a file")
    p.add_argument("--max-sources", type=int, help="use only the first N sources, N >= 1 (default: all)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest sample, >= 1 (default 64)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each chunk of samples is seeded from (seed, chunk), so an interrupted "
                        "run, rerun, samples what OUTPUT.samples.jsonl lacks and gets the same rows")
    p.add_argument("--src-lang", default="English", help="source language name in a causal policy's prompt")
    p.add_argument("--tgt-lang", default="German", help="target language: a causal policy's prompt, and the language "
                                                         "guard's (a name or an ISO 639-1 code; default German)")
    p.add_argument("--output", required=True, help="output JSON lines (a .parquet copy is written beside it; "
                                                   "OUTPUT.partial and OUTPUT.samples.jsonl hold unfinished work)")
    p.add_argument("--detector", choices=("reference", "xcomet"), default="reference")
    p.add_argument("--model", help="xCOMET hub id or local checkpoint")
    p.add_argument("--tokenizer", help="write token_ids/token_rewards for this tokenizer (default: --policy's)")
    add_reward_flags(p)
    p.add_argument("--batch-size", type=int, default=16, help="detector batch size (xcomet), >= 1")
    p.add_argument("--device", help="xcomet: auto (this process's GPU, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", help="xcomet: auto (fp16 on a GPU, fp32 on the CPU), fp32, fp16 or bf16")
    p.add_argument("--max-tokens", type=int, default=256, help="longer hypotheses are rejected, >= 1 (default 256)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_label)


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from mtrl.recipe import load_recipe
    from mtrl.runner import print_run_summary, run

    recipe = load_recipe(args.recipe, args.overrides)
    if args.run_dir:
        recipe.run_dir = args.run_dir
    if args.resume and args.overwrite:
        raise MtrlError("--resume and --overwrite exclude each other")
    results = run(recipe, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:  # under torchrun / accelerate launch: one table
        print_run_summary(results, recipe.run_dir)
    state.wait_for_everyone()
    state.destroy_process_group()  # a process that exits with gloo's threads still up is aborted
    return 0


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a translation model with RL from a YAML recipe",
                       description="Run a recipe: RL with token-level rewards, evaluation before/after. "
                                   "Overrides look like algorithm.kl_coef=0.05.")
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of recipe entries")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a finished or stopped run again in its run directory")
    p.add_argument("--run-dir", help="override the recipe's run_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    p.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from mtrl.evaluate import EVAL_METRICS, evaluate_systems, format_markdown
    from mtrl.io import atomic_open, read_lines

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown:
        raise MtrlError(f"--metrics: unknown {', '.join(unknown)}; allowed: {', '.join(EVAL_METRICS)}")
    if not metrics:
        raise MtrlError(f"--metrics: give at least one of {', '.join(EVAL_METRICS)}")
    for flag in ("beams", "max_new_tokens", "batch_size"):
        check_at_least(getattr(args, flag), "--" + flag.replace("_", "-"), 1)
    check_at_least(args.bootstrap, "--bootstrap", 0)
    check_writable(args.output, "--output")
    if args.model:
        if args.hyp:
            raise MtrlError("give either --model (translate, then score) or --hyp files, not both")
        if not args.data:
            raise MtrlError("--model needs --data (a JSONL/TSV file or multi30k:SPLIT with sources and references)")
        from mtrl.datasets import load_pairs
        from mtrl.evaluate import translate
        from mtrl.policy import GenerationConfig, PolicyConfig, build_policy

        pairs = load_pairs(args.data)
        sources, refs = [p[0] for p in pairs], [[p[1] for p in pairs]]
        policy = build_policy(PolicyConfig(model=args.model), args.model, args.src_lang, args.tgt_lang)
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, eval_num_beams=args.beams,
                               eval_batch_size=args.batch_size)
        systems = {Path(args.model).name or args.model: translate(policy, sources, gen)}
    else:
        if not args.hyp or not args.ref:
            raise MtrlError("give --hyp FILE (one or more) and --ref FILE, or --model with --data")
        refs = [read_lines(r) for r in args.ref]
        for r, lines in zip(args.ref[1:], refs[1:]):
            if len(lines) != len(refs[0]):
                raise MtrlError(f"{r} has {len(lines)} lines but {args.ref[0]} has {len(refs[0])}")
        systems = {}
        for h in args.hyp:
            lines = read_lines(h)
            if len(lines) != len(refs[0]):
                raise MtrlError(f"{h} has {len(lines)} lines but {args.ref[0]} has {len(refs[0])}")
            name = Path(h).name
            systems[name if name not in systems else h] = lines
        sources = read_lines(args.src) if args.src else None
        if sources is not None and len(sources) != len(refs[0]):
            raise MtrlError(f"{args.src} has {len(sources)} lines but {args.ref[0]} has {len(refs[0])}")
    if not refs[0]:
        raise MtrlError("no segments to evaluate")
    results = evaluate_systems(systems, refs, sources, metrics, comet_model=args.comet_model,
                               bootstrap=args.bootstrap)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n" if args.format == "json" \
        else format_markdown(results)
    if args.output:
        with atomic_open(args.output) as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="BLEU/chrF/chrF++/TER (sacrebleu), COMET, detector score; paired bootstrap",
                       description="Score hypothesis files against references (the first --hyp is the baseline "
                                   "of the paired bootstrap test), or translate --data with --model first.")
    p.add_argument("--hyp", action="append", help="hypothesis file (repeat for several systems)")
    p.add_argument("--ref", action="append", help="reference file (repeat for several references)")
    p.add_argument("--src", help="source file (COMET, detector)")
    p.add_argument("--model", help="translate --data with this model first (hub id or local path)")
    p.add_argument("--data", help="with --model: sources and references (JSONL/TSV file or multi30k:SPLIT)")
    p.add_argument("--src-lang", default="English")
    p.add_argument("--tgt-lang", default="German")
    p.add_argument("--beams", type=int, default=1, help="beam size with --model, >= 1 (default 1: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="with --model, >= 1 (default 128)")
    p.add_argument("--batch-size", type=int, default=64, help="with --model, >= 1 (default 64)")
    p.add_argument("--metrics", default="bleu,chrf,chrf++,ter",
                   help="comma-separated: bleu, chrf, chrf++, ter, comet, detector (default bleu,chrf,chrf++,ter)")
    p.add_argument("--comet-model", help="COMET hub id or local checkpoint (e.g. Unbabel/wmt22-comet-da)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples, >= 0 (0: no test; default 1000)")
    p.add_argument("--format", choices=("json", "markdown"), default="json")
    p.add_argument("--output", help="output file (written atomically); stdout when absent")
    p.set_defaults(func=cmd_eval)


# --------------------------------------------------------------------------- bench, stability
def cmd_bench(args: argparse.Namespace) -> int:
    from mtrl.bench import run_bench

    run_bench(args.bench, quiet=args.quiet)
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from mtrl.stability import format_report, plot_kl_entropy, plot_reward_curves, stability_report

    if args.plot:
        for name in ("reward_curves.png", "kl_entropy.png"):
            check_writable(Path(args.plot) / name, "--plot")
    for i, run in enumerate(args.runs):
        report = stability_report(run)
        if args.format == "json":
            print(json.dumps({"run": run, **report}, indent=2))
        else:
            print(("\n" if i else "") + format_report(report))
    if args.plot:
        runs = {Path(r).name: [r] for r in args.runs}
        print(plot_reward_curves(runs, Path(args.plot) / "reward_curves.png"), file=sys.stderr)
        print(plot_kl_entropy(runs, Path(args.plot) / "kl_entropy.png"), file=sys.stderr)
    return 0


def add_bench_parsers(sub: Any) -> None:
    p = sub.add_parser("bench", help="run reward schemes x seeds from a benchmark file and write a report",
                       description="Run every (scheme, seed) cell of a benchmark file (finished cells are "
                                   "skipped), then write tables, plots and the recipes used.")
    p.add_argument("bench", help="benchmark YAML (see eval/bench-quickstart.yaml)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
    s = sub.add_parser("stability", help="training-stability flags and key figures of runs, optional plots")
    s.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    s.add_argument("--format", choices=("text", "json"), default="text",
                   help="text: per run the flags set and a table of key figures (default); "
                        "json: every indicator, for scripts")
    s.add_argument("--plot", help="directory for reward_curves.png and kl_entropy.png")
    s.set_defaults(func=cmd_stability)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtrl", description="Fine-grained RL for machine translation.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_score_parser(sub)
    add_train_parser(sub)
    add_label_parser(sub)
    add_bench_parsers(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`mtrl train r.yaml --overwrite a.b=1`)
    if unknown and hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
        args.overrides = [*args.overrides, *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "quiet", False):  # transformers' own bars too (loading and saving weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return exit_status(args.func, args)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
