"""pkt.studies.compare_records (`pkt study compare-records`), and the `pkt study` commands, each of which runs
its analysis' own ``main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkt import testing
from pkt.cli.study import COMMANDS
from pkt.studies.compare_records import compare, main, mcnemar_exact

ROOT = Path(__file__).resolve().parents[1]


def test_compare_records(tmp_path, capsys):
    """Paired counts on the common ids and the exact McNemar p-value, against values worked by hand; a file that
    is not a record is one line and exit 2."""
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(1, 0) == 1.0
    assert mcnemar_exact(6, 0) == mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all 6 discordant one way
    assert mcnemar_exact(2, 1) == 1.0  # P(X <= 1 | n=3) = 4/8, doubled
    a = {"1": True, "2": True, "3": False, "4": False, "9": True}
    b = {"1": True, "2": False, "3": True, "4": True}
    assert compare(a, b) == {"common": 4, "a_passed": 2, "b_passed": 3, "both": 1, "only_a": 1, "only_b": 2,
                             "mcnemar_p": 1.0}
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    fa.write_text(json.dumps({"verdicts": a}))
    fb.write_text(json.dumps({"verdicts": b}))
    main([str(fa), str(fb)])
    assert json.loads(capsys.readouterr().out)["only_b"] == 2
    # a code-predictions digest reads as its rows' verdicts
    fb.write_text(json.dumps({"format": "pkt-code-predictions-digest/1", "rows": [
        {"id": k, "correct": v, "kind": "passed" if v else "AssertionError", "lines": 1, "comment_lines": 0}
        for k, v in b.items()]}))
    main([str(fa), str(fb)])
    assert json.loads(capsys.readouterr().out) == compare(a, b)
    fb.write_text("{}")
    with pytest.raises(SystemExit) as e:
        main([str(fa), str(fb)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(fb) in err and err.count("\n") == 1


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_study_command_hands_its_arguments_to_the_analysis(name):
    """`pkt study NAME --help` is the analysis' own help, under the command's name."""
    res = testing.invoke_cli(["study", name, "--help"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"usage: pkt study {name} ")


def test_study_table_through_pkt_prints_what_the_module_prints(capsys):
    from pkt.studies import results_table

    args = [str(ROOT / "docs/results/cpu-study/results.json"), "gsm8k"]
    assert results_table.main(args) == 0
    want = capsys.readouterr().out
    res = testing.invoke_cli(["study", "table", *args])
    assert res.exit_code == 0 and res.output == want and "| LoRA | 3 |" in want
    bad = testing.invoke_cli(["study", "table", str(ROOT / "nope.json"), "gsm8k"])
    assert bad.exit_code != 0
