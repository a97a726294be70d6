"""function-transfer's oracles on tiny random models (docs/methods.md §9.2).

* self-transfer: teacher = student, so the pairing is the identity and, with a vanishing ridge, the transferred
  update is the teacher's own and the updated models agree logit for logit;
* a planted rotation: a student that is the teacher with its residual stream rotated by an orthogonal Q computes
  the same logits, and the transfer recovers the rotated update (ΔW Q where a projection reads the residual
  stream, Qᵀ ΔW where it writes it), with either output map;
* the closed-form ridge solve equals gradient descent on the same objective; the monotone pairing equals a brute
  force over every non-decreasing map;
* the dual (token-space) forms of the map and the solve equal the primal forms, on random matrices and through
  whole transfers on the tiny pair, with fewer tokens than widths and with more; the rule that picks them keeps
  the real pair's few hundred calibration tokens in the token space;
* the nulls: the random task vector keeps the teacher's per-projection norms and singular values; the shuffled
  pairing is a derangement that moves every layer;
* the three methods are registered and run through a study on the tiny pair, with their stage records.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from pkt import methods
from pkt.transfer.function_transfer import (TransferConfig, apply_deltas, layer_solve_flops, layer_stat_bytes,
                                         layer_token_bytes, monotone_pairing, output_map, pair_layers,
                                         random_task_vector, rel_norms, ridge_solve, solve_in_tokens, transfer)
from pkt.transfer.transfer_solve import TokenRidge, token_map
from pkt.errors import PktError
from pkt.models.arch import LINEAR_KINDS, ArchSpec
from pkt.testing import TINY_BUDGET, save_tiny, tiny_model, tiny_tokenizer

EXACT = TransferConfig(ridge=1e-12, map_ridge=1e-12)


def planted(model, rank: int = 2, scale: float = 0.05, seed: int = 0) -> dict:
    """A rank-``rank`` update of every projection of ``model``, sized relative to each weight."""
    spec = ArchSpec.from_model(model)
    g = torch.Generator().manual_seed(seed)
    tv = {}
    for layer in range(spec.num_layers):
        for kind in LINEAR_KINDS:
            w = spec.linear(model, layer, kind).weight.detach()
            d = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
            tv[(layer, kind)] = scale * d * (w.norm() / d.norm())
    return tv


def sequences(vocab: int, n: int = 4, length: int = 96, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.view(1, -1), use_cache=False).logits[0].double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---- self-transfer -----------------------------------------------------------------------------------------
def test_self_transfer_returns_the_teachers_update(tok):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    student = copy.deepcopy(teacher)
    tv = planted(teacher)
    seqs = sequences(len(tok))
    deltas, info = transfer(teacher, student, tv, seqs, EXACT, log=lambda s: None)
    n = ArchSpec.from_model(teacher).num_layers
    assert info["teacher_layers"] == list(range(n)) and info["cka_pairing"] == list(range(n))
    assert all(c > 0.9999 for c in info["pair_cka"])
    err = max(rel(deltas[k], tv[k]) for k in tv)
    print(f"\nself-transfer: max relative error of ΔW_s against ΔW_t over {len(tv)} projections: {err:.2e}")
    assert set(deltas) == set(tv) and err < 1e-4
    assert all(r["map_r2"] > 0.9999 and abs(r["effect_ratio"] - 1) < 1e-4 for r in info["projections"])

    tuned_teacher = copy.deepcopy(teacher)
    apply_deltas(tuned_teacher, tv)
    norms = apply_deltas(student, deltas)
    ids = seqs[0][:64]
    diff = float((logits(student, ids) - logits(tuned_teacher, ids)).abs().max())
    moved = float((logits(tuned_teacher, ids) - logits(teacher, ids)).abs().max())
    print(f"self-transfer: max |logit difference| {diff:.2e} (the update itself moves logits by {moved:.2f})")
    assert diff < 1e-3 * moved
    assert abs(norms["rel_norm"] - 0.05) < 1e-6 and set(norms["rel_norm_per_kind"]) == set(LINEAR_KINDS)


# ---- planted rotation --------------------------------------------------------------------------------------
def rotated(teacher, q: torch.Tensor):
    """The teacher with its residual stream rotated, h → h Q: what reads it gets W Q, what writes it Qᵀ W.
    Exact only with unit RMSNorm weights, which the teacher is given first (‖h Q‖ = ‖h‖)."""
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


def expected_rotation(tv: dict, q: torch.Tensor) -> dict:
    return {(i, k): (q.T @ d if k in ("o", "down") else d @ q) for (i, k), d in tv.items()}


@pytest.mark.parametrize("how", ["ridge", "procrustes"])
def test_a_planted_rotation_is_recovered(tok, how):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    d = ArchSpec.from_model(teacher).hidden_size
    qr, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    q = (qr * torch.sign(torch.diagonal(r))).float()
    student = rotated(teacher, q)
    seqs = sequences(len(tok))
    same = rel(logits(student, seqs[0]), logits(teacher, seqs[0]))
    print(f"\nrotated student: relative logit difference from the teacher {same:.2e}")
    assert same < 1e-5  # the construction computes the teacher's function

    tv = planted(teacher)
    deltas, info = transfer(teacher, student, tv, seqs, EXACT.model_copy(update={"output_map": how}),
                            log=lambda s: None)
    assert info["teacher_layers"] == list(range(len(info["teacher_layers"])))
    want = expected_rotation(tv, q)
    errs = {k: rel(deltas[k], want[k]) for k in want}
    worst = max(errs, key=errs.get)
    print(f"planted rotation ({how} map): max relative error {errs[worst]:.2e} at {worst}")
    assert errs[worst] < 1e-3


def test_the_task_vector_read_from_an_adapter_is_what_merging_it_adds(tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    from pkt.transfer.function_transfer import task_vector_from_adapter
    from pkt.models.arch import PEFT_NAMES

    base = tiny_model("qwen2", "teacher", len(tok))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=list(PEFT_NAMES.values())))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    tv, teacher = task_vector_from_adapter(copy.deepcopy(base), tmp_path / "adapter")
    spec = ArchSpec.from_model(base)
    assert set(tv) == {(i, k) for i in range(spec.num_layers) for k in LINEAR_KINDS}
    for (i, k), d in tv.items():
        added = spec.linear(merged, i, k).weight - spec.linear(base, i, k).weight
        assert torch.allclose(d, added, atol=1e-5) and int(torch.linalg.matrix_rank(d)) == 2
    assert type(spec.linear(teacher, 0, "q")) is torch.nn.Linear  # the adapter is gone, the weights untouched
    assert all(torch.equal(w, base.state_dict()[n]) for n, w in teacher.state_dict().items())
    with pytest.raises(PktError, match="no LoRA adapter there"):
        task_vector_from_adapter(base, tmp_path)
    with pytest.raises(PktError, match="no calibration sequences"):
        transfer(base, copy.deepcopy(base), tv, [], EXACT)


def test_the_rank_cap_truncates_each_update(tok):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    tv = planted(teacher, rank=3)
    full, _ = transfer(teacher, copy.deepcopy(teacher), tv, sequences(len(tok)), EXACT, log=lambda s: None)
    capped, _ = transfer(teacher, copy.deepcopy(teacher), tv, sequences(len(tok)),
                         EXACT.model_copy(update={"rank": 1}), log=lambda s: None)
    for k in tv:
        u, s, vh = torch.linalg.svd(full[k].double(), full_matrices=False)
        assert rel(capped[k], (u[:, :1] * s[:1]) @ vh[:1]) < 1e-6


# ---- the solves --------------------------------------------------------------------------------------------
def test_closed_form_ridge_equals_gradient_descent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 7, generator=g, dtype=torch.float64)
    b = torch.randn(60, 5, generator=g, dtype=torch.float64)
    gram, rel_ridge = x.T @ x, 0.3
    closed = ridge_solve(gram, x.T @ b, rel_ridge)  # ΔWᵀ: d_in × d_out
    lam = rel_ridge * float(torch.trace(gram)) / gram.shape[0]
    w = torch.zeros(7, 5, dtype=torch.float64, requires_grad=True)
    step = 1 / (2 * (float(torch.linalg.eigvalsh(gram).max()) + lam))
    for _ in range(3000):
        loss = (x @ w - b).square().sum() + lam * w.square().sum()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= step * grad
    err = rel(closed, w.detach())
    print(f"\nclosed-form ridge vs gradient descent: relative difference {err:.2e}")
    assert err < 1e-8


def stats_of(yt: torch.Tensor, ys: torch.Tensor) -> dict:
    """What :func:`pkt.transfer.function_transfer.collect` sums for one output space, in one go."""
    return {"ts": yt.T @ ys, "tt": yt.T @ yt, "mt": yt.sum(0), "ms": ys.sum(0), "ss": float(ys.square().sum()),
            "n": yt.shape[0]}


@pytest.mark.parametrize("n", [40, 300])  # fewer tokens than every width, and more
def test_dual_and_primal_forms_agree_on_random_matrices(n):
    g = torch.Generator().manual_seed(n)
    d_t, d_s, d_in, d_out = 120, 90, 100, 70

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    yt = randn(n, d_t) @ randn(d_t, d_t) + 3 * randn(d_t)  # correlated, off-centre outputs
    ys = yt @ randn(d_t, d_s) / 10 + randn(n, d_s) + 2 * randn(d_s)
    e, x, b = randn(n, d_t), randn(n, d_in) + randn(d_in), randn(n, d_out)
    diffs = {}
    for how in ("ridge", "procrustes"):
        primal, dual = token_map(yt, ys, how, 1e-2, dual=False), token_map(yt, ys, how, 1e-2, dual=True)
        stats = output_map(stats_of(yt, ys), how, 1e-2)  # the primal form from running sums
        assert dual.dual and not primal.dual and len(dual.factors) == 2
        diffs[f"{how} map, E M"] = max(rel(dual.apply(e), primal.apply(e)), rel(stats.apply(e), primal.apply(e)))
        if how == "ridge":
            assert dual.r2 == pytest.approx(primal.r2, abs=1e-10) and stats.r2 == pytest.approx(primal.r2, abs=1e-10)
            resid = (ys - ys.mean(0)) - (yt - yt.mean(0)) @ primal.matrix()
            assert primal.r2 == pytest.approx(1 - float(resid.square().sum() / (ys - ys.mean(0)).square().sum()))
        else:  # a partial isometry of rank min(n - 1, d_s): the centred data determine no more
            s, r = torch.linalg.svdvals(dual.matrix()), min(n - 1, d_s)
            assert torch.allclose(s[:r], torch.ones(r, dtype=s.dtype)) and float(s[r:].sum()) < 1e-8
    primal, dual = TokenRidge(x, 0.3, dual=False), TokenRidge(x, 0.3, dual=True)
    assert dual.lam == pytest.approx(primal.lam)
    diffs["ridge solve"] = max(rel(dual.solve(b), primal.solve(b)),
                               rel(ridge_solve(x.T @ x, x.T @ b, 0.3), primal.solve(b)))
    print(f"\n{n} tokens: max relative difference dual vs primal: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) < 1e-9


@pytest.mark.parametrize("how", ["ridge", "procrustes"])
@pytest.mark.parametrize("length", [12, 96])  # 48 tokens (below every FFN and the teacher's widths), 384 (above)
def test_dual_and_primal_transfers_agree_on_the_tiny_pair(tok, how, length):
    teacher, student = tiny_model("qwen2", "teacher", len(tok)), tiny_model("qwen2", "student", len(tok))
    tv, seqs = planted(teacher), sequences(len(tok), length=length)
    cfg = TransferConfig(output_map=how)
    runs = {solve: transfer(teacher, student, tv, seqs, cfg, log=lambda s: None, solve=solve)
            for solve in ("primal", "dual", "auto")}
    (ref, info_p), (dual, info_d), (auto, info_a) = runs["primal"], runs["dual"], runs["auto"]
    err = {solve: max(rel(d[k], ref[k]) for k in ref) for solve, (d, _) in runs.items() if solve != "primal"}
    n = 4 * length
    # ΔW_s is kept in float32: the forms' float64 difference (the test above) mostly vanishes in the cast
    print(f"\n{how} map, {n} tokens: max relative difference of ΔW_s (float32) from the primal statistics: dual "
          f"{err['dual']:.1e}, auto ({info_a['solved_from']}) {err['auto']:.1e}")
    assert set(dual) == set(ref) == set(auto) and max(err.values()) < 1e-7
    assert info_p["solved_from"] == "statistics" and info_d["solved_from"] == "tokens"
    assert all(r["forms"] == {"map": "primal", "solve": "primal"} for r in info_p["projections"])
    assert all(r["forms"] == {"map": "dual", "solve": "dual"} for r in info_d["projections"])
    for field in ("map_r2", "effect_ratio"):  # rounded to 4 decimals in the record (None: Procrustes' R²)
        got, want = ([r[field] or 0.0 for r in i["projections"]] for i in (info_d, info_p))
        assert got == pytest.approx(want, abs=1e-4)
    if info_a["solved_from"] == "tokens":  # each Gram in its smaller form
        t_spec = ArchSpec.from_model(teacher)
        for r in info_a["projections"]:
            d_t = t_spec.intermediate_size if r["map"] == "ffn" else t_spec.weight_shape(r["map"])[0]
            assert r["forms"]["map"] == ("dual" if n < d_t else "primal")


def test_the_real_pairs_calibration_tokens_are_solved_in_the_token_space():
    """Qwen2.5-Coder-1.5B → 0.5B widths (from their configs): the statistics of one layer take 1.4 GiB and a
    d_ff-sized factorisation ~10¹² flops; on 731 tokens the token matrices take < 100 MiB and the solves < 1/5
    of those flops, while many tokens go back to the statistics."""
    from pkt.models.arch import ConfigDims

    teacher = ConfigDims(28, 1536, 8960, 12, 2, 128, 151936, True)
    student = ConfigDims(24, 896, 4864, 14, 2, 64, 151936, True)
    assert layer_stat_bytes(student, teacher, LINEAR_KINDS, True) > 1.4 * 2**30
    assert layer_token_bytes(student, teacher, LINEAR_KINDS, 731) < 100 * 2**20
    primal_flops = layer_solve_flops(student, teacher, LINEAR_KINDS)
    assert primal_flops > 1e12 and layer_solve_flops(student, teacher, LINEAR_KINDS, 731) < primal_flops / 5
    assert solve_in_tokens(student, teacher, LINEAR_KINDS, True, 731)
    assert solve_in_tokens(student, teacher, LINEAR_KINDS, True, 12_000)
    assert not solve_in_tokens(student, teacher, LINEAR_KINDS, True, 20_000)


def test_monotone_pairing_is_the_best_non_decreasing_map():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        score = torch.rand(4, 5, generator=g, dtype=torch.float64)
        brute = max((p for p in itertools.product(range(5), repeat=4) if list(p) == sorted(p)),
                    key=lambda p: sum(float(score[i, j]) for i, j in enumerate(p)))
        got = monotone_pairing(score)
        assert got == sorted(got)
        assert sum(float(score[i, j]) for i, j in enumerate(got)) == pytest.approx(
            sum(float(score[i, j]) for i, j in enumerate(brute)))


# ---- the nulls ---------------------------------------------------------------------------------------------
def test_random_task_vector_keeps_norms_and_spectrum_not_directions(tok):
    teacher = tiny_model("qwen2", "teacher", len(tok))
    tv = planted(teacher, rank=3)
    rnd = random_task_vector(tv, seed=0)
    assert set(rnd) == set(tv)
    for k in tv:
        assert rnd[k].shape == tv[k].shape
        assert float(rnd[k].norm()) == pytest.approx(float(tv[k].norm()), rel=1e-5)
        assert torch.allclose(torch.linalg.svdvals(rnd[k])[:3], torch.linalg.svdvals(tv[k])[:3], rtol=1e-4)
        assert int(torch.linalg.matrix_rank(rnd[k])) == 3
        cos = float((rnd[k] * tv[k]).sum() / (rnd[k].norm() * tv[k].norm()))
        assert abs(cos) < 0.5
    again, other = random_task_vector(tv, seed=0), random_task_vector(tv, seed=1)
    assert all(torch.equal(again[k], rnd[k]) for k in tv)
    assert not torch.allclose(other[(0, "q")], rnd[(0, "q")])
    assert rel_norms(teacher, rnd)["rel_norm"] == pytest.approx(rel_norms(teacher, tv)["rel_norm"], rel=1e-5)


def test_shuffled_pairing_is_a_derangement_that_moves_every_layer():
    # a student of 6 layers whose outputs resemble the teacher's (8 layers) at the same relative depth
    s, t = torch.arange(6.0)[:, None] / 5, torch.arange(8.0)[None, :] / 7
    cka = 1 - (s - t).abs()
    base, _ = pair_layers(cka, TransferConfig(pairing="cka"))
    assert base == [0, 1, 3, 4, 6, 7]
    for seed in range(5):
        shuffled, info = pair_layers(cka, TransferConfig(pairing="shuffled", seed=seed))
        perm = info["derangement"]
        assert sorted(perm) == list(range(6)) and all(p != i for i, p in enumerate(perm))
        assert shuffled == [base[p] for p in perm] and all(a != b for a, b in zip(shuffled, base))
        assert info["moved"] == 6
        assert info["cka_pairing"] == base
    assert pair_layers(cka, TransferConfig(pairing="depth"))[0] == [0, 1, 3, 4, 6, 7]


# ---- the study's settings ----------------------------------------------------------------------------------
def test_the_budgets_transfer_settings_default_to_the_transfers_own():
    from pkt.config import validate
    from pkt.experiment.config import Budget, ExperimentConfig

    ft = methods.get("function-transfer")
    b = Budget()
    assert ft.transfer_cfg(b, 3) == TransferConfig(pairing="cka", seed=3)  # today's settings, so today's stage keys
    assert ft.calibration_examples(b) == b.extract_samples
    assert methods.get("function-transfer-shuffled").transfer_cfg(b, 3) == TransferConfig(pairing="shuffled", seed=3)
    assert b.transfer_map == TransferConfig().output_map and b.transfer_ridge == TransferConfig().ridge
    assert b.transfer_map_ridge == TransferConfig().map_ridge and b.transfer_monotone == TransferConfig().monotone
    assert b.transfer_rank == TransferConfig().rank

    changed = Budget(transfer_examples=3, transfer_ridge=0.1, transfer_map="procrustes", transfer_map_ridge=0.5,
                     transfer_monotone=False, transfer_rank=8)
    cfg = ft.transfer_cfg(changed, 0)
    assert (cfg.ridge, cfg.output_map, cfg.map_ridge, cfg.monotone, cfg.rank) == (0.1, "procrustes", 0.5, False, 8)
    assert ft.calibration_examples(changed) == 3
    for bad, msg in [({"transfer_map": "svd"}, r"budget.transfer_map: Input should be 'ridge' or 'procrustes'"),
                     ({"transfer_ridge": 0}, r"budget.transfer_ridge: Input should be greater than 0"),
                     ({"transfer_rank": 0}, r"budget.transfer_rank: Input should be greater than or equal to 1"),
                     ({"transfer_examples": 0}, r"budget.transfer_examples: Input should be greater than or equal")]:
        with pytest.raises(PktError, match=msg):
            validate(ExperimentConfig, {"budget": bad})
    with pytest.raises(PktError, match=r"per_task: .*gsm8k.transfer_map_ridge: Input should be greater than 0"):
        validate(ExperimentConfig, {"per_task": {"gsm8k": {"transfer_map_ridge": -1}}})


def test_the_study_reads_the_transfer_settings(tmp_path, shared_data):
    """The plan's stage names the budget's calibration examples, and the build stage's key follows the settings
    (a cached transfer is never reused for other settings)."""
    from pkt.config import validate
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.runner import Study

    tk = tiny_tokenizer()
    teacher = save_tiny(tiny_model("qwen2", "teacher", len(tk)), tk, tmp_path / "teacher")
    student = save_tiny(tiny_model("qwen2", "student", len(tk)), tk, tmp_path / "student")

    def plan(**budget):
        cfg = validate(ExperimentConfig, {"name": "ft", "teacher": teacher, "student": student, "tasks": ["gsm8k"],
                                          "seeds": [0], "methods": ["student", "function-transfer"],
                                          "analysis": False, "budget": {**TINY_BUDGET, **budget}})
        return {s["stage"]: s for s in Study(cfg, tmp_path / "run", log=lambda s: None).preflight(plan=True).stages}

    base, changed = plan(), plan(transfer_examples=1, transfer_map="procrustes")
    row = "function-transfer-gsm8k-s0"
    assert base[row]["work"].startswith("transfer the teacher's task vector on 2 calibration examples")
    assert changed[row]["work"].startswith("transfer the teacher's task vector on 1 calibration examples")
    assert base[row]["key"] != changed[row]["key"] and base["teacher-lora-gsm8k-s0"]["key"] == \
        changed["teacher-lora-gsm8k-s0"]["key"]


# ---- the methods in a study --------------------------------------------------------------------------------
def test_the_methods_run_through_a_study(tmp_path, shared_data):
    from pkt.config import validate
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.runner import Study
    from pkt.models.load import load_model

    names = ["function-transfer", "function-transfer-random", "function-transfer-shuffled"]
    assert all(methods.get(n).reads == ("teacher-lora",) for n in names)
    tk = tiny_tokenizer()
    teacher = save_tiny(tiny_model("qwen2", "teacher", len(tk)), tk, tmp_path / "teacher")
    student = save_tiny(tiny_model("qwen2", "student", len(tk)), tk, tmp_path / "student")
    cfg = validate(ExperimentConfig, {"name": "ft", "teacher": teacher, "student": student, "tasks": ["gsm8k"],
                                      "seeds": [0], "methods": ["student", *names], "dtype": "float32",
                                      "teacher_dtype": "float32", "eval_dtype": "float32", "analysis": False,
                                      "budget": TINY_BUDGET, "keep_checkpoints": True})
    study = Study(cfg, tmp_path / "run", log=lambda s: None)
    plan = study.preflight(plan=True)
    rows = {s["stage"]: s for s in plan.stages}
    assert "teacher-lora-gsm8k-s0" in rows and rows["function-transfer-gsm8k-s0"]["bytes"] > 0
    assert rows["function-transfer-gsm8k-s0"]["work"].startswith("transfer the teacher's task vector on 2")

    result = study.run()
    recs = {r["method"]: r for r in result["records"]}
    assert set(names) <= set(recs) and "teacher-lora" not in recs  # read, not evaluated
    base = load_model(student, dtype="float32").state_dict()
    built = {}
    for n in names:
        stage = Path(recs[n]["model_dir"]).parent
        built[n] = json.loads((stage / "stage.json").read_text())["result"]
        r = built[n]
        assert r["kinds"] == list(LINEAR_KINDS) and r["n_sequences"] == 2 and r["passes"] == 1
        assert len(r["teacher_layers"]) == 3 and len(r["cka"]) == 3 and len(r["cka"][0]) == 4
        assert len(r["rel_norm_per_projection"]) == 3 * 7 and 0 < r["rel_norm"] < 1
        assert r["surviving"]["changed"] > 0 and r["surviving"]["fraction"] == 1.0  # evaluated in float32
        assert recs[n]["precision"]["changed"] == r["surviving"]["changed"]
        changed = [k for k, w in load_model(recs[n]["model_dir"]).state_dict().items()
                   if not torch.equal(w, base[k])]
        assert changed and all(any(p in k for p in ("_proj",)) for k in changed)
    ft, rnd, shf = (built[n] for n in names)
    assert rnd["task_vector"] == "random" and ft["task_vector"] == "teacher"
    assert rnd["teacher_rel_norm"] == pytest.approx(ft["teacher_rel_norm"], rel=1e-4)
    assert rnd["rel_norm_per_projection"] != ft["rel_norm_per_projection"]
    assert ft["teacher_layers"] == ft["cka_pairing"] and shf["cka_pairing"] == ft["cka_pairing"]
    # the CKA pairing deranged (a teacher layer shared by two student layers can stay where it was)
    perm, base = shf["derangement"], ft["cka_pairing"]
    assert sorted(perm) == list(range(3)) and all(p != i for i, p in enumerate(perm))
    assert shf["teacher_layers"] == [base[p] for p in perm] != base
    assert shf["moved"] == sum(a != b for a, b in zip(shf["teacher_layers"], base)) > 0
    # the report pairs function-transfer with each null (vs student and vs LoRA are the table's own columns)
    md = (tmp_path / "run" / "results.md").read_text()
    for null in names[1:]:
        assert f"| function-transfer − {null} | gsm8k | 1 |" in md
