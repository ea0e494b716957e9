"""Guards: cheap checks that catch the outputs a reference-free reward is known to overrate.

A quality-estimation reward (xCOMET or COMET-Kiwi without references) can be gamed by output that
is empty, far too short or long, a copy of the source, in the wrong language, or a repeated loop
(RAFT+, arXiv 2401.12873; WALAR, arXiv 2603.13045). Each guard looks only at the source and the
hypothesis, so it holds whatever the detector is. The rewarder applies them (training, ``mtrl score``
and ``mtrl label`` agree): a tripped guard adds a critical span over what it covers, or the critical
penalty on the final token when it covers nothing (empty, too short), and floors the sentence score.

* ``language``: the probability of the target language under py3langid < ``min_language_prob``.
  py3langid (a maintained fork of langid.py, BSD) ships its model in the wheel (4.6 MB, 140 language
  classes; the names below cover its 114 ISO 639-1 codes) and needs only numpy, so it can run on every
  rollout. lingua-language-detector is more accurate on very short text but its wheel is 96 MB, it held
  1.4 GB with all languages loaded and was about 30 times slower (``eval/results/guards.md``). Close variants count as the target (Chinese with
  Wu and Cantonese, Norwegian with Nynorsk, Arabic with its dialects).
* ``length``: hypothesis / source length outside [``min_length_ratio``, ``max_length_ratio``], in
  characters without whitespace, a wide (CJK) character counted as 3, so that the same bounds hold in
  both directions between Chinese and English. A too-long hypothesis has the span over its excess.
* ``copy``: the share of the hypothesis' character 4-grams (lower-cased) found in the source
  >= ``max_copy``.
* ``empty``: nothing but whitespace (it trips alone: the other guards are not asked).
* ``loop``: a unit of 1..``loop_max_ngram`` words repeated ``loop_repeats`` times in a row (a CJK
  character is a word), unless the source repeats too ("blah blah blah"); the span covers the repeats
  after the first.

``language`` is not asked of a hypothesis with fewer than ``LANGUAGE_MIN_LETTERS`` letters ("Postponed",
"SF Express": language ID cannot tell), ``copy`` not of one with fewer than ``COPY_MIN_LETTERS`` (a short
name is rightly copied). The default bounds were
chosen on the development data (``eval/results/guards.md``), not the test sets.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Literal, get_args

from mtrl.errors import MtrlError
from mtrl.schema import Range

GuardName = Literal["language", "length", "copy", "empty", "loop"]
GUARD_NAMES: tuple[str, ...] = get_args(GuardName)
LANGUAGE_MIN_LETTERS = 10
COPY_MIN_LETTERS = 5
WIDE_WEIGHT = 3  # a CJK character is worth about three Latin-script characters of content

# ISO 639-1 code -> English name, for the languages py3langid knows (names as ISO 639 gives them)
_NAMES = (
    "af:Afrikaans am:Amharic an:Aragonese ar:Arabic as:Assamese az:Azerbaijani ba:Bashkir be:Belarusian "
    "bg:Bulgarian bn:Bengali br:Breton bs:Bosnian ca:Catalan cs:Czech cy:Welsh da:Danish de:German dz:Dzongkha "
    "el:Greek en:English eo:Esperanto es:Spanish et:Estonian eu:Basque fa:Persian fi:Finnish fo:Faroese "
    "fr:French fy:Frisian ga:Irish gd:Gaelic gl:Galician gu:Gujarati ha:Hausa he:Hebrew hi:Hindi hr:Croatian "
    "ht:Haitian hu:Hungarian hy:Armenian id:Indonesian ig:Igbo is:Icelandic it:Italian ja:Japanese jv:Javanese "
    "ka:Georgian kk:Kazakh km:Khmer kn:Kannada ko:Korean ku:Kurdish ky:Kyrgyz la:Latin lb:Luxembourgish "
    "lg:Ganda ln:Lingala lo:Lao lt:Lithuanian lv:Latvian mg:Malagasy mk:Macedonian ml:Malayalam mn:Mongolian "
    "mr:Marathi ms:Malay mt:Maltese my:Burmese ne:Nepali nl:Dutch nn:Nynorsk no:Norwegian oc:Occitan om:Oromo "
    "or:Oriya pa:Punjabi pl:Polish ps:Pashto pt:Portuguese qu:Quechua ro:Romanian ru:Russian rw:Kinyarwanda "
    "sa:Sanskrit se:Sami si:Sinhala sk:Slovak sl:Slovenian sn:Shona so:Somali sq:Albanian sr:Serbian "
    "st:Sotho sv:Swedish sw:Swahili ta:Tamil te:Telugu tg:Tajik th:Thai tk:Turkmen tl:Tagalog tr:Turkish "
    "tt:Tatar ug:Uyghur uk:Ukrainian ur:Urdu uz:Uzbek vi:Vietnamese vo:Volapuk wa:Walloon xh:Xhosa yo:Yoruba "
    "zh:Chinese zu:Zulu"
)
LANGUAGES: dict[str, str] = dict(x.split(":", 1) for x in _NAMES.split())
_ALIASES = {"filipino": "tl", "farsi": "fa", "kirghiz": "ky", "pushto": "ps", "panjabi": "pa", "uighur": "ug",
            "norwegian bokmal": "no", "bokmal": "no", "flemish": "nl", "castilian": "es", "moldavian": "ro",
            "mandarin": "zh", "modern greek": "el", "scottish gaelic": "gd", "western frisian": "fy"}
# py3langid classes that count as the target language
_VARIANTS = {"zh": ("zh", "wuu", "yue"), "no": ("no", "nn"), "nn": ("nn", "no"), "ar": ("ar", "ary", "arz"),
             "uz": ("uz", "uzs"), "ku": ("ku", "sdh")}


def language_code(name: str, where: str = "the target language") -> str:
    """The ISO 639-1 code of a language name ("German", "Chinese (Simplified)") or code ("de", "pt-BR")."""
    key = re.sub(r"\s*\(.*\)\s*$", "", name.strip()).lower()
    key = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
    by_name = {v.lower(): k for k, v in LANGUAGES.items()} | _ALIASES
    code = key.split("-")[0].split("_")[0] if len(key.split("-")[0].split("_")[0]) == 2 else None
    if code in LANGUAGES:
        return code
    if key in by_name:
        return by_name[key]
    raise MtrlError(f"{where} {name!r} is not a language the language guard knows; give an ISO 639-1 code "
                    f"or an English name of one of its {len(LANGUAGES)} languages (e.g. 'de' or 'German'), "
                    "or leave 'language' out of reward.guards.checks")


@dataclass
class GuardConfig:
    """``reward.guards``: which guards run and their bounds.

    ``enabled``: whether tripped guards change the rewards; None (default): when the detector scores without
    references. Their trip rates are logged either way. ``language``: the target language (a name or an
    ISO 639-1 code); None: the recipe's ``data.tgt_lang`` (``--tgt-lang`` for ``mtrl score``/``label``).
    ``floor``: the sentence score of a tripped hypothesis; None: the detector's worst score.
    """

    enabled: bool | None = None
    checks: list[GuardName] = field(default_factory=lambda: list(GUARD_NAMES))
    language: str | None = None
    min_language_prob: Annotated[float, Range(ge=0, le=1)] = 0.02
    min_length_ratio: Annotated[float, Range(ge=0)] = 0.33
    max_length_ratio: Annotated[float, Range(gt=0)] = 3.0
    max_copy: Annotated[float, Range(gt=0, le=1)] = 0.8
    loop_repeats: Annotated[int, Range(ge=2)] = 3
    loop_max_ngram: Annotated[int, Range(ge=1)] = 6
    floor: Annotated[float, Range()] | None = None


@dataclass(frozen=True)
class Trip:
    """A tripped guard and the characters of the hypothesis it covers (``start == end``: none)."""

    guard: str
    start: int
    end: int


@cache
def _identifier():
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise MtrlError("the language guard needs py3langid, a dependency of mtrl: pip install py3langid "
                        "(or reinstall mtrl)") from None

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_probability(text: str, code: str) -> float:
    """The probability py3langid gives the language ``code`` (with its variants) for ``text``."""
    probs: dict[str, float] = {}
    for lang, p in _identifier().rank(text):
        probs[lang] = probs.get(lang, 0.0) + float(p)
    return sum(probs.get(c, 0.0) for c in _VARIANTS.get(code, (code,)))


def _wide(c: str) -> bool:
    return unicodedata.east_asian_width(c) in "WF"


def weighted_length(text: str) -> int:
    """Characters without whitespace, a wide (CJK) character counted as ``WIDE_WEIGHT``."""
    return sum(WIDE_WEIGHT if _wide(c) else 1 for c in text if not c.isspace())


def length_ratio(source: str, hypothesis: str) -> float:
    """Hypothesis length / source length (:func:`weighted_length`); 0 for an empty source."""
    n = weighted_length(source)
    return weighted_length(hypothesis) / n if n else 0.0


def _grams(text: str, n: int = 4) -> list[str]:
    text = " ".join(text.lower().split())
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def copy_share(source: str, hypothesis: str) -> float:
    """The share of the hypothesis' character 4-grams that occur in the source (1.0 for an exact copy)."""
    if hypothesis.strip() and " ".join(hypothesis.split()) == " ".join(source.split()):
        return 1.0
    grams = _grams(hypothesis)
    if not grams:
        return 0.0
    seen = set(_grams(source))
    return sum(g in seen for g in grams) / len(grams)


_WORD = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\u3040-\u30ff]|[^\W\u2e80-\u9fff\uac00-\ud7af"
                   r"\uf900-\ufaff\u3040-\u30ff]+|[^\w\s]")


def find_loop(text: str, repeats: int, max_ngram: int) -> tuple[int, int] | None:
    """Characters ``[start, end)`` of the first unit of 1..``max_ngram`` words repeated ``repeats`` times in
    a row, from its second occurrence to the end of the run; None when there is none. Units of punctuation
    only do not count."""
    words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]
    toks = [w for w, _, _ in words]
    for i in range(len(toks)):
        for n in range(1, max_ngram + 1):
            unit = toks[i:i + n]
            if len(unit) < n or not any(any(ch.isalnum() for ch in w) for w in unit):
                continue
            k = 1
            while toks[i + k * n:i + (k + 1) * n] == unit:
                k += 1
            if k >= repeats:
                return words[i + n][1], words[i + k * n - 1][2]
    return None


class Guards:
    """The configured checks for one target language (``language`` None: no language check)."""

    def __init__(self, cfg: GuardConfig, language: str | None):
        if cfg.min_length_ratio >= cfg.max_length_ratio:
            raise MtrlError(f"reward.guards.min_length_ratio ({cfg.min_length_ratio:g}) must be below "
                            f"max_length_ratio ({cfg.max_length_ratio:g})")
        self.cfg = cfg
        self.checks = [c for c in cfg.checks if c != "language" or language is not None]
        self.language = language

    def check(self, source: str, hypothesis: str) -> list[Trip]:
        """The guards ``hypothesis`` trips, with what each covers."""
        cfg, on, trips = self.cfg, set(self.checks), []
        if not hypothesis.strip():
            return [Trip("empty", 0, 0)] if "empty" in on else []
        letters = sum(c.isalpha() for c in hypothesis)
        if "language" in on and letters >= LANGUAGE_MIN_LETTERS \
                and language_probability(hypothesis, self.language) < cfg.min_language_prob:
            trips.append(Trip("language", 0, len(hypothesis)))
        if "copy" in on and letters >= COPY_MIN_LETTERS and copy_share(source, hypothesis) >= cfg.max_copy:
            trips.append(Trip("copy", 0, len(hypothesis)))
        if "length" in on and source.strip():
            budget = cfg.max_length_ratio * weighted_length(source)
            ratio = length_ratio(source, hypothesis)
            if ratio < cfg.min_length_ratio:
                trips.append(Trip("length", len(hypothesis), len(hypothesis)))
            elif ratio > cfg.max_length_ratio:
                trips.append(Trip("length", _char_at_length(hypothesis, budget), len(hypothesis)))
        if "loop" in on:
            loop = find_loop(hypothesis, cfg.loop_repeats, cfg.loop_max_ngram)
            if loop is not None and find_loop(source, cfg.loop_repeats, cfg.loop_max_ngram) is None:
                trips.append(Trip("loop", *loop))
        return trips

    def check_batch(self, sources: Sequence[str], hypotheses: Sequence[str]) -> list[list[Trip]]:
        return [self.check(s, h) for s, h in zip(sources, hypotheses)]


def _char_at_length(text: str, budget: float) -> int:
    """The index of the first character past ``budget`` of :func:`weighted_length`."""
    total = 0
    for i, c in enumerate(text):
        if not c.isspace():
            total += WIDE_WEIGHT if _wide(c) else 1
            if total > budget:
                return i
    return len(text)


def guard_metrics(guards: Guards, sources: Sequence[str], hypotheses: Sequence[str],
                  tripped: Sequence[Sequence[str]]) -> dict[str, float]:
    """A step's guard figures: each check's trip rate (``guard_<name>``), the mean length ratio to the source
    (``length_ratio_mean``) and, with a language check, the share in the target language
    (``target_language_share``)."""
    n = max(len(tripped), 1)
    out = {f"guard_{c}": sum(c in row for row in tripped) / n for c in guards.checks}
    out["length_ratio_mean"] = sum(length_ratio(s, h) for s, h in zip(sources, hypotheses)) / n
    if "language" in guards.checks:
        out["target_language_share"] = 1.0 - out["guard_language"]
    return out
