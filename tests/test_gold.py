"""The gold detector: human MQM spans from our JSONL and Google's MQM TSV."""

from pathlib import Path

import pytest

from mtrl.detectors import load_detector
from mtrl.errors import MtrlError
from mtrl.translations import read_mqm_tsv

TSV = (
    "system\tdoc\tdoc_id\tseg_id\trater\tsource\ttarget\tcategory\tseverity\tcomment\n"
    "sysA\ttalk.1\t1\t1\trater1\tThe Sun burns.\tDie <v>Sonne</v> brennt.\tAccuracy/Mistranslation\tMajor\t\n"
    "sysA\ttalk.1\t1\t1\trater1\tThe Sun burns.\tDie Sonne brennt<v>.</v>\tFluency/Punctuation\tMinor\t\n"
    "sysA\ttalk.1\t1\t1\trater2\tThe Sun burns.\t<v>Die</v> Sonne brennt.\tStyle/Awkward\tMinor\t\n"
    "sysB\ttalk.1\t1\t1\trater1\tThe Sun burns.\tDie Sonne verbrennt.\tNo-error\tNo-error\t\n"
    "sysC\ttalk.1\t1\t1\trater1\t<v>The</v> Sun burns.\tSonne brennt.\tAccuracy/Omission\tMajor\t\n"
    "sysC\ttalk.1\t1\t1\trater1\tThe Sun burns.\tSonne brennt.\tStyle/Awkward\tNeutral\t\n"
    "ref\ttalk.1\t1\t1\trater1\tThe Sun burns.\tDie Sonne brennt.\tNo-error\tNo-error\t\n"
)


def test_read_mqm_tsv(tmp_path: Path):
    path = tmp_path / "mqm.tsv"
    path.write_text(TSV)
    rows = {r["system"]: r for r in read_mqm_tsv(path)}
    a = rows["sysA"]
    assert a["hypothesis"] == "Die Sonne brennt." and a["reference"] == "Die Sonne brennt."
    assert [(s["start"], s["end"], s["severity"]) for s in a["error_spans"]] == [(4, 9, "major"), (16, 17, "minor")]
    assert all(a["hypothesis"][s["start"]:s["end"]] == s["text"] for s in a["error_spans"])
    assert rows["sysB"]["error_spans"] == []  # no error
    assert rows["sysC"]["error_spans"] == []  # a source error and a neutral one leave no hypothesis span


def test_gold_detector_scores_wmt_mqm(tmp_path: Path):
    path = tmp_path / "mqm.tsv"
    path.write_text(TSV)
    det = load_detector("gold", path=path)
    (d,) = det.detect(["The Sun burns."], ["Die Sonne brennt."])
    # the first annotated row with this pair wins: sysA has major (5) + minor punctuation (0.1)
    assert d.score == pytest.approx(-5.1)
    with pytest.raises(MtrlError, match="no annotation for row 1"):
        det.detect(["x"], ["not annotated"])


def test_gold_span_outside_hypothesis_names_the_row():
    rows = [{"src": "a", "mt": "short", "error_spans": []},
            {"src": "b", "mt": "tiny", "error_spans": [{"start": 2, "end": 9, "severity": "minor"}]}]
    with pytest.raises(MtrlError, match="row 2: span \\[2, 9\\) lies outside"):
        load_detector("gold", rows=rows)


def test_unknown_severity_in_tsv(tmp_path: Path):
    path = tmp_path / "bad.tsv"
    path.write_text(TSV.splitlines()[0] + "\nsysA\td\t1\t1\tr\ts\t<v>t</v>\tX\tSevere\t\n")
    with pytest.raises(MtrlError, match="unknown severity 'Severe'"):
        read_mqm_tsv(path)
