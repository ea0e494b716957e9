"""The reward guards on real translations and on gamed versions of them, through ``mtrl score`` as a user runs it.

    python eval/eval_guards.py [--wmt22 DIR] [--multi30k DIR] [--work DIR]

For every WMT22 development slice (en-de, en-ru, zh-en: 4 systems' outputs and the references) and for the
Multi30k en-de validation and test2016 references, writes JSON-lines inputs and calls
``mtrl score --input F --detector reference --guards default --tgt-lang LANG`` (the reference detector, since
these rows have references; the guards do not look at it). Gamed versions of every system output:

- ``copy``: the source;
- ``wrong_language``: the same source's translation into another language (en-de <-> en-ru share their
  English sources; for zh-en, an en-de reference of the same row number: German text, unrelated content);
- ``empty``: the empty string;
- ``truncated_third``, ``truncated_half``: the first third / half of the output's words;
- ``loop``: the first half of the output's words, then its last two words four more times.

Prints ``name: value`` lines: first the figures the default bounds were chosen from (quantiles over the real
translations of each development set, in both directions: length ratio, copy share, and the target
language's probability), then per data set and kind the share of rows with a tripped guard (for the real rows
that is the false-flag rate) and the share each guard trips; and each real system output that trips a guard. The bounds were chosen on these WMT22 and
Multi30k validation rows; Multi30k test2016 is the held-out check of the false-flag rate.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from mtrl.cli import main as mtrl
from mtrl.rewards.guards import copy_share, language_probability, length_ratio

ROOT = Path(__file__).resolve().parent.parent
GAMES = ("copy", "wrong_language", "empty", "truncated_third", "truncated_half", "loop")


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def gamed(kind: str, source: str, hyp: str, other: str) -> str:
    words = hyp.split()
    if kind == "copy":
        return source
    if kind == "wrong_language":
        return other
    if kind == "empty":
        return ""
    if kind.startswith("truncated"):
        keep = len(words) // (3 if kind == "truncated_third" else 2)
        return " ".join(words[:max(keep, 1)])
    half = words[:max(len(words) // 2, 2)]
    return " ".join(half + half[-2:] * 4)


def score(rows: list[dict], lang: str, work: Path, name: str) -> list[list[str]]:
    """``mtrl score`` on the rows; the guards each row trips."""
    src, out = work / f"{name}.jsonl", work / f"{name}.scored.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    rc = mtrl(["score", "--input", str(src), "--detector", "reference", "--guards", "default",
               "--tgt-lang", lang, "--output", str(out)])
    assert rc == 0, f"mtrl score failed on {name}"
    return [json.loads(line)["guards"] for line in out.read_text(encoding="utf-8").splitlines()]


def report(name: str, tripped: list[list[str]]) -> None:
    n = len(tripped)
    print(f"{name}_rows: {n}")
    print(f"{name}_flagged: {sum(bool(t) for t in tripped) / n:.4f}")
    for guard, k in sorted(Counter(g for t in tripped for g in t).items()):
        print(f"{name}_{guard}: {k / n:.4f}")


def bound_figures(name: str, pairs: list[tuple[str, str]], lang: str) -> None:
    """Quantiles over real (source, translation) pairs of what the guards measure."""
    ratio = np.array([length_ratio(s, h) for s, h in pairs])
    copy = np.array([copy_share(s, h) for s, h in pairs])
    prob = np.array([language_probability(h, lang) for _, h in pairs if sum(c.isalpha() for c in h) >= 10])
    for q in (0.001, 0.005, 0.02, 0.5, 0.995, 0.999):
        print(f"{name}_length_ratio_q{q}: {np.quantile(ratio, q):.3f}")
    for q in (0.99, 0.999, 1.0):
        print(f"{name}_copy_share_q{q}: {np.quantile(copy, q):.3f}")
    for q in (0.001, 0.005, 0.01):
        print(f"{name}_language_prob_q{q}: {np.quantile(prob, q):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wmt22", type=Path, default=ROOT / "../shared/data/wmt22")
    ap.add_argument("--multi30k", type=Path, default=ROOT / "../shared/data/multi30k")
    ap.add_argument("--work", type=Path, help="where the inputs and scored files go (default: a temporary folder)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    data = {lp: read_tsv(args.wmt22 / f"wmt22_{lp}.dev.tsv") for lp in ("en-de", "en-ru", "zh-en")}
    by_source = {lp: {r["source"]: r["ref_A"] for r in rows} for lp, rows in data.items()}
    for lp, rows in data.items():  # every real translation, in both directions
        src, tgt = lp.split("-")
        pairs = [(r["source"], r[k]) for r in rows for k in r if (k.startswith(("hyp_", "ref_"))) and r[k]]
        bound_figures(f"dev_wmt22_{lp}", pairs, tgt)
        bound_figures(f"dev_wmt22_{tgt}-{src}", [(h, s) for s, h in pairs], src)
    with gzip.open(args.multi30k / "val.en.gz", "rt", encoding="utf-8") as f:
        val_en = [x.strip() for x in f]
    with gzip.open(args.multi30k / "val.de.gz", "rt", encoding="utf-8") as f:
        val_de = [x.strip() for x in f]
    bound_figures("dev_multi30k_val_en-de", list(zip(val_en, val_de)), "de")
    bound_figures("dev_multi30k_val_de-en", list(zip(val_de, val_en)), "en")
    for lp, rows in data.items():
        tgt = lp.split("-")[1]
        systems = [k for k in rows[0] if k.startswith("hyp_")]
        real = [{"src": r["source"], "mt": r[k], "ref": r["ref_A"]} for k in systems for r in rows]
        refs = [{"src": r["source"], "mt": r[k], "ref": r["ref_A"]} for k in ("ref_A", "ref_B") for r in rows
                if r.get(k)]
        tripped = score(real, tgt, work, f"{lp}-real")
        report(f"wmt22_{lp}_system_outputs", tripped)
        for row, guards in zip(real, tripped):  # the real outputs that trip a guard, to read
            if guards:
                print(f"wmt22_{lp}_flagged_output: {','.join(guards)} | {row['src'][:70]!r} -> {row['mt'][:70]!r}")
        report(f"wmt22_{lp}_references", score(refs, tgt, work, f"{lp}-refs"))
        for kind in GAMES:
            other_lp = {"en-de": "en-ru", "en-ru": "en-de"}.get(lp)
            rows_g = []
            for k in systems:
                for i, r in enumerate(rows):
                    other = by_source[other_lp].get(r["source"]) if other_lp else \
                        data["en-de"][i % len(data["en-de"])]["ref_A"]
                    if kind == "wrong_language" and not other:
                        continue
                    rows_g.append({"src": r["source"], "mt": gamed(kind, r["source"], r[k], other or ""),
                                   "ref": r["ref_A"]})
            report(f"wmt22_{lp}_{kind}", score(rows_g, tgt, work, f"{lp}-{kind}"))

    for split in ("val", "test_2016_flickr"):
        with gzip.open(args.multi30k / f"{split}.en.gz", "rt", encoding="utf-8") as f:
            en = [x.strip() for x in f]
        with gzip.open(args.multi30k / f"{split}.de.gz", "rt", encoding="utf-8") as f:
            de = [x.strip() for x in f]
        rows = [{"src": s, "mt": h, "ref": h} for s, h in zip(en, de)]
        report(f"multi30k_{split}_en-de_references", score(rows, "de", work, f"m30k-{split}"))
        back = [{"src": h, "mt": s, "ref": s} for s, h in zip(en, de)]
        report(f"multi30k_{split}_de-en_references", score(back, "en", work, f"m30k-{split}-back"))


if __name__ == "__main__":
    main()
