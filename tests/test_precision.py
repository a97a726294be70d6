"""A built model is evaluated in a dtype in which its change to the student survives.

bf16 keeps 8 significant bits: relative to a weight, a change of 2^-16 is far below its rounding step
(2^-8 .. 2^-9 of the value) and is erased, a change of 2^-3 is far above it and always survives. These two
deltas give known answers: about 0 % and exactly 100 % of the changed entries survive.
"""

import json

import pytest
import torch

from pkt.evaluate.precision import choose_dtype, surviving
from pkt.testing import invoke_cli, save_tiny


def _perturbed(student, tok, path, rel: float, names=("model.layers.0.mlp.down_proj.weight",)):
    import copy

    model = copy.deepcopy(student)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.mul_(1 + rel)  # every nonzero entry changes by rel of itself
    return save_tiny(model, tok, path)


@pytest.fixture
def saved(tmp_path, qwen_pair):
    _, student, tok = qwen_pair
    return student, tok, save_tiny(student, tok, tmp_path / "student")


def test_change_below_bf16_resolution_falls_back_to_float32(tmp_path, saved):
    student, tok, ref = saved
    w = student.model.layers[0].mlp.down_proj.weight
    n_changed = int((w * (1 + 2.0 ** -16) != w).sum())  # fp32 keeps the change: 23 bits > 16
    assert n_changed == int((w != 0).sum()) > 0
    tiny = _perturbed(student, tok, tmp_path / "tiny", 2.0 ** -16)
    rep = surviving(tiny, ref, "bfloat16")
    assert rep["changed"] == n_changed
    assert rep["fraction"] < 0.02  # only entries sitting right at a bf16 rounding boundary can flip
    used, rep = choose_dtype(tiny, ref, "bfloat16", 0.5)
    assert used == "float32" and rep["fallback"] and rep["requested"] == "bfloat16"
    # in float32 itself the change survives entirely
    assert surviving(tiny, ref, "float32")["fraction"] == 1.0


def test_change_above_bf16_resolution_keeps_bf16(tmp_path, saved):
    student, tok, ref = saved
    big = _perturbed(student, tok, tmp_path / "big", 2.0 ** -3)
    used, rep = choose_dtype(big, ref, "bfloat16", 0.5)
    assert rep["fraction"] == 1.0 and rep["surviving"] == rep["changed"] > 0
    assert used == "bfloat16" and not rep["fallback"]
    # the unchanged model: nothing changed, nothing to lose, the requested dtype stands
    used, rep = choose_dtype(ref, ref, "bfloat16", 0.5)
    assert rep["changed"] == 0 and rep["fraction"] is None and used == "bfloat16"


def test_pkt_eval_records_the_dtype_it_used(tmp_path, saved, fixture_data_dir):
    student, tok, ref = saved
    tiny = _perturbed(student, tok, tmp_path / "tiny", 2.0 ** -16)
    out = tmp_path / "eval"
    res = invoke_cli(["eval", "--model", tiny, "--reference", ref, "--dtype", "bfloat16", "--tasks", "gsm8k",
                      "--limit", "2", "--max-new-tokens", "4", "--out", out, "--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dtype"] == "float32" and metrics["precision"]["requested"] == "bfloat16"
    assert metrics["precision"]["fallback"] is True
