"""The committed records of the staged studies `steps-saved` and `laten-dose` (docs/results/*/): each report is
rebuilt byte for byte from a copy of its records alone, as `pkt study <study> CONFIG --report` does (the pilot's
committed records have the same test in tests/test_pilot.py, `pkt run`'s in tests/test_records.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pkt.studies import laten_dose_report, steps_saved_report

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


# one case per committed records directory, found when the tests are collected
COMMITTED = [(report, meta.parent) for report in (steps_saved_report, laten_dose_report)
             for meta in sorted(RESULTS.glob(f"*/{report.META}"))]


def report_options(report, d: Path) -> dict:
    """What `--report` passes besides the records (steps_saved.report_options), from the study's committed config
    (configs/<its name>.yaml); its paths are relative to the repository's root, the tests' working directory."""
    if report is not steps_saved_report:
        return {}
    from pkt.studies.steps_saved import load_config, report_options as options

    name = steps_saved_report.load(d)["meta"]["settings"]["name"]
    cfg = load_config(RESULTS.parents[1] / "configs" / f"{name}.yaml")[0]
    assert Path(cfg.records).name == d.name
    return options(cfg)


@pytest.mark.parametrize("report, d", COMMITTED, ids=[d.name for _, d in COMMITTED])
def test_committed_records_rederive(tmp_path, report, d, monkeypatch):
    assert (d / report.REPORT).is_file(), f"{d}: records committed without their report"
    monkeypatch.chdir(RESULTS.parents[1])  # a config's paths are relative to the repository's root
    options = report_options(report, d)
    copy = tmp_path / d.name
    shutil.copytree(d, copy)
    (copy / report.REPORT).unlink()
    (copy / report.PLOT).unlink()
    report.write_report(copy, **options)
    assert (copy / report.REPORT).read_bytes() == (d / report.REPORT).read_bytes(), d
    assert (copy / report.PLOT).is_file()


def test_the_steps_saved_records_are_committed(monkeypatch):
    """The GSM8K steps-saved study's records are in the repository and among the cases above; its controls' report
    sets Seeking beside them (compare_with)."""
    assert (steps_saved_report, RESULTS / "steps-saved-gsm8k") in COMMITTED
    monkeypatch.chdir(RESULTS.parents[1])
    joined = report_options(steps_saved_report, RESULTS / "steps-saved-controls-gsm8k")["compare_with"]
    assert [Path(j).resolve() for j in joined] == [RESULTS / "steps-saved-gsm8k"]
    assert "| seeking − seeking-random |" in (RESULTS / "steps-saved-controls-gsm8k" / steps_saved_report.REPORT
                                              ).read_text(encoding="utf-8")
