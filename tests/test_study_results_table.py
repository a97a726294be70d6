"""pkt.studies.results_table (`pkt study table`): the short table docs/results.md quotes, against rows worked by hand;
bold exactly when the interval excludes 0; bad input is one line."""

from __future__ import annotations

import json

import pytest

from pkt.studies.results_table import interval, main, table


def row(method, mean, std=0.0, delta=None, lo=None, hi=None, **kw):
    return {"method": method, "task": "gsm8k", "metric": "accuracy", "seeds": [0, 1, 2], "mean": mean, "std": std,
            "answer_loss_mean": 1.0, "answer_loss_std": 0.01, "delta": delta, "delta_low": lo, "delta_high": hi,
            "at_cap": 0.02, "delta_lora": None, "delta_lora_low": None, "delta_lora_high": None, **kw}


def test_interval_is_bold_only_when_it_excludes_zero():
    assert interval(-0.08, -0.12, -0.04) == "**−8.0 [−12.0, −4.0]**"
    assert interval(0.004, -0.009, 0.02) == "+0.4 [−0.9, +2.0]"
    assert interval(-0.073, -0.14, 0.0) == "−7.3 [−14.0, +0.0]"  # touching 0 is not excluding it
    assert interval(None, None, None) == "–"


def test_holm_significant_intervals_are_marked():
    """✓ follows the Holm-adjusted p, not the interval: a raw-significant interval whose Holm p exceeds 0.05 gets no
    mark, and a row without a Holm p (a report from before it existed) none either."""
    assert interval(-0.116, -0.182, -0.051, 0.029) == "**−11.6 [−18.2, −5.1]** ✓"
    assert interval(-0.08, -0.144, -0.018, 0.552) == "**−8.0 [−14.4, −1.8]**"
    assert interval(-0.08, -0.144, -0.018, None) == "**−8.0 [−14.4, −1.8]**"
    md = table({"rows": [row("pissa", 0.05, 0.02, -0.116, -0.182, -0.051, delta_p_holm=0.029)]}, "gsm8k")
    assert "| **−11.6 [−18.2, −5.1]** ✓ | – |" in md


def test_table_by_hand(tmp_path, capsys):
    rows = [row("student", 0.1667), row("seeking", 0.087, 0.013, -0.08, -0.12, -0.04, delta_lora=-0.073,
                                        delta_lora_low=-0.116, delta_lora_high=-0.033),
            {**row("lora", 0.5), "task": "humaneval"}]
    md = table({"rows": rows}, "gsm8k").splitlines()
    assert len(md) == 4  # header, rule, the two gsm8k rows
    assert md[2] == "| student | – | 16.7% | – | – | 2.0% | 1.000 |"
    assert md[3] == ("| Seeking | 3 | 8.7 ± 1.3% | **−8.0 [−12.0, −4.0]** | **−7.3 [−11.6, −3.3]** | 2.0% "
                     "| 1.000 ± 0.010 |")
    f = tmp_path / "results.json"
    f.write_text(json.dumps({"rows": rows}))
    assert main([str(f), "humaneval"]) == 0 and "| LoRA | 3 | 50.0 ± 0.0% |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no rows for task 'mbpp' \(tasks: \['gsm8k', 'humaneval'\]\)"):
        main([str(f), "mbpp"])
    for bad in ("{}", json.dumps({"rows": [{k: v for k, v in rows[0].items() if k != "mean"}]})):
        f.write_text(bad)
        with pytest.raises(SystemExit, match="not a study's results.json"):
            main([str(f), "gsm8k"])
