"""``reference``: the embedded, model-free error-span detector (mtrl's default).

It aligns the hypothesis to the reference token by token and marks the
hypothesis stretches the reference does not support. It needs no model, no
download and no language resource beyond small function-word lists, so mtrl
can always run it. It is far weaker than xCOMET: a human reference is one
translation among many, so a good paraphrase looks like an error to it.

Tokens
    Runs of letters, combining marks and digits are words; a word with a digit
    is a number, compared without ``.``/``,`` (``1,000`` = ``1.000`` = ``1000``).
    Scripts written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar) give
    one token per character (with its combining marks). Any other non-space
    character is punctuation. Matching is case-insensitive (``str.lower``).

Alignment (order-free, one-to-one; good translations differ in word order)
    1. exact: a hypothesis token takes an unused identical reference token;
       when the hypothesis repeats a form more often than the reference, the
       occurrences nearest (in relative position) to the reference's win;
    2. fuzzy: a left-over hypothesis word takes a left-over reference word that
       shares a prefix of at least ``fuzzy_prefix`` characters and at least
       ``fuzzy_ratio`` of the longer word (inflection, compounds:
       ``unsere``/``unser``, ``Pfaden``/``Pfade``, ``danke``/``Dank``).

Severity of a hypothesis token
    - exact match, or punctuation: not marked (punctuation style varies freely);
    - fuzzy match: minor (a form or agreement slip, or just a variant);
    - unmatched function word (built-in lists for en/de/fr/es/it/pt/nl/ru,
      hiragana, a few Chinese particles; any other word of <= 2 letters unless
      in capitals, like ``EU``): minor;
    - unmatched content word, number or name: major. Names need no rule of
      their own (capitalisation cannot tell them from German nouns anyway).
    Neighbouring marked tokens (across spaces and punctuation) form one span
    with the worst severity among them.

Critical (one span over the whole hypothesis); checked only when at least half
of its words have no exact or fuzzy match, which keeps the checks off the fast
path. Together these rules fire on 0.5% of the real (hypothesis, reference)
pairs of the WMT22 dev TSVs, mostly free paraphrases of short sentences, and on
83% of pairs with a shuffled reference.
    - wrong script: most of its letters are in scripts that make up less than
      10% of the reference's letters (so Latin brand names in a Russian
      hypothesis pass when the reference has them too);
    - untranslated: at least ``copy_ratio`` of its words are unmatched in the
      reference but occur in the source;
    - mostly unsupported: it has at least ``min_words`` (6) words, fewer than
      1 in 10 of its content words and fewer than 3 in 10 of all its words
      match the reference (exactly or fuzzily). Shorter ones are left alone:
      a short paraphrase often shares no word with the reference. A free
      paraphrase keeps the grammatical skeleton (function words) of the
      reference, a hallucination does not; content words alone are matched by
      paraphrases too rarely.

Score (higher is better, 0 = nothing found, unbounded below)
    Minus the summed penalty of the marked words: each word token inside a
    span costs its severity's weight in ``severity_map`` (WMT MQM: minor 1,
    major 5, critical 25). This is the sum of the word-level rewards these spans
    give, MQM-like, and like human MQM it grows with length. Per word rather
    than per span, because a longer unsupported stretch is more wrong (it also
    correlated better with human MQM on the dev slice). A hypothesis with no
    word (empty, or punctuation only) scores as critical over the reference's
    words, without a span (there is nothing to put one on). Omissions are not scored:
    reference words left over were anti-correlated with human MQM on the dev
    slice (paraphrase, not omission, is what leaves them over).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from mtrl.detectors.base import Detection, Detector
from mtrl.detectors.spans import ErrorSpan, SeverityMap, get_severity_map, sanitize_spans
from mtrl.errors import MtrlError

# Scripts written without spaces between words: one token per character.
_NOSPACE = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # Han
    "\U00020000-\U0002fa1f"  # Han extensions
)
_NOSPACE_RE = re.compile(f"[{_NOSPACE}]")


def _char_class(pred) -> str:
    """Regex character-class body of the BMP code points where ``pred`` holds (at import: ~30 ms)."""
    out, start = [], None
    for cp in range(0x10001):
        if cp < 0x10000 and pred(chr(cp)):
            if start is None:
                start = cp
        elif start is not None:
            out.append(re.escape(chr(start)) + (f"-{re.escape(chr(cp - 1))}" if cp - 1 > start else ""))
            start = None
    return "".join(out)


# Word characters: letters, digits and combining marks (\w alone would split Indic
# words at their vowel signs), minus the scripts tokenised by character.
_WORD = _char_class(
    lambda c: (c.isalnum() or unicodedata.category(c)[0] == "M") and not _NOSPACE_RE.match(c)
)
_MARK = _char_class(lambda c: unicodedata.category(c)[0] == "M")
_TOKEN_RE = re.compile(
    rf"(?P<c>[{_NOSPACE}][{_MARK}]*)"
    rf"|(?P<n>[{_WORD}]*\d(?:[{_WORD}]|(?<=\d)[.,](?=\d))*)"  # a word with a digit
    rf"|(?P<w>[{_WORD}]+)"
    r"|(?P<p>\S)"
)
_NUM_SEP = str.maketrans("", "", ".,")

_FUNCTION_WORDS = frozenset(
    """
    a an the and or but if of to in on at by for with from as into onto than then that this these those
    is are was were be been being am has have had do does did not no so it its he she they we you i me him
    her them us my your his our their there here what which who whom whose when where why how all any some
    will would shall should can could may might must also just very too up out about over after before
    der die das den dem des ein eine einen einem einer eines und oder aber wenn als wie zu im in am an auf
    aus bei mit nach von vor zum zur ist sind war waren wird werden wurde wurden sein hat haben hatte es er
    sie wir ihr ich du man sich nicht auch so da dass daß was wer wo noch schon nur sehr um für über unter
    durch gegen ohne dies diese dieser dieses diesem diesen jede jeder jedes kein keine mein dein sein ihr
    unser euer ja doch mal dann denn weil ob bis seit
    le la les un une des du de et ou mais si au aux en dans sur par pour avec sans que qui est sont il elle
    ils elles nous vous je tu ne pas se ce cette ces son sa ses leur leurs
    el los las unos unas y o pero del al con por para que es son fue se lo su sus no muy como
    il lo gli una di da e è per che non si
    o os um uma e ou do da dos das no na nos nas em com por para que é são não se
    de het een en of maar van in op aan met voor dat die is zijn niet
    и в во на с со к ко по о об от до из за для не ни но а или что как это он она они мы вы я ты его ее её их
    же ли бы был была было были есть то так у
    """.split()
)
# Hiragana is mostly grammar (particles, endings); plus common Chinese function characters.
_CJK_FUNCTION = frozenset("的了是在和也就都而及与着之这那个们我你他她它吗呢吧啊") | frozenset(
    chr(cp) for cp in range(0x3040, 0x30A0)
)
_RANK = {"minor": 1, "major": 2, "critical": 3}


def _script(ch: str) -> str:
    """Coarse script of a letter; Han and kana count as one (Japanese mixes them)."""
    cp = ord(ch)
    if cp < 0x250:
        return "LATIN"
    if 0x3040 <= cp <= 0x30FF or 0x3400 <= cp <= 0x9FFF or 0xF900 <= cp <= 0xFAFF or cp >= 0x20000:
        return "CJK"
    try:
        return unicodedata.name(ch).split(" ", 1)[0]
    except ValueError:
        return "?"


class _Tokens:
    """Tokens of one text: offsets, lower-cased forms, kinds (w: word, n: number, c: character, p: punct)."""

    __slots__ = ("text", "starts", "ends", "forms", "kinds")

    def __init__(self, text: str) -> None:
        self.text = text
        ms = list(_TOKEN_RE.finditer(text))
        self.starts = [m.start() for m in ms]
        self.ends = [m.end() for m in ms]
        self.kinds: list[str] = [m.lastgroup or "p" for m in ms]
        low = text.lower()
        if len(low) == len(text):  # lower() keeps offsets for nearly all text; İ is the usual exception
            self.forms = [low[s:e] for s, e in zip(self.starts, self.ends, strict=True)]
        else:
            self.forms = [m.group().lower() for m in ms]
        if "n" in self.kinds:
            self.forms = [f.translate(_NUM_SEP) if k == "n" else f
                          for f, k in zip(self.forms, self.kinds, strict=True)]

    def is_function(self, i: int) -> bool:
        kind, f = self.kinds[i], self.forms[i]
        if kind == "w":
            if f in _FUNCTION_WORDS:
                return True
            return len(f) <= 2 and not self.text[self.starts[i]:self.ends[i]].isupper()  # EU, AI: names
        return f in _CJK_FUNCTION if kind == "c" else kind == "p"

    def scripts(self) -> dict[str, int]:
        """Letters per script (each word judged by its first letter)."""
        counts: dict[str, int] = {}
        for s, e, k in zip(self.starts, self.ends, self.kinds, strict=True):
            if k in ("w", "c") and self.text[s].isalpha():
                sc = _script(self.text[s])
                counts[sc] = counts.get(sc, 0) + e - s
        return counts


class ReferenceDetector(Detector):
    """Marks hypothesis tokens the reference does not support (rules: module docstring)."""

    name = "reference"
    needs_reference = True
    worst_score = -25.0  # MQM scores have no lower bound; WMT caps a segment at -25

    def __init__(
        self,
        *,
        fuzzy_prefix: int = 4,
        fuzzy_ratio: float = 0.5,
        min_words: int = 6,
        min_content_support: float = 0.1,
        min_word_support: float = 0.3,
        copy_ratio: float = 0.5,
        severity_map: str | Mapping[str, Any] | SeverityMap = "wmt-mqm",
        omission_weight: float = 0.0,
        mark_punctuation: bool = True,
    ) -> None:
        """Tuning knobs; the defaults are reasoned choices, not fitted to data.

        fuzzy_prefix, fuzzy_ratio: two words match fuzzily when their shared prefix has
            at least ``fuzzy_prefix`` characters and ``fuzzy_ratio`` of the longer word.
        min_words, min_content_support, min_word_support: a hypothesis of at least
            ``min_words`` words is critical when fewer than ``min_content_support`` of its
            content words and fewer than ``min_word_support`` of all its words match.
        copy_ratio: a hypothesis whose words are at least this share unmatched-but-in-the-
            source is an untranslated copy (critical).
        severity_map: weights of the score, a name from ``mtrl.detectors.spans.SEVERITY_MAPS`` or a
            mapping ``{minor, major, critical}``; default WMT MQM (1, 5, 25 per word).
        mark_punctuation: punctuation the reference does not have (one-to-one, exact) is a
            minor error. Without it a policy learns to pad with free punctuation ("------");
            False reproduces the precision-only rule measured on MQM (punctuation never marked).
        omission_weight: penalty per reference content word that no hypothesis word
            matches (exactly or fuzzily), subtracted from the sentence score (no span: an
            omission has no place in the hypothesis). A left-out function word costs
            ``omission_weight`` times minor/major of the severity map (1/5 for WMT MQM), as
            a wrong function word is minor where a wrong content word is major: without it
            a policy learns to drop articles and prepositions, which costs nothing. 0 by
            default: on the MQM dev slice left-over reference words mostly mean paraphrase.
            For RL it matters: a precision-only score is maximised by dropping words, so
            training recipes set it (with ``reward.mode: hybrid``) to make leaving content
            out cost as much as an error.
        """
        if fuzzy_prefix < 1:
            raise MtrlError(f"reference detector: fuzzy_prefix must be >= 1, got {fuzzy_prefix}")
        self.fuzzy_prefix = fuzzy_prefix
        self.fuzzy_ratio = fuzzy_ratio
        self.min_words = min_words
        self.min_content_support = min_content_support
        self.min_word_support = min_word_support
        self.copy_ratio = copy_ratio
        self.severity_map = get_severity_map(severity_map)
        self.omission_weight = float(omission_weight)
        self.mark_punctuation = mark_punctuation

    def detect(
        self,
        sources: Sequence[str],
        hypotheses: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> list[Detection]:
        if references is None:
            raise MtrlError("the reference detector needs references (none were given)")
        if not len(sources) == len(hypotheses) == len(references):
            raise MtrlError(
                f"reference detector: got {len(sources)} sources, {len(hypotheses)} hypotheses and "
                f"{len(references)} references; they must be as many"
            )
        out = []
        for i, (src, hyp, ref) in enumerate(zip(sources, hypotheses, references, strict=True)):
            if ref is None or not ref.strip():
                raise MtrlError(
                    f"the reference detector needs references (row {i + 1} of this batch has none)"
                )
            out.append(self.detect_one(src or "", hyp, ref))
        return out

    def detect_one(self, source: str, hypothesis: str, reference: str) -> Detection:
        """Spans and score of one hypothesis."""
        hyp, ref = _Tokens(hypothesis), _Tokens(reference)
        sev, omitted, omitted_function = self.token_severities(source, hyp, ref)
        values = self.severity_map.values
        if not any(k != "p" for k in hyp.kinds):  # no word: nothing to mark
            n_ref = sum(1 for k in ref.kinds if k != "p")
            return Detection([], values["critical"] * n_ref if n_ref else 0.0)
        if "critical" in sev:
            spans = [ErrorSpan(0, len(hypothesis), "critical")]
        else:
            spans = self._merge(hyp, sev)
        spans = sanitize_spans(hypothesis, spans)
        score = sum(values[s] for s, k in zip(sev, hyp.kinds, strict=True)
                    if s is not None and (k != "p" or s != "critical"))
        # a left-out function word costs what a wrong one does, relative to a content word (minor/major)
        function_weight = values["minor"] / values["major"] if values["major"] else 0.0
        omission = -self.omission_weight * (omitted + function_weight * omitted_function)
        return Detection(spans, float(score + omission), omission_penalty=float(omission),
                         extra={"omissions": omitted, "omitted_function_words": omitted_function})

    def token_severities(self, source: str, hyp: _Tokens, ref: _Tokens) -> tuple[list[str | None], int, int]:
        """Severity of each hypothesis token (None: supported; all 'critical' for a critical one), and
        the numbers of reference content words and function words left unmatched (omissions)."""
        sev: list[str | None] = [None] * len(hyp.forms)

        # 1. exact, order-free, one-to-one
        counts: dict[str, int] = {}
        for f in ref.forms:
            counts[f] = counts.get(f, 0) + 1
        avail = dict(counts)  # reference tokens left over, by form
        unmatched = []
        repeated = set()
        for i, f in enumerate(hyp.forms):
            c = avail.get(f, 0)
            if c:
                avail[f] = c - 1
            elif hyp.kinds[i] == "p":
                if self.mark_punctuation:
                    sev[i] = "minor"
            else:
                unmatched.append(i)
                if f in counts:
                    repeated.add(f)
        if repeated:  # the hypothesis repeats a form more often than the reference: keep the
            # occurrences nearest (in relative position) to the reference's ones matched
            n, m = len(hyp.forms), len(ref.forms)
            unmatched = [i for i in unmatched if hyp.forms[i] not in repeated]
            for f in repeated:
                rp = [j / m for j, g in enumerate(ref.forms) if g == f]
                hp = [i for i, g in enumerate(hyp.forms) if g == f]
                hp.sort(key=lambda i: min(abs(i / n - r) for r in rp))
                unmatched += hp[len(rp):]
            unmatched.sort()

        # 2. fuzzy, among left-over words sharing their first fuzzy_prefix characters
        k = self.fuzzy_prefix
        left: dict[str, list[str]] = {}
        for f, c in avail.items():
            if c > 0 and len(f) >= k and not f[0].isdigit():
                left.setdefault(f[:k], []).extend([f] * c)
        unsupported = []  # neither exact nor fuzzy match
        for i in unmatched:
            f = hyp.forms[i]
            cands = left.get(f[:k]) if hyp.kinds[i] == "w" and len(f) >= k else None
            best, best_len = -1, 0
            for j, g in enumerate(cands or ()):
                cp, shorter = k, min(len(f), len(g))
                while cp < shorter and f[cp] == g[cp]:
                    cp += 1
                if cp > best_len and cp >= self.fuzzy_ratio * max(len(f), len(g)):
                    best, best_len = j, cp
            if best >= 0:
                avail[cands.pop(best)] -= 1
                sev[i] = "minor"
            else:
                sev[i] = "minor" if hyp.is_function(i) else "major"
                unsupported.append(i)

        # 3. whole-hypothesis critical errors, looked for only when half its words are unsupported
        n_words = sum(1 for x in hyp.kinds if x != "p")
        if len(unsupported) >= 0.5 * n_words > 0 and self._critical(source, hyp, ref, unsupported, n_words):
            sev = ["critical"] * len(sev)

        # 4. omissions: reference words no hypothesis word matched, content and function words apart
        content = {f for j, f in enumerate(ref.forms) if ref.kinds[j] != "p" and not ref.is_function(j)}
        function = {f for j, f in enumerate(ref.forms) if ref.kinds[j] != "p" and ref.is_function(j)} - content
        omitted = sum(c for f, c in avail.items() if c > 0 and f in content)
        omitted_function = sum(c for f, c in avail.items() if c > 0 and f in function)
        return sev, omitted, omitted_function

    def _critical(
        self, source: str, hyp: _Tokens, ref: _Tokens, unsupported: list[int], n_words: int
    ) -> bool:
        """Wrong script, untranslated copy or mostly unsupported (module docstring)."""
        if n_words >= self.min_words:
            n_content = sum(1 for i, x in enumerate(hyp.kinds) if x != "p" and not hyp.is_function(i))
            c_unsupported = sum(1 for i in unsupported if not hyp.is_function(i))
            if (n_content and n_content - c_unsupported < self.min_content_support * n_content
                    and n_words - len(unsupported) < self.min_word_support * n_words):
                return True  # mostly unsupported
        hs, rs = hyp.scripts(), ref.scripts()
        n_ref = sum(rs.values())
        foreign = sum(n for sc, n in hs.items() if rs.get(sc, 0) < 0.1 * n_ref)
        if hs and n_ref and foreign > 0.5 * sum(hs.values()):
            return True  # wrong script
        if not source:
            return False
        src = set(_Tokens(source).forms)
        copied = sum(1 for i in unsupported if hyp.kinds[i] != "n" and hyp.forms[i] in src)
        return copied >= self.copy_ratio * n_words  # untranslated

    @staticmethod
    def _merge(toks: _Tokens, sev: list[str | None]) -> list[ErrorSpan]:
        """Neighbouring marked tokens (across spaces and punctuation) form one span, worst severity."""
        spans: list[ErrorSpan] = []
        start = end = -1
        worst: str | None = None
        for i, s in enumerate(sev):
            if s is None:
                if toks.kinds[i] == "p":
                    continue  # unmarked punctuation neither starts nor breaks a span
                if worst is not None:
                    spans.append(ErrorSpan(start, end, worst))
                    worst = None
            elif worst is None:
                start, end, worst = toks.starts[i], toks.ends[i], s
            else:
                end = toks.ends[i]
                if _RANK[s] > _RANK[worst]:
                    worst = s
        if worst is not None:
            spans.append(ErrorSpan(start, end, worst))
        return spans
