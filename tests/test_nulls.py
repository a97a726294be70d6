"""The similarity nulls on tiny models: pairings, the fast bootstrap scores against the plain measures, and the
nulls' order (a model against itself ≫ shuffled inputs; a random teacher is not the teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pkt.analyse import nulls as N
from pkt.analyse import representations as R
from pkt.analyse.similarity import linear_cka, rsa
from pkt.data.jsonl import ChatExample

EXAMPLES = [ChatExample(f"Question {i}: what is {i} plus {i + 3}?", f"{i} + {i + 3} = {2 * i + 3}. Answer: {2 * i + 3}")
            for i in range(12)]


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 64):
        p = N.derangement(n, seed=1)
        assert sorted(p) == list(range(n)) and all(a != b for a, b in zip(p, range(n)))
        assert p == N.derangement(n, seed=1)
    with pytest.raises(Exception, match="at least 2 examples"):
        N.derangement(1, 0)


def test_shuffled_rows_pair_other_examples_position_by_position():
    counts = [3, 5, 2, 4]
    s, t, g = N.shuffled_rows(counts, seed=0)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ex_of = np.repeat(np.arange(len(counts)), counts)
    assert len(s) == len(t) == len(g)
    assert all(ex_of[a] != ex_of[b] for a, b in zip(s.tolist(), t.tolist()))  # never the same example
    assert all(ex_of[a] == gi for a, gi in zip(s.tolist(), g.tolist()))
    for a, b in zip(s.tolist(), t.tolist()):  # the same position within both examples
        assert a - start[ex_of[a]] == b - start[ex_of[b]]


def test_fast_scores_equal_the_plain_measures():
    """One layer pair scored through the n×n token matrices (the bootstrap's path) equals linear_cka, debiased CKA
    and rsa of similarity.py on the same rows, for the full sample and for a resample without repeats."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 7, generator=g) + 2.0, torch.randn(40, 11, generator=g)
    mx, my = N._token_matrices(x, ("cka", "dcka", "rsa")), N._token_matrices(y, ("cka", "dcka", "rsa"))
    for idx in (torch.arange(40), torch.tensor([3, 7, 1, 22, 30, 31, 9, 15, 16, 38, 0, 5])):
        score = {m: float(N._vectors([mx], idx, m) @ N._vectors([my], idx, m).T) for m in ("cka", "dcka", "rsa")}
        assert score["cka"] == pytest.approx(linear_cka(x[idx], y[idx]), abs=1e-5)
        assert score["dcka"] == pytest.approx(linear_cka(x[idx], y[idx], debiased=True), abs=1e-5)
        assert score["rsa"] == pytest.approx(rsa(x[idx], y[idx]), abs=1e-5)


def test_a_model_against_itself_beats_both_nulls(tiny_pair):
    """Teacher := the student itself: the real pairing scores 1 at the same depth, far above the shuffled-input
    null; the random teacher (same architecture, fresh weights) is not the student, so it scores lower too. The
    intervals come from the bootstrap over examples and hold the point value."""
    _, student, tok = tiny_pair
    rep = R.RepConfig(kinds=("residual", "up"), measures=("cka", "rsa"), max_tokens=10_000)
    res = N.representation_nulls(student, student, tok, EXAMPLES, rep, N.NullConfig(n_boot=30, seed=0))
    assert res["n_examples"] == len(EXAMPLES) and 0 < res["n_paired_tokens"] <= res["n_tokens"]
    for kind in ("residual", "up"):
        for measure in ("cka", "rsa"):
            r = res["modules"][kind][measure]
            assert r["real"]["same_depth"]["value"] == pytest.approx(1.0, abs=1e-4)
            for null in N.NULLS:
                assert r[null]["same_depth"]["value"] < 0.999
                d = r[f"real_minus_{null}"]["same_depth"]
                assert d["value"] > 0 and d["interval"][0] > 0
            for side in ("real", *N.NULLS):
                for k in N.SUMMARIES:
                    lo, hi = r[side][k]["interval"]
                    assert lo - 1e-6 <= r[side][k]["value"] <= hi + 1e-6


def test_random_like_keeps_the_architecture_and_changes_the_weights(tiny_pair):
    teacher, _, _ = tiny_pair
    rand = N.random_like(teacher, seed=3)
    assert type(rand) is type(teacher) and rand.config.to_dict() == teacher.config.to_dict()
    a, b = dict(teacher.named_parameters()), dict(rand.named_parameters())
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    again = N.random_like(teacher, seed=3)
    assert torch.equal(dict(again.named_parameters())["model.layers.0.mlp.up_proj.weight"],
                       b["model.layers.0.mlp.up_proj.weight"])


def test_parametric_nulls_give_both_sides_with_intervals(tiny_pair):
    teacher, student, _ = tiny_pair
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = N.parametric_nulls(teacher, student, rank=2, kinds=("up",), cfg=N.NullConfig(n_boot=20))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the student is not touched
    for side in ("real", "random_teacher"):
        st = res[side]["up_proj"]["cos_BA_original"]
        assert st["interval"][0] <= st["mean"] <= st["interval"][1]
        assert res[side]["up_proj"]["norm_ratio"]["mean"] > 0


def test_cli_writes_the_nulls_tables(tmp_path, tiny_tok):
    """`pkt analyze nulls` on tiny saved models: nulls.json and nulls.md with every module × measure × summary row
    and the parametric null; bad settings are one line, exit 2."""
    import json

    from pkt import testing

    v = len(tiny_tok)
    t = testing.save_tiny(testing.tiny_model("qwen2", "teacher", v), tiny_tok, tmp_path / "t")
    s = testing.save_tiny(testing.tiny_model("qwen2", "student", v), tiny_tok, tmp_path / "s")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": e.messages()}) + "\n" for e in EXAMPLES))
    args = ["analyze", "nulls", "--teacher", t, "--student", s, "--out", str(tmp_path / "out"), "--data", str(data),
            "--n", "12", "--modules", "residual,up", "--measures", "cka", "--n-boot", "20", "--params-rank", "2",
            "--dtype", "float32"]
    res = testing.invoke_cli(args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = json.loads((tmp_path / "out" / "nulls.json").read_text())
    assert set(res["modules"]) == {"residual", "up"} and set(res["params"]) == {"real", "random_teacher"}
    md = (tmp_path / "out" / "nulls.md").read_text()
    assert md.count("| residual | cka |") == 3 and md.count("| up_proj | ") == 2
    bad = testing.invoke_cli(args[:-8] + ["--n-boot", "5"])
    assert bad.exit_code != 0 and "--n-boot at least 10" in str(bad.exception)


def test_half_sample_intervals_match_the_sampling_spread():
    """On synthetic studies (40 examples of 5 tokens, a noisy linear relation between the two sides) the half-sample
    spread of linear CKA estimates the spread of the statistic over fresh samples (within a factor 1.5), while
    draws with replacement are biased upwards (repeated examples are identical in both models)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 9, generator=g)
    rng = np.random.default_rng(0)
    groups = torch.arange(40).repeat_interleave(5)

    def sample():
        x = torch.randn(200, 6, generator=g)
        return x, x @ a + 2.0 * torch.randn(200, 9, generator=g)

    def cka(mx, my, idx):
        return float(N._vectors([mx], idx, "cka") @ N._vectors([my], idx, "cka").T)

    fulls, halves, repeated = [], [], []
    for _ in range(60):
        x, y = sample()
        mx, my = N._token_matrices(x, ("cka",)), N._token_matrices(y, ("cka",))
        point = cka(mx, my, torch.arange(200))
        draws = [cka(mx, my, N._draw(groups, rng)) for _ in range(40)]
        lo, hi = N._interval(point, draws, 0.95)
        assert lo <= point <= hi
        fulls.append(point)
        halves.append((hi - lo) / 3.92)
        picks = [torch.cat([torch.arange(k * 5, k * 5 + 5) for k in rng.integers(0, 40, 40)]) for _ in range(10)]
        repeated.append(np.mean([cka(mx, my, idx) for idx in picks]) - point)
    ratio = np.mean(halves) / np.std(fulls)
    assert 1 / 1.5 < ratio < 1.5, ratio
    assert np.mean(repeated) > 0.3 * np.std(fulls)  # the with-replacement bias this interval avoids (~0.5 sd here)


def test_the_committed_nulls_table_is_its_record():
    """docs/analyses/nulls-gsm8k: nulls.md is nulls_markdown of the committed nulls.json, byte for byte."""
    import json
    from pathlib import Path

    d = Path(__file__).resolve().parents[1] / "docs" / "analyses" / "nulls-gsm8k"
    res = json.loads((d / "nulls.json").read_text())
    assert N.nulls_markdown(res) == (d / "nulls.md").read_text()
    # every summary of every module and measure, for the real pair and both nulls
    assert {(k, m) for k, per in res["modules"].items() for m in per} == {
        (k, m) for k in ("up", "down", "v", "o", "residual") for m in ("cka", "dcka", "rsa")}
