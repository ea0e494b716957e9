"""Token -> character intervals for every tokenizer family, checked against brute-force decoding."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from mtrl.rewards.alignment import (
    _fast_offsets,
    _tables,
    batch_token_offsets,
    reference_token_offsets,
    token_offsets,
)
from tests.fixtures.tokenizers import FAMILIES, get_tokenizer, unicode_texts

# MTRL_PROPERTY_EXAMPLES=1000 for a longer search (the default keeps the suite short)
PROPS = settings(max_examples=int(os.environ.get("MTRL_PROPERTY_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = unicode_texts()


@pytest.fixture(scope="session", params=FAMILIES)
def tok(request) -> PreTrainedTokenizerFast:
    return get_tokenizer(request.param)


def _check_contract(tokenizer, ids: list[int], text: str, offsets, completion_start: int = 0) -> None:
    special = skipped_ids(tokenizer)
    assert len(offsets) == len(ids)
    prev_s = prev_e = 0
    for t, (s, e) in enumerate(offsets):
        assert 0 <= s <= e <= len(text)
        if t < completion_start:
            assert (s, e) == (0, 0)
        if ids[t] in special:  # may sit inside a character split around it, so not checked for order
            assert s == e
            continue
        assert s >= prev_s and e >= prev_e, f"not monotone at {t}: {offsets}"
        prev_s, prev_e = s, e
    covered = set()
    for t, (s, e) in enumerate(offsets):
        if t >= completion_start and ids[t] not in special:
            covered.update(range(s, e))
    missing = [i for i, c in enumerate(text) if not c.isspace() and i not in covered]
    assert not missing, f"characters {missing} of {text!r} in no token"


def skipped_ids(tokenizer) -> set[int]:
    """The ids ``skip_special_tokens`` drops: the named specials and every added token marked special."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _independent_reference(tokenizer, ids: list[int], cleanup: bool = False):
    """The interval contract written out with ``tokenizer.decode`` only (no mtrl code)."""
    def dec(x):
        return tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=cleanup)

    text, special = dec(ids), skipped_ids(tokenizer)
    out, pos, pending = [], 0, []
    for t, i in enumerate(ids):
        if i in special:
            out.append((pos, pos))
            continue
        p = dec(ids[: t + 1])
        out.append(None)
        if len(p) >= pos and text.startswith(p):
            for k in [*pending, t]:
                out[k] = (pos, len(p))
            pos, pending = len(p), []
        else:
            pending.append(t)
    for k in pending:
        out[k] = (pos, len(text))
    return text, out


# --- properties -------------------------------------------------------------


@PROPS
@given(text=texts)
def test_canonical_encodings_match_reference(tok, text: str) -> None:
    ids = tok(text)["input_ids"]
    got = token_offsets(tok, ids)
    assert got == reference_token_offsets(tok, ids) == _independent_reference(tok, ids)
    assert got[0] == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    _check_contract(tok, ids, *got)


@PROPS
@given(data=st.data())
def test_arbitrary_id_sequences_match_reference(tok, data) -> None:
    """Sampled (non-canonical) sequences: byte tokens out of order, specials, invalid UTF-8."""
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=25))
    got = token_offsets(tok, ids)
    assert got == reference_token_offsets(tok, ids) == _independent_reference(tok, ids)
    _check_contract(tok, ids, *got)


@PROPS
@given(prompt=texts, completion=texts)
def test_completion_start_masks_the_prompt(tok, prompt: str, completion: str) -> None:
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion)["input_ids"]  # with the family's specials (EOS / BOS / CLS-SEP)
    text, offsets = token_offsets(tok, p_ids + c_ids, completion_start=len(p_ids))
    assert offsets[: len(p_ids)] == [(0, 0)] * len(p_ids)
    assert (text, offsets[len(p_ids):]) == token_offsets(tok, c_ids)
    assert (text, offsets) == reference_token_offsets(tok, p_ids + c_ids, len(p_ids))


@PROPS
@given(text=texts)
def test_cleanup_flag_matches_reference(tok, text: str) -> None:
    _check_cleanup(tok, text)


@pytest.mark.parametrize("text", ["Hello , world . It 's fine", "Ein Mann , der ' s nicht ist ."])
def test_cleanup_of_spaces_before_punctuation(tok, text: str) -> None:
    """Text that clean-up rewrites: still exactly what ``decode`` gives (BPE models: not cleaned up)."""
    _check_cleanup(tok, text)


def _check_cleanup(tok, text: str) -> None:
    ids = tok(text)["input_ids"]
    got = token_offsets(tok, ids, clean_up_tokenization_spaces=True)
    assert got[0] == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert got == reference_token_offsets(tok, ids, clean_up_tokenization_spaces=True)
    assert got == _independent_reference(tok, ids, cleanup=True)
    _check_contract(tok, ids, *got)


# --- the fast path is really used -------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_handles_ordinary_text(family: str) -> None:
    tok = get_tokenizer(family)
    lines = [
        "Two young guys with shaggy hair look at their hands while hanging out in the yard.",
        "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
        "Emoji 😀 and 你好 and e\u0301 and  two spaces ",
    ]
    tables = _tables(tok)
    for line in lines:
        ids = tok(line)["input_ids"]
        text = tok.decode(ids, skip_special_tokens=True)
        assert _fast_offsets(tables, ids, text) == reference_token_offsets(tok, ids)[1]


# --- family-specific edge cases ---------------------------------------------


def test_bytelevel_emoji_tokens_share_the_character() -> None:
    tok = get_tokenizer("bytelevel")
    ids = tok("a 🦜")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    text, off = token_offsets(tok, ids)
    assert text == "a 🦜"
    assert len(ids) > 3  # the parrot is not in the tiny vocab: split into byte tokens
    emoji = [o for o, p in zip(off, pieces, strict=True) if "Ġ" not in p and p != "a"]
    assert all(o == emoji[-1] for o in emoji) and text[slice(*emoji[-1])].endswith("🦜")


def test_bytefallback_tokens_share_the_character() -> None:
    tok = get_tokenizer("bytefallback")
    ids = tok("x 龍")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<s>" and sum(p.startswith("<0x") for p in pieces) == 3
    text, off = token_offsets(tok, ids)
    assert text == "x 龍" and off[0] == (0, 0)
    byte_off = {o for o, p in zip(off, pieces, strict=True) if p.startswith("<0x")}
    assert len(byte_off) == 1 and text[slice(*byte_off.pop())].strip() == "龍"


def test_metaspace_first_token_drops_its_space() -> None:
    tok = get_tokenizer("unigram")
    ids = tok("Die Sonne")["input_ids"]
    text, off = token_offsets(tok, ids)
    assert text == "Die Sonne" and off[0][0] == 0 and off[-1] == (len(text), len(text))  # </s>
    sonne = [o for o, p in zip(off, tok.convert_ids_to_tokens(ids), strict=True) if p.startswith("▁S")]
    assert text[sonne[0][0]] == " "  # later word starts own their space
    lone = tok.convert_tokens_to_ids(["▁", "▁Die"]) if "▁Die" in tok.get_vocab() else None
    if lone:
        assert token_offsets(tok, lone) == (" Die", [(0, 0), (0, 4)])


def test_wordpiece_continuations_and_added_spaces() -> None:
    tok = get_tokenizer("wordpiece")
    ids = tok("Mädchen spielen.")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    text, off = token_offsets(tok, ids)
    assert off[0] == (0, 0) and off[-1] == (len(text), len(text))  # [CLS], [SEP]
    for (s, e), p in zip(off, pieces, strict=True):
        if p.startswith("##"):
            assert text[s:e] == p[2:]
    assert "".join(text[s:e] for s, e in off) == text


def test_combining_marks_stay_with_a_token() -> None:
    for family in FAMILIES:
        tok = get_tokenizer(family)
        ids = tok("Zoe\u0308 o\u0302\u0323")["input_ids"]
        text, off = token_offsets(tok, ids)
        assert (text, off) == reference_token_offsets(tok, ids)
        _check_contract(tok, ids, text, off)


def test_truncated_and_invalid_utf8_fall_back_exactly() -> None:
    tok = get_tokenizer("bytelevel")
    full = tok("ok 🦜", add_special_tokens=False)["input_ids"]
    for ids in (full[:-1], full[:-1] + full[-3:], full[-1:] + full[:3]):
        got = token_offsets(tok, ids)
        assert got == reference_token_offsets(tok, ids)
        _check_contract(tok, ids, *got)


def test_replacement_character_in_the_text() -> None:
    """U+FFFD typed in the text: partial prefixes already match it, so the literal rule is used."""
    for family in FAMILIES:
        tok = get_tokenizer(family)
        ids = tok("a\ufffd b")["input_ids"]
        got = token_offsets(tok, ids)
        assert got == reference_token_offsets(tok, ids)
        _check_contract(tok, ids, *got)


def test_empty_and_all_special() -> None:
    tok = get_tokenizer("unigram")
    assert token_offsets(tok, []) == ("", [])
    eos = tok.eos_token_id
    assert token_offsets(tok, [eos, eos]) == ("", [(0, 0), (0, 0)])
    assert token_offsets(tok, [5, 6], completion_start=2) == ("", [(0, 0), (0, 0)])


def test_customised_decode_uses_the_generic_path() -> None:
    """A tokenizer class overriding ``_decode`` (like some model-specific ones) is decoded through it."""
    base = get_tokenizer("unigram")

    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kw):
            return super()._decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces, **kw).upper()

    tok = Shouting(tokenizer_object=base.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    ids = tok("Die Sonne, ß")["input_ids"]
    text, off = token_offsets(tok, ids)
    assert text == "DIE SONNE, SS"
    assert (text, off) == reference_token_offsets(tok, ids)
    _check_contract(tok, ids, text, off)


# --- batch helper -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_agrees_with_single(family: str) -> None:
    tok = get_tokenizer(family)
    sents = ["A dog 🦜 runs.", "", "Ein Mädchen  spielt 你好."]
    rows = [tok(s)["input_ids"] for s in sents]
    single = [token_offsets(tok, r) for r in rows]
    texts, offs = batch_token_offsets(tok, rows)
    assert list(zip(texts, offs, strict=True)) == single
