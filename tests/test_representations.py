"""Representation similarity on tiny models: hooks, token plan, all-pairs matrices and summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pkt.analyse import representations as R
from pkt.analyse.similarity import linear_cka, rsa
from pkt.data.chat import IGNORE
from pkt.data.jsonl import ChatExample
from pkt.models.arch import ArchSpec

EXAMPLES = [
    ChatExample("Natalia sold 48 clips in April and half as many in May. How many in total?", "48 + 24 = 72. Answer: 72"),
    ChatExample("def add(a, b):", "    return a + b"),
    ChatExample("What is the capital of France?", "The capital of France is Paris."),
    ChatExample("Complete the following python function.", "for i in range(10):\n    print(i)"),
]


def test_plan_tokens_response_and_cap(tiny_tok):
    plan = R.plan_tokens(EXAMPLES, tiny_tok, R.RepConfig(max_tokens=10_000))
    for f, p in zip(plan.features, plan.positions):
        assert all(f["labels"][t] != IGNORE for t in p.tolist())
        assert len(p) == sum(lab != IGNORE for lab in f["labels"])
    full = plan.n_tokens
    a = R.plan_tokens(EXAMPLES, tiny_tok, R.RepConfig(max_tokens=17, seed=3))
    b = R.plan_tokens(EXAMPLES, tiny_tok, R.RepConfig(max_tokens=17, seed=3))
    assert a.n_tokens == 17 < full
    assert all(torch.equal(x, y) for x, y in zip(a.positions, b.positions))
    allt = R.plan_tokens(EXAMPLES, tiny_tok, R.RepConfig(tokens="all", max_tokens=10_000))
    assert allt.n_tokens == sum(len(f["input_ids"]) for f in allt.features)


def test_collect_shapes_hooks_and_padding(tiny_pair):
    teacher, _, tok = tiny_pair
    spec = ArchSpec.from_model(teacher)
    plan = R.plan_tokens(EXAMPLES, tok, R.RepConfig(tokens="all", max_tokens=10_000))
    acts = R.collect_activations(teacher, plan, batch_size=3, pad_id=tok.pad_token_id)
    n = plan.n_tokens
    widths = {"up": spec.intermediate_size, "down": spec.hidden_size, "v": spec.kv_dim, "o": spec.hidden_size,
              "residual": spec.hidden_size}
    for kind, layers in acts.items():
        assert len(layers) == spec.num_layers + (kind == "residual")
        assert all(x.shape == (n, widths[kind]) for x in layers)
    # Batched + right-padded == one example at a time; residual == output_hidden_states (before final norm).
    ids = torch.tensor([plan.features[1]["input_ids"]])
    with torch.no_grad():
        hs = teacher(ids, output_hidden_states=True).hidden_states
    off = len(plan.positions[0])
    rows = slice(off, off + ids.shape[1])
    for i in range(spec.num_layers):
        assert torch.allclose(acts["residual"][i][rows], hs[i][0], atol=1e-4)
    single = R.collect_activations(teacher, R.TokenPlan([plan.features[1]], [plan.positions[1]]), kinds=("o",))
    assert torch.allclose(single["o"][1], acts["o"][1][rows], atol=1e-4)


def test_self_similarity_diagonal_and_direct_cells(llama_pair):
    teacher, student, tok = llama_pair
    plan = R.plan_tokens(EXAMPLES, tok, R.RepConfig(tokens="all", max_tokens=60, seed=1))
    t_acts = R.collect_activations(teacher, plan, kinds=("up", "residual"))
    s_acts = R.collect_activations(student, plan, kinds=("up", "residual"))
    selfm = R.compare_activations(t_acts, t_acts, compute_dtype=torch.float64)
    for kind, per in selfm.items():
        for m, mat in per.items():
            assert torch.allclose(mat.diagonal(), torch.ones(mat.shape[0], dtype=torch.float64), atol=1e-8), (kind, m)
    mats = R.compare_activations(t_acts, s_acts)
    up = mats["up"]
    assert up["cka"].shape == (3, 4)  # [student layers, teacher layers]
    assert float(up["cka"][2, 1]) == pytest.approx(linear_cka(s_acts["up"][2], t_acts["up"][1]), abs=1e-4)
    assert float(up["dcka"][0, 3]) == pytest.approx(
        linear_cka(s_acts["up"][0], t_acts["up"][3], debiased=True), abs=1e-4)
    assert float(up["rsa"][1, 2]) == pytest.approx(rsa(s_acts["up"][1], t_acts["up"][2]), abs=1e-4)
    assert ((up["cka"] >= -1e-6) & (up["cka"] <= 1 + 1e-6)).all()
    assert ((up["rsa"] >= -1 - 1e-6) & (up["rsa"] <= 1 + 1e-6)).all()


def test_summarise_matrix():
    mat = torch.tensor([[0.9, 0.1, 0.0, 0.2], [0.1, 0.2, 0.8, 0.3], [0.0, 0.1, 0.3, 0.7]], dtype=torch.float64)
    s = R.summarise_matrix(mat)
    assert s["diagonal"]["proportional_teacher"] == [0, 2, 3]
    assert s["diagonal"]["best_teacher"] == [0, 2, 3]
    assert s["diagonal"]["proportional_mean"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert s["diagonal"]["best_monotone"] is True
    assert s["all"]["mean"] == pytest.approx(float(mat.mean()))
    ge = [0.9, 0.1, 0.0, 0.2, 0.2, 0.8, 0.3, 0.3, 0.7]
    assert s["teacher_ge_student"]["mean"] == pytest.approx(sum(ge) / len(ge))


def _np_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s feature-space linear CKA, written out in NumPy."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _np_rsa(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the strict upper triangles of the token-by-token cosine matrices."""
    def upper_cos(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return (a @ a.T)[np.triu_indices(a.shape[0], k=1)]
    return float(np.corrcoef(upper_cos(x), upper_cos(y))[0, 1])


def _hooked_outputs(model, plan, path: str) -> list[np.ndarray]:
    """Per layer, the outputs of the module at ``path`` at the plan's tokens: own hooks, one example per pass."""
    per_layer = [[] for _ in model.model.layers]
    for f, pos in zip(plan.features, plan.positions):
        got = {}
        handles = [layer.get_submodule(path).register_forward_hook(
            lambda _m, _i, out, k=k: got.__setitem__(k, out[0])) for k, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(input_ids=torch.tensor([f["input_ids"]]))
        for h in handles:
            h.remove()
        for k in got:
            per_layer[k].append(got[k][pos])
    return [torch.cat(x).double().numpy() for x in per_layer]


def test_representation_similarity_with_loaders(qwen_pair):
    teacher, student, tok = qwen_pair
    calls = []

    def load_t():
        calls.append("t")
        return teacher

    cfg = R.RepConfig(max_tokens=32, kinds=("v", "o"), compute_dtype="float64")
    res = R.representation_similarity(load_t, student, tok, EXAMPLES, cfg)
    assert calls == ["t"] and res["n_tokens"] == 32
    assert set(res["modules"]) == {"v", "o"} and set(res["modules"]["v"]) == {"cka", "dcka", "rsa"}
    assert res["layers"] == {"teacher": {"v": 4, "o": 4}, "student": {"v": 3, "o": 3}}
    json.dumps(res)
    # Every cell [student layer i][teacher layer j] is the measure of the two modules' outputs at the same
    # 32 planned tokens, re-collected here with separate hooks and scored with NumPy formulas.
    plan = R.plan_tokens(EXAMPLES, tok, cfg)
    for kind, path in (("v", "self_attn.v_proj"), ("o", "self_attn.o_proj")):
        t_acts, s_acts = _hooked_outputs(teacher, plan, path), _hooked_outputs(student, plan, path)
        assert t_acts[0].shape == (32, teacher.config.num_key_value_heads * 16 if kind == "v" else 64)
        for measure, fn in (("cka", _np_cka), ("rsa", _np_rsa)):
            mat = res["modules"][kind][measure]["matrix"]
            want = [[fn(s, t) for t in t_acts] for s in s_acts]
            assert mat == [pytest.approx(row, abs=1e-5) for row in want], (kind, measure)
        dcka = res["modules"][kind]["dcka"]["matrix"]
        assert dcka[1][2] == pytest.approx(linear_cka(torch.from_numpy(s_acts[1]), torch.from_numpy(t_acts[2]),
                                                      debiased=True), abs=1e-5)
    from pkt.errors import PktError

    with pytest.raises(PktError):
        R.RepConfig(kinds=("gate",)).check()
