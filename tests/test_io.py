"""Append-only logs after a crash: read up to the cut, name bad lines, and get ready for the next append."""

import pytest

from mtrl.errors import MtrlError, one_line
from mtrl.io import numbered_log, read_lines, read_log


def test_half_written_last_line_is_dropped_and_repaired(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert numbered_log(log) == [(1, {"step": 1}), (3, {"step": 2})]  # numbers name the file's lines
    assert "line 4 is incomplete" in capsys.readouterr().err
    assert log.read_text().endswith('"lo')  # reading alone changes nothing
    read_log(log, repair=True)
    with open(log, "a") as f:
        f.write('{"step": 3}\n')
    assert [r["step"] for r in read_log(log)] == [1, 2, 3]


def test_complete_last_line_without_newline_is_kept_and_ended(tmp_path):
    log = tmp_path / "a.jsonl"
    log.write_text('{"a": 1}\n{"a": 2}')
    assert read_log(log, repair=True) == [{"a": 1}, {"a": 2}]
    assert log.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
    log = tmp_path / "a.jsonl"
    log.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(MtrlError, match="line 2 is not valid JSON"):
        read_log(log)


def test_bom_is_not_part_of_the_first_segment(tmp_path):
    path = tmp_path / "hyp.txt"
    path.write_bytes(b"\xef\xbb\xbfEin Mann.\nZwei Hunde.\n")
    assert read_lines(path) == ["Ein Mann.", "Zwei Hunde."]


def test_one_line_keeps_the_first_sentence_whole():
    assert one_line(OSError("Can't load x. Make sure the path is right.\nMore.")) == "Can't load x."
    assert one_line(ValueError("")) == "ValueError"
    long = one_line("word " * 60 + "end.")
    assert long.endswith("word…") and len(long) <= 201
