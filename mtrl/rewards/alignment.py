"""Token ids -> (detokenized hypothesis, per-token character intervals).

The detector scores a *string*; the policy is trained on *token ids*. This module
returns the exact string the detector must score together with, for every token
id, the characters of that string the token produced, so error spans (character
offsets) can be turned into token rewards (:mod:`mtrl.rewards`).

Decoding contract (the text the detector scores)::

    text = tokenizer.decode(token_ids[completion_start:], skip_special_tokens=True,
                            clean_up_tokenization_spaces=clean_up_tokenization_spaces)

``clean_up_tokenization_spaces`` defaults to ``False`` here (Hugging Face's default is
tokenizer-specific); pass the same value everywhere the hypothesis is decoded.

Interval contract (what :func:`reference_token_offsets` computes by brute force):
let ``P_t = decode(token_ids[completion_start:t+1])`` with the flags above.

* Token ``t`` is *settled* when ``P_t`` is a prefix of ``text``; its interval is
  ``[end of the previous settled token, len(P_t))``: exactly the characters it
  appended, leading space included (``"▁world"`` -> ``" world"``). Settled intervals
  partition ``text``.
* A token whose ``P_t`` is not a prefix (a partial UTF-8 sequence of a byte-level or
  byte-fallback tokenizer, or a piece that a later clean-up rewrites) is *pending*:
  it shares the interval of the next settled token. So an emoji split over three
  byte tokens gives all three the emoji's interval (a *shared* interval), and an
  error on the emoji reaches every token that produced it.
* Special tokens (pad/eos/bos..., the ids that ``skip_special_tokens`` drops) get the
  empty interval ``(p, p)`` at the current position ``p``; prompt tokens before
  ``completion_start`` get ``(0, 0)``. Tokens that decode to nothing (a leading
  ``"▁"`` whose space the decoder drops) also get an empty interval.

Intervals are therefore within ``[0, len(text)]`` and their union is all of
``text``. Over non-special tokens they are monotone (starts and ends never
decrease); so are all of them unless a special token interrupts the bytes of one
character (then its empty interval sits at the character's start).

Speed: the brute-force reference costs O(n^2) decoding. :func:`token_offsets`
instead looks up, per token id, the string it contributes in the middle of a
sequence and at the first position (learned once per id from two tiny decodes and
cached per tokenizer), and handles byte tokens with an incremental UTF-8 decoder.
The concatenation is checked against the real decode; on any mismatch (decoders
with context effects such as clean-up rewrites, ``BPEDecoder`` suffixes, invalid or
truncated UTF-8, a slow tokenizer) it falls back to the exact reference, so the
result always equals the reference. ``tokenizers.decoders.DecodeStream`` (tokenizers
0.22) is not used: it returns ``None`` both for pending tokens and for tokens that
produce nothing, costs a Python->Rust call per token, and is slower than the lookup
here (10-45 us per segment on the test tokenizers).
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections.abc import Sequence
from itertools import accumulate, pairwise
from typing import Any

Offsets = list[tuple[int, int]]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _as_list(ids: Any) -> list[int]:
    """Token ids from a list, tuple, NumPy array or torch tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids] if not isinstance(ids, list) else ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=False)}


_BYTE_LEVEL_DECODE = {c: b for b, c in _bytes_to_unicode().items()}


def _is_plain_fast(tokenizer: Any) -> bool:
    """True when ``tokenizer.decode`` is the backend's decode plus optional clean-up (no override)."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls._decode is PreTrainedTokenizerFast._decode
        and cls.decode is PreTrainedTokenizerBase.decode
    )


class _Tables:
    """Per-tokenizer caches: special ids and the string (or bytes) each id contributes."""

    def __init__(self, tokenizer: Any) -> None:
        be = tokenizer.backend_tokenizer
        self.backend = be
        self.size = be.get_vocab_size(with_added_tokens=True)  # rebuilt when tokens are added
        self.special = frozenset(i for i, t in be.get_added_tokens_decoder().items() if t.special)
        try:
            kinds = json.dumps(json.loads(be.decoder.__getstate__())) if be.decoder is not None else ""
        except Exception:  # an exotic decoder: no byte rules, strings still work
            kinds = ""
        self.byte_level = '"ByteLevel"' in kinds
        self.byte_fallback = '"ByteFallback"' in kinds
        # id -> str (or bytes for partial-UTF-8 tokens; None = unusable, use the reference)
        self.first: dict[int, str | bytes | None] = {}
        self.mid: dict[int, str | bytes | None] = {}
        self.byte_ids: set[int] = set()  # ids needing the byte walk: partial UTF-8, or unusable (None)
        self.ctx, self.ctx_str = self._pick_context()

    def _pick_context(self) -> tuple[int | None, str]:
        """A plain word token whose decode is stable; ``mid[i]`` = decode([ctx, i]) minus decode([ctx])."""
        be = self.backend
        for word in ("a", "e", "the", "x", "A", "1"):
            ids = be.encode(word, add_special_tokens=False).ids
            if len(ids) == 1 and ids[0] not in self.special and be.decode(ids) == word:
                return ids[0], word
        for i in range(min(be.get_vocab_size(), 5000)):
            s = be.decode([i])
            if i not in self.special and s.isascii() and s.isalnum():
                return i, s
        return None, ""

    def _token_bytes(self, i: int) -> bytes | None:
        tok = self.backend.id_to_token(i)
        if tok is None:
            return None
        if self.byte_fallback:
            m = _BYTE_TOKEN.match(tok)
            if m:
                return bytes.fromhex(m.group(1))
        if self.byte_level:
            try:
                return bytes(_BYTE_LEVEL_DECODE[c] for c in tok)
            except KeyError:
                return None
        return None

    def fill(self, ids: Sequence[int]) -> None:
        """Learn the pieces of the ids not seen yet (two batched decodes)."""
        missing = sorted({i for i in ids if i not in self.mid})
        if not missing:
            return
        be = self.backend
        if self.ctx is None:
            for i in missing:
                self.first[i] = self.mid[i] = None
                self.byte_ids.add(i)
            return
        firsts = be.decode_batch([[i] for i in missing], skip_special_tokens=True)
        pairs = be.decode_batch([[self.ctx, i] for i in missing], skip_special_tokens=True)
        n = len(self.ctx_str)
        for i, f, p in zip(missing, firsts, pairs, strict=False):
            m: str | bytes | None = p[n:] if p.startswith(self.ctx_str) else None
            first: str | bytes | None = f
            if "\ufffd" in f or (m is not None and "\ufffd" in m):
                b = self._token_bytes(i)
                lossy = None if b is None else b.decode("utf-8", "replace")
                first = m = b if (b is not None and lossy == f and lossy == m) else None
            if first is None or m is None:
                first = m = None
            if m is None or isinstance(m, bytes):
                self.byte_ids.add(i)
            self.first[i] = first
            self.mid[i] = m


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tables(tokenizer: Any) -> _Tables | None:
    """The cached tables of a plain fast tokenizer, or None (slow / customised decode)."""
    try:
        t = _TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return _Tables(tokenizer) if _is_plain_fast(tokenizer) else None
    if t is None or t.size != t.backend.get_vocab_size(with_added_tokens=True):
        if not _is_plain_fast(tokenizer):
            return None
        t = _TABLES[tokenizer] = _Tables(tokenizer)
    return t


def _pieces(tables: _Tables, comp: list[int]) -> list[str | bytes | None]:
    mid = tables.mid
    try:
        pieces = list(map(mid.__getitem__, comp))
    except KeyError:
        tables.fill(comp)
        pieces = list(map(mid.__getitem__, comp))
    special = tables.special
    for k, i in enumerate(comp):  # the first token the decoder sees drops its leading space etc.
        if i not in special:
            pieces[k] = tables.first[i]
            break
    return pieces


def _fast_offsets(tables: _Tables, comp: list[int], text: str) -> Offsets | None:
    """Intervals of the completion tokens from the cached pieces, or None when they disagree with ``text``."""
    pieces = _pieces(tables, comp)
    if tables.byte_ids.isdisjoint(comp):
        if "".join(pieces) != text:  # type: ignore[arg-type]
            return None
        return list(pairwise(accumulate(map(len, pieces), initial=0)))  # type: ignore[arg-type]
    if None in pieces or "\ufffd" in text:  # U+FFFD in the text: a partial prefix may already match it
        return None
    return _byte_walk(pieces, comp, tables.special, text)


def _byte_walk(pieces: list, comp: list[int], special: frozenset[int], text: str) -> Offsets | None:
    """Offsets when some tokens carry partial UTF-8: tokens of one character share its interval."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    out: Offsets = [(0, 0)] * len(comp)
    parts: list[str] = []
    pos = start = 0
    group: list[int] = []
    try:
        for k, p in enumerate(pieces):
            if comp[k] in special:
                out[k] = (start, start)
                continue
            s = dec.decode(p if isinstance(p, bytes) else p.encode("utf-8"))
            parts.append(s)
            pos += len(s)
            if dec.getstate()[0]:  # bytes of an unfinished character are buffered
                group.append(k)
                continue
            for g in group:
                out[g] = (start, pos)
            out[k] = (start, pos)
            start, group = pos, []
    except UnicodeDecodeError:  # invalid UTF-8: the decoder's lossy replacement rules apply
        return None
    if group or "".join(parts) != text:  # a truncated character, or a context-dependent decoder
        return None
    return out


def _decode_many(tokenizer: Any, seqs: list[list[int]], cleanup: bool, plain: bool) -> list[str]:
    """``tokenizer.decode`` of each sequence (without clean-up: a plain fast tokenizer's backend, batched).

    With clean-up it is always ``decode`` itself: whether it cleans up is the tokenizer's call
    (transformers skips it for BPE models, where it would strip spaces before punctuation).
    """
    if plain and not cleanup:
        return tokenizer.backend_tokenizer.decode_batch(seqs, skip_special_tokens=True)
    return [
        tokenizer.decode(s, skip_special_tokens=True, clean_up_tokenization_spaces=cleanup) for s in seqs
    ]


def _special_ids(tokenizer: Any, tables: _Tables | None) -> frozenset[int]:
    if tables is not None:
        return tables.special
    return frozenset(getattr(tokenizer, "all_special_ids", ()) or ())


def _exact_offsets(text: str, comp: list[int], prefixes: list[str], special: frozenset[int]) -> Offsets:
    """The interval contract evaluated literally from the decoded prefixes ``P_t``."""
    out: Offsets = [(0, 0)] * len(comp)
    pos = 0
    group: list[int] = []
    for k, (i, p) in enumerate(zip(comp, prefixes, strict=False)):
        if i in special:
            out[k] = (pos, pos)
        elif len(p) >= pos and text.startswith(p):
            for g in group:
                out[g] = (pos, len(p))
            out[k] = (pos, len(p))
            pos, group = len(p), []
        else:
            group.append(k)
    for g in group:  # only with decoders whose prefixes are not prefixes of the whole
        out[g] = (pos, len(text))
    return out


def reference_token_offsets(
    tokenizer: Any,
    token_ids: Any,
    completion_start: int = 0,
    clean_up_tokenization_spaces: bool = False,
) -> tuple[str, Offsets]:
    """Brute-force incremental decoding (O(n^2)): the definition :func:`token_offsets` must match."""
    ids = _as_list(token_ids)
    cs = max(0, min(int(completion_start), len(ids)))
    tables = _tables(tokenizer)
    comp = ids[cs:]
    plain = tables is not None
    text = _decode_many(tokenizer, [comp], clean_up_tokenization_spaces, plain)[0]
    prefixes = _decode_many(tokenizer, [comp[: k + 1] for k in range(len(comp))], clean_up_tokenization_spaces, plain)
    off = _exact_offsets(text, comp, prefixes, _special_ids(tokenizer, tables))
    return text, [(0, 0)] * cs + off


def _offsets_one(
    tokenizer: Any, tables: _Tables | None, ids: list[int], cs: int, text: str, raw: str | None, cleanup: bool
) -> Offsets:
    comp = ids[cs:]
    off = None
    if tables is not None and raw == text:
        off = _fast_offsets(tables, comp, text)
    if off is None:
        prefixes = _decode_many(tokenizer, [comp[: k + 1] for k in range(len(comp))], cleanup, tables is not None)
        off = _exact_offsets(text, comp, prefixes, _special_ids(tokenizer, tables))
    return [(0, 0)] * cs + off if cs else off


def token_offsets(
    tokenizer: Any,
    token_ids: Any,
    completion_start: int = 0,
    clean_up_tokenization_spaces: bool = False,
) -> tuple[str, Offsets]:
    """The hypothesis text and one ``(start, end)`` character interval per token id.

    ``text`` is ``tokenizer.decode(token_ids[completion_start:], skip_special_tokens=True,
    clean_up_tokenization_spaces=clean_up_tokenization_spaces)``: score exactly this
    string with the detector. ``len(offsets) == len(token_ids)``; see the module
    docstring for the interval contract (prompt and special tokens: empty intervals;
    partial-UTF-8 tokens: the shared interval of their character).
    """
    texts, offsets = batch_token_offsets(tokenizer, [token_ids], [completion_start], clean_up_tokenization_spaces)
    return texts[0], offsets[0]


def batch_token_offsets(
    tokenizer: Any,
    batch_ids: Sequence[Any],
    completion_starts: Sequence[int] | None = None,
    clean_up_tokenization_spaces: bool = False,
) -> tuple[list[str], list[Offsets]]:
    """:func:`token_offsets` for a batch (texts decoded in one backend call)."""
    seqs = [_as_list(x) for x in batch_ids]
    starts = [0] * len(seqs) if completion_starts is None else [int(c) for c in completion_starts]
    if len(starts) != len(seqs):
        raise ValueError(f"{len(seqs)} sequences but {len(starts)} completion_starts")
    starts = [max(0, min(c, len(s))) for c, s in zip(starts, seqs, strict=False)]
    tables = _tables(tokenizer)
    comps = [s[c:] for s, c in zip(seqs, starts, strict=False)]
    if tables is not None:
        raws = tables.backend.decode_batch(comps, skip_special_tokens=True)
        texts = _decode_many(tokenizer, comps, True, True) if clean_up_tokenization_spaces else raws
    else:
        raws = [None] * len(seqs)
        texts = _decode_many(tokenizer, comps, clean_up_tokenization_spaces, False)
    offsets = [
        _offsets_one(tokenizer, tables, s, c, t, r, clean_up_tokenization_spaces)
        for s, c, t, r in zip(seqs, starts, texts, raws, strict=False)
    ]
    return texts, offsets


def uses_fast_path(
    tokenizer: Any,
    token_ids: Any,
    completion_start: int = 0,
    clean_up_tokenization_spaces: bool = False,
) -> bool:
    """True when :func:`token_offsets` gets these offsets from the cached per-id pieces.

    False when it falls back to the brute-force reference (O(n^2) decoding): a slow or
    customised tokenizer, a clean-up that rewrites the text, or pieces that disagree with the
    real decode (see the module docstring). The result is the same either way; this only says
    which way it is computed, e.g. to report how often the fast path applies.
    """
    ids = _as_list(token_ids)
    cs = max(0, min(int(completion_start), len(ids)))
    tables = _tables(tokenizer)
    if tables is None:
        return False
    comp = ids[cs:]
    raw = tables.backend.decode_batch([comp], skip_special_tokens=True)[0]
    text = _decode_many(tokenizer, [comp], True, True)[0] if clean_up_tokenization_spaces else raw
    return raw == text and _fast_offsets(tables, comp, text) is not None
