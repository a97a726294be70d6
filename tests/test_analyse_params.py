"""Parametric similarity on tiny models: peft PiSSA, the Seeking-style init and LaTen-style deltas."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pkt.locate.structure import max_sum_submatrix

from pkt.analyse import params as P
from pkt.analyse.similarity import flat_cosine
from pkt.models.arch import ArchSpec


def _weights(model, kinds=("up", "down")):
    spec = ArchSpec.from_model(model)
    return {(i, k): spec.linear(model, i, k).weight.detach().clone() for i in range(spec.num_layers) for k in kinds}


def test_pissa_matches_direct_and_analytic(tiny_pair):
    _, student, _ = tiny_pair
    before = _weights(student)
    r = 4
    peft_model = P.pissa_init(student, rank=r, lora_alpha=8)  # scaling 2: the effective BA must use it
    recs = P.lora_similarity(peft_model)
    assert {(x["layer"], x["module"]) for x in recs} == {(i, f"{k}_proj") for i, k in before}
    spec = ArchSpec.from_model(peft_model)
    for rec in recs:
        kind = rec["module"].split("_")[0]
        w = before[(rec["layer"], kind)].double()
        lora = spec.linear(peft_model, rec["layer"], kind)
        ba = lora.scaling["default"] * (lora.lora_B["default"].weight.detach().double()
                                        @ lora.lora_A["default"].weight.detach().double())
        w_rem = lora.get_base_layer().weight.detach().double()
        assert rec["scaling"] == pytest.approx(2.0)
        assert torch.allclose(w_rem + ba, w, atol=1e-4)  # the base really was mutated to W - BA
        # Direct flattened cosine.
        direct = float((ba.flatten() @ w.flatten()) / (ba.norm() * w.norm()))
        assert rec["cos_BA_original"] == pytest.approx(direct, abs=1e-5)
        assert rec["cos_BA_remaining"] == pytest.approx(flat_cosine(ba, w_rem), abs=1e-12)
        # PiSSA identities.
        s = torch.linalg.svdvals(w)
        assert rec["cos_BA_original"] == pytest.approx(math.sqrt(float((s[:r] ** 2).sum() / (s ** 2).sum())), abs=1e-4)
        assert abs(rec["cos_BA_remaining"]) < 1e-4
        assert rec["norm_ratio"] == pytest.approx(rec["cos_BA_original"], abs=1e-4)  # ‖U_rΣ_rV_rᵀ‖/‖W‖
    summ = P.summarise(recs)
    assert set(summ) == {"up_proj", "down_proj"} and summ["up_proj"]["cos_BA_original"]["n"] == spec.num_layers


def test_plain_lora_has_zero_cosines(qwen_pair):
    from peft import LoraConfig, get_peft_model

    _, student, _ = qwen_pair
    model = get_peft_model(student, LoraConfig(r=2, target_modules=["v_proj"]))
    recs = P.lora_similarity(model)
    assert all(r["cos_BA_original"] == 0.0 and r["norm_ratio"] == 0.0 for r in recs)


def test_seeking_style_init(tiny_pair):
    teacher, student, tok = tiny_pair
    ids = tok("Question: Natalia sold 48 clips. Answer: 72", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = student(ids).logits
    before = _weights(student)
    r = 3
    model, blocks = P.seeking_init(teacher, student, rank=r)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)  # W - BA + BA: unchanged at init
    t_spec = ArchSpec.from_model(teacher)
    recs = {(x["layer"], x["module"]): x for x in P.lora_similarity(model)}
    assert len(recs) == len(blocks)
    for b in blocks:
        kind = b.module.split("_")[0]
        w = before[(b.student_layer, kind)].double()
        tw = t_spec.linear(teacher, b.teacher_layer, kind).weight.detach().double()
        sub = tw[b.row0:b.row0 + w.shape[0], b.col0:b.col0 + w.shape[1]]
        u, s, vh = torch.linalg.svd(sub, full_matrices=False)
        ba = (u[:, :r] * s[:r]) @ vh[:r]
        rec = recs[(b.student_layer, b.module)]
        assert rec["cos_BA_original"] == pytest.approx(flat_cosine(ba, w), abs=1e-5)
        assert rec["cos_BA_remaining"] == pytest.approx(flat_cosine(ba, w - ba), abs=1e-5)
    # The block maximises sum |W| among contiguous blocks.
    b0 = blocks[0]
    tw = t_spec.linear(teacher, b0.teacher_layer, b0.module.split("_")[0]).weight.detach().abs()
    shape = before[(0, b0.module.split("_")[0])].shape
    best = max(((float(tw[i:i + shape[0], j:j + shape[1]].sum()), i, j)
                for i in range(tw.shape[0] - shape[0] + 1) for j in range(tw.shape[1] - shape[1] + 1)),
               key=lambda t: t[0])
    assert (b0.row0, b0.col0) == best[1:]


def test_max_sum_block_bruteforce_and_first_tie():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(9, 7, generator=g)
    for shape in [(1, 1), (3, 2), (9, 7), (4, 6)]:
        sums = {(i, j): float(score[i:i + shape[0], j:j + shape[1]].sum())
                for i in range(9 - shape[0] + 1) for j in range(7 - shape[1] + 1)}
        i, j = max_sum_submatrix(score, *shape)
        assert sums[(i, j)] == pytest.approx(max(sums.values()))
    assert max_sum_submatrix(torch.ones(4, 4), 2, 2) == (0, 0)
    assert P.even_layer_map(5, 3) == [0, 2, 4] and P.even_layer_map(7, 4) == [0, 2, 4, 6]
    assert P.even_layer_map(4, 2) == [0, 3] and P.even_layer_map(3, 1) == [2]
    m = P.even_layer_map(28, 24)  # the real pair: 24 distinct layers, each within half a step of i·27/23
    assert m[0] == 0 and m[-1] == 27 and all(a < b for a, b in zip(m, m[1:]))
    assert all(abs(t - i * 27 / 23) <= 0.5 for i, t in enumerate(m))


def test_delta_similarity_located(llama_pair):
    _, student, _ = llama_pair
    spec = ArchSpec.from_model(student)
    w = spec.linear(student, 1, "up").weight.detach()
    rows, cols = torch.tensor([0, 5, 7, 20]), torch.tensor([1, 2, 30])
    delta = torch.zeros_like(w)
    delta[rows[:, None], cols[None, :]] = torch.randn(4, 3)
    w_down = spec.linear(student, 0, "down").weight.detach()
    delta2 = 0.5 * w_down.clone()
    recs = P.delta_similarity(student, {spec.module_name(1, "up") + ".weight": delta,
                                        "base_model.model." + spec.module_name(0, "down"): delta2})
    by = {r["module"]: r for r in recs}
    up = by["up_proj"]
    assert (up["rows"], up["cols"], up["layer"]) == (4, 3, 1)
    direct = flat_cosine(delta[rows][:, cols], w[rows][:, cols])
    assert up["cos_delta_located"] == pytest.approx(direct, abs=1e-12)
    assert up["cos_delta_full"] == pytest.approx(flat_cosine(delta, w), abs=1e-12)
    assert by["down_proj"]["cos_delta_located"] == pytest.approx(1.0)
    assert by["down_proj"]["norm_ratio"] == pytest.approx(0.5)


def test_errors(llama_pair):
    from pkt.errors import PktError

    _, student, _ = llama_pair
    with pytest.raises(PktError):
        P.lora_similarity(copy.deepcopy(student))
    with pytest.raises(PktError):
        P.delta_similarity(student, {"model.layers.0.mlp.nope": torch.zeros(2, 2)})


@pytest.mark.slow
def test_real_student_pissa_identities():
    """Qwen2.5-Coder-0.5B (needs PKT_HOME with the prepared model; run under flock /tmp/pkt-real.lock)."""
    from pkt.models.load import load_model

    student = load_model("qwen2.5-coder-0.5b-instruct")
    w = ArchSpec.from_model(student).linear(student, 0, "up").weight.detach().double().clone()
    recs = P.lora_similarity(P.pissa_init(student, rank=16, kinds=("up",)))
    s = torch.linalg.svdvals(w)
    assert recs[0]["cos_BA_original"] == pytest.approx(math.sqrt(float((s[:16] ** 2).sum() / (s ** 2).sum())), abs=1e-3)
    assert all(abs(r["cos_BA_remaining"]) < 1e-3 for r in recs)
