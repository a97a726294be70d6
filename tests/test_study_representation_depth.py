"""pkt.studies.representation_depth (`pkt study representation-depth`): similarity by band of student layers, counted by
hand on a made-up matrix and checked against the analysis stage's own summary of the committed CPU-study record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkt.studies.representation_depth import depth_bands, main

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs/results/cpu-study/stages/analysis.json"


def test_bands_by_hand():
    m = [[0.9, 0.1, 0.2],   # student layer 0: triangle holds all three, best 0.9
         [0.8, 0.7, 0.3],   # layer 1: triangle 0.7, 0.3 (not the 0.8 of teacher layer 0); best 0.8
         [0.1, 0.2, 0.6],   # layer 2: triangle 0.6
         [0.0, 0.5, 0.4]]   # layer 3: nothing at teacher >= 3 in its row; best 0.5
    lo, hi = depth_bands(m, 2)
    assert lo["layers"] == "0–1" and hi["layers"] == "2–3"
    assert lo["triangle"] == pytest.approx((0.9 + 0.1 + 0.2 + 0.7 + 0.3) / 5)
    assert lo["best"] == pytest.approx((0.9 + 0.8) / 2)
    assert hi["triangle"] == pytest.approx(0.6)
    assert hi["best"] == pytest.approx((0.6 + 0.5) / 2)
    with pytest.raises(ValueError, match="5 bands for 4 student layers"):
        depth_bands(m, 5)


def test_one_band_equals_the_analysis_summary():
    # the committed record's summary was computed by pkt.analysis from the full-precision matrices; the matrix kept
    # in the record is rounded to 5 decimals, so the means agree to that
    record = json.loads(RECORD.read_text())["result"]
    for module, by in record["plots"]["representations"]["modules"].items():
        for measure, v in by.items():
            (band,) = depth_bands(v["matrix"], 1)
            summary = record["summary"]["representations"][module][measure]
            assert band["triangle"] == pytest.approx(summary["teacher_ge_student"]["mean"], abs=1e-4)
            assert band["best"] == pytest.approx(summary["diagonal"]["best_mean"], abs=1e-4)


def test_table_and_bad_input(tmp_path, capsys):
    assert main([str(RECORD), "--bands", "2"]) == 0
    out = capsys.readouterr().out
    assert "| up | cka | " in out and "layers 0–11: triangle / best" in out
    other = tmp_path / "eval.json"
    other.write_text(json.dumps({"result": {"score": 1}}))
    with pytest.raises(SystemExit, match="not an analysis stage record"):
        main([str(other)])
    with pytest.raises(SystemExit, match="up/cka: 99 bands for 24 student layers"):
        main([str(RECORD), "--bands", "99"])
