"""semalign's oracles on tiny random models (docs/methods.md §9.3).

* recomposition: a student that is the teacher gets R = I and targets equal to the teacher's own layer outputs;
  a student whose residual stream is the teacher's rotated by an orthogonal Q (so are its vocabulary vectors)
  gets R = Qᵀ and targets equal to its own layer outputs; S3 v1's literal cosine recomposition is not the
  identity even for one model (the overcomplete frame);
* the layer-wise training lowers the alignment loss on held-out inputs and changes only the trained layers'
  chosen projections, and leaves the student as it was until the deltas are merged;
* the null keeps the pairing and training and breaks only the vocabulary correspondence: on one model its R
  reproduces the vocabulary scores at chance level and its targets are far from the teacher's states;
* both methods are registered and run through a study on the tiny pair, with their stage records.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pkt import methods
from pkt.transfer.function_transfer import apply_deltas
from pkt.transfer.semalign import (SemAlignConfig, basis_rows, build_targets, depth_pairing, recomposition, semalign,
                                teacher_states, vocab_derangement, vocab_matrix)
from pkt.errors import PktError
from pkt.models.arch import LINEAR_KINDS, ArchSpec
from pkt.testing import TINY_BUDGET, save_tiny, tiny_model, tiny_tokenizer

EXACT = dict(ridge=0.0)
TRAIN = dict(steps=30, lr=1e-3, batch_size=2)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def sequences(vocab: int, n: int = 6, length: int = 48, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def outputs(model, seqs, layers) -> list[dict]:
    """Per sequence, {layer: its output} (the teacher-side capture, used on any model)."""
    return [{m: io[1] for m, io in st.items()} for st in teacher_states(model, seqs, set(layers))]


def rotated(teacher, q: torch.Tensor):
    """The teacher with its residual stream rotated, h → h Q (exact with unit RMSNorm weights, set first): what
    reads the stream gets W Q, what writes it Qᵀ W, and the embedding and head rows are rotated too."""
    spec = ArchSpec.from_model(teacher)
    with torch.no_grad():
        for layer in spec.layers(teacher):
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        spec.final_norm(teacher).weight.fill_(1.0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        spec.embed(student).weight.copy_(spec.embed(teacher).weight @ q)
        spec.lm_head(student).weight.copy_(spec.lm_head(teacher).weight @ q)
        for i in range(spec.num_layers):
            for kind in LINEAR_KINDS:
                w = spec.linear(teacher, i, kind).weight
                spec.linear(student, i, kind).weight.copy_(q.T @ w if kind in ("o", "down") else w @ q)
    return student


def orthogonal(d: int, seed: int = 3) -> torch.Tensor:
    qr, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (qr * torch.sign(torch.diagonal(r))).float()


# ---- (a) the recomposition oracles -------------------------------------------------------------------------
@pytest.mark.parametrize("basis", ["lm_head", "embed"])
def test_one_model_recomposes_to_its_own_states(tok, basis):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    h = vocab_matrix(teacher, basis)
    rows = torch.arange(len(tok))
    r, info = recomposition(h, h, rows, "lstsq", **EXACT)
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    err = rel(r, eye)
    cfg = SemAlignConfig(basis=basis)
    n = ArchSpec.from_model(teacher).num_layers
    seqs = sequences(len(tok), n=2)
    states = list(teacher_states(teacher, seqs, set(range(n))))
    targets = build_targets(states, list(range(n)), list(range(n)), r, cfg)
    t_err = max(rel(targets[i][l], states[i][l][1]) for i in range(2) for l in range(n))
    r_default, _ = recomposition(h, h, rows, "lstsq", cfg.ridge)
    print(f"\nself-recomposition ({basis}): ‖R − I‖/‖I‖ {err:.1e} (ridge 0), {rel(r_default, eye):.1e} "
          f"(default ridge {cfg.ridge:g}); max relative target error over {n} layers {t_err:.1e}; "
          f"logit fit {info['logit_fit']}")
    assert err < 1e-8 and t_err < 1e-5 and info["logit_fit"] == pytest.approx(1.0, abs=1e-9)
    assert rel(r_default, eye) < 1e-4


def test_the_paper_cosine_recomposition_is_not_the_identity_on_one_model(tok):
    h = vocab_matrix(tiny_model("qwen2", "teacher", len(tok)), "lm_head")
    r, _ = recomposition(h, h, torch.arange(len(tok)), "cosine")
    # scale does not matter under a cosine loss: compare R with the best multiple of I
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    scaled = eye * torch.trace(r) / r.shape[0]
    err = rel(r, scaled)
    print(f"\nS3 v1 cosine recomposition on one model: ‖R − cI‖/‖cI‖ = {err:.2f} (the overcomplete frame's "
          f"operator Σ ŝᵢŝᵢᵀ over {len(tok)} bases in {r.shape[0]} dimensions)")
    assert err > 0.1


@pytest.mark.parametrize("basis", ["lm_head", "embed"])
def test_a_rotated_student_gets_the_rotated_states(tok, basis):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    d = ArchSpec.from_model(teacher).hidden_size
    q = orthogonal(d)
    student = rotated(teacher, q)
    r, info = recomposition(vocab_matrix(teacher, basis), vocab_matrix(student, basis), torch.arange(len(tok)),
                            "lstsq", **EXACT)
    r_err = rel(r, q.T.double())
    n = ArchSpec.from_model(teacher).num_layers
    seqs = sequences(len(tok), n=2)
    states = list(teacher_states(teacher, seqs, set(range(n))))
    targets = build_targets(states, list(range(n)), list(range(n)), r, SemAlignConfig())
    own = outputs(student, seqs, range(n))  # the rotated student's own layer outputs, h Q
    t_err = max(rel(targets[i][l], own[i][l]) for i in range(2) for l in range(n))
    print(f"\nrotated student ({basis}): ‖R − Qᵀ‖/‖Qᵀ‖ {r_err:.1e}; max relative error of the targets against "
          f"the student's own layer outputs {t_err:.1e}")
    assert r_err < 1e-6 and t_err < 1e-4


def test_bad_bases_are_refused(tok):
    h = vocab_matrix(tiny_model("qwen2", "teacher", len(tok)), "lm_head")
    with pytest.raises(PktError, match="share one vocabulary"):
        recomposition(h, h[:-1], torch.arange(10), "lstsq")
    with pytest.raises(PktError, match="cannot span"):
        recomposition(h, h, torch.arange(10), "lstsq")


def test_basis_rows_are_the_most_frequent_tokens():
    seqs = [torch.tensor([5, 5, 5, 2, 2, 9]), torch.tensor([9, 9, 9, 9, 7])]
    assert basis_rows(seqs, 12, None).tolist() == list(range(12))
    assert basis_rows(seqs, 12, 3).tolist() == [2, 5, 9]
    assert basis_rows(seqs, 12, 5).tolist() == [0, 2, 5, 7, 9]  # filled by the lowest ids


def test_depth_pairing_is_the_papers_map():
    assert depth_pairing(24, 28) == [max(1, (28 * k) // 24) - 1 for k in range(1, 25)]
    assert depth_pairing(24, 28)[-1] == 27 and depth_pairing(24, 28)[0] == 0
    assert depth_pairing(3, 4) == [0, 1, 3] and depth_pairing(4, 4) == [0, 1, 2, 3]



def test_cka_pairing_of_one_model_is_the_identity(tok):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    seqs = sequences(len(tok), n=3)
    _, info = semalign(teacher, copy.deepcopy(teacher), seqs[:2], seqs[2:], SemAlignConfig(pairing="cka", steps=0),
                       log=lambda s: None)
    assert info["teacher_layers"] == [0, 1, 2, 3] and all(c > 0.9999 for c in info["pair_cka"])
    assert len(info["cka"]) == 4


# ---- (b) the layer-wise training ---------------------------------------------------------------------------
@pytest.mark.parametrize("target,loss", [("output", "cosine"), ("contribution", "mse")])
def test_training_lowers_the_held_out_loss_and_touches_only_the_trained_layers(tok, target, loss):
    teacher, student = tiny_model("qwen2", "teacher", len(tok)), tiny_model("qwen2", "student", len(tok))
    before = copy.deepcopy(student.state_dict())
    seqs = sequences(len(tok), n=8)
    cfg = SemAlignConfig(layers=[0, 2], kinds=["o", "up"], target=target, loss=loss, **TRAIN)
    deltas, info = semalign(teacher, student, seqs[:6], seqs[6:], cfg, log=lambda s: None)
    rows = {r["layer"]: r for r in info["per_layer"]}
    print(f"\n{target}/{loss}: " + "; ".join(
        f"layer {l}: train {r['train_before']:.3f} → {r['train_after']:.3f}, held-out {r['heldout_before']:.3f} → "
        f"{r['heldout_after']:.3f}" for l, r in rows.items()))
    assert sorted(rows) == [0, 2] and info["teacher_layers"] == [0, 1, 3]
    for r in rows.values():
        assert r["train_after"] < 0.9 * r["train_before"]
        assert r["heldout_after"] < r["heldout_before"]
        assert len(r["loss_curve"]) == 30 and r["loss_curve"][-1] < r["loss_curve"][0]
    assert set(deltas) == {(0, "o"), (0, "up"), (2, "o"), (2, "up")}
    assert all(float(d.abs().max()) > 0 for d in deltas.values())
    # the student comes back as it was; merging the deltas changes exactly the trained weights
    assert all(torch.equal(w, before[n]) for n, w in student.state_dict().items())
    norms = apply_deltas(student, deltas)
    changed = {n for n, w in student.state_dict().items() if not torch.equal(w, before[n])}
    assert changed == {"model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight",
                       "model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.up_proj.weight"}
    assert set(norms["rel_norm_per_kind"]) == {"o", "up"} and 0 < norms["rel_norm"] < 1


def test_one_model_starts_aligned(tok):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    seqs = sequences(len(tok), n=3)
    _, info = semalign(teacher, copy.deepcopy(teacher), seqs[:2], seqs[2:], SemAlignConfig(steps=0),
                       log=lambda s: None)
    worst = max(max(r["train_before"], r["heldout_before"]) for r in info["per_layer"])
    print(f"\nteacher = student: largest initial alignment loss (1 − cos) {worst:.1e}")
    assert worst < 1e-6


def test_bad_settings_are_refused(tok):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    with pytest.raises(PktError, match="outside the student"):
        semalign(teacher, copy.deepcopy(teacher), sequences(len(tok), 2), [], SemAlignConfig(layers=[7]))
    with pytest.raises(PktError, match="no training sequences"):
        semalign(teacher, copy.deepcopy(teacher), [], [], SemAlignConfig())


# ---- (d) the null ------------------------------------------------------------------------------------------
def test_the_null_breaks_only_the_vocabulary_correspondence(tok):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    rows = torch.arange(len(tok))
    perm = vocab_derangement(len(rows), seed=0)
    assert sorted(perm.tolist()) == rows.tolist() and bool((perm != rows).all())
    assert torch.equal(perm, vocab_derangement(len(rows), seed=0))
    assert not torch.equal(perm, vocab_derangement(len(rows), seed=1))
    h = vocab_matrix(teacher, "lm_head")
    _, real = recomposition(h, h, rows, "lstsq", **EXACT)
    _, null = recomposition(h, h, rows, "lstsq", **EXACT, perm=perm)
    chance = h.shape[1] / len(rows)  # a random d-dimensional fit of V rows
    print(f"\nlogit fit on one model: aligned {real['logit_fit']:.4f}, deranged vocabulary {null['logit_fit']:.4f} "
          f"(chance d/V = {chance:.3f})")
    assert real["logit_fit"] > 0.999 and null["logit_fit"] < 2 * chance

    seqs = sequences(len(tok), n=3)
    runs = {}
    for shuffle in (False, True):
        cfg = SemAlignConfig(steps=0, vocab_shuffle=shuffle)
        runs[shuffle] = semalign(teacher, copy.deepcopy(teacher), seqs[:2], seqs[2:], cfg, log=lambda s: None)[1]
    a, b = runs[False], runs[True]
    assert a["teacher_layers"] == b["teacher_layers"] and a["layers"] == b["layers"]
    assert b["recomposition"]["vocab_shuffle"] and b["recomposition"]["moved_tokens"] == len(tok)
    assert a["recomposition"]["moved_tokens"] is None
    gap = min(r["heldout_before"] for r in b["per_layer"])
    print(f"null, teacher = student: smallest initial alignment loss {gap:.3f} (the method's: < 1e-6)")
    assert gap > 0.1


# ---- (c) the methods in a study ----------------------------------------------------------------------------
def test_the_methods_run_through_a_study(tmp_path, shared_data):
    from pkt.config import validate
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.runner import Study
    from pkt.models.load import load_model

    names = ["semalign", "semalign-shuffled"]
    assert all(methods.get(n).reads == ("teacher-lora",) for n in names)
    tk = tiny_tokenizer()
    teacher = save_tiny(tiny_model("qwen2", "teacher", len(tk)), tk, tmp_path / "teacher")
    student = save_tiny(tiny_model("qwen2", "student", len(tk)), tk, tmp_path / "student")
    cfg = validate(ExperimentConfig, {"name": "sa", "teacher": teacher, "student": student, "tasks": ["gsm8k"],
                                      "seeds": [0], "methods": ["student", *names], "dtype": "float32",
                                      "teacher_dtype": "float32", "eval_dtype": "float32", "analysis": False,
                                      "budget": TINY_BUDGET, "keep_checkpoints": True})
    study = Study(cfg, tmp_path / "run", log=lambda s: None)
    plan = study.preflight(plan=True)
    rows = {s["stage"]: s for s in plan.stages}
    assert "teacher-lora-gsm8k-s0" in rows and rows["semalign-gsm8k-s0"]["bytes"] > 0
    assert rows["semalign-gsm8k-s0"]["work"].startswith("align 3 student layers to the recomposed teacher on 4")

    result = study.run()
    recs = {r["method"]: r for r in result["records"]}
    assert set(names) <= set(recs) and "teacher-lora" not in recs  # read, not evaluated
    base = load_model(student, dtype="float32").state_dict()
    built = {}
    kinds = SemAlignConfig().kinds
    for n in names:
        stage = Path(recs[n]["model_dir"]).parent
        built[n] = json.loads((stage / "stage.json").read_text())["result"]
        r = built[n]
        assert r["teacher_layers"] == [0, 1, 3] and r["layers"] == [0, 1, 2] and r["kinds"] == kinds
        assert r["n_train"] == 4 and r["n_heldout"] == 2 and len(r["per_layer"]) == 3
        assert all(set(row) >= {"train_before", "train_after", "heldout_before", "heldout_after", "loss_curve"}
                   for row in r["per_layer"])
        assert r["recomposition"]["basis_tokens"] == len(tk) and r["recomposition"]["basis"] == "lm_head"
        assert set(r["rel_norm_per_kind"]) == set(kinds) and len(r["rel_norm_per_projection"]) == 3 * len(kinds)
        assert 0 < r["rel_norm"] < 1
        assert r["surviving"]["changed"] > 0 and r["surviving"]["fraction"] == 1.0  # evaluated in float32
        assert recs[n]["precision"]["changed"] == r["surviving"]["changed"]
        changed = [k for k, w in load_model(recs[n]["model_dir"]).state_dict().items()
                   if not torch.equal(w, base[k])]
        suffixes = tuple(f"{p}_proj.weight" for p in kinds)
        assert changed and all(k.endswith(suffixes) for k in changed)
    sa, null = built["semalign"], built["semalign-shuffled"]
    assert sa["vocab"] == "aligned" and null["vocab"] == "shuffled"
    assert not sa["recomposition"]["vocab_shuffle"] and null["recomposition"]["vocab_shuffle"]
    assert null["recomposition"]["moved_tokens"] == len(tk)
    assert null["recomposition"]["r_norm"] != sa["recomposition"]["r_norm"]
    assert null["rel_norm_per_projection"] != sa["rel_norm_per_projection"]
