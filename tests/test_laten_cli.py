"""LaTen orchestration on tiny pairs: pairing and GQA mapping, training, apply (fused checkpoint), CLI."""

from __future__ import annotations

import json

import pytest
import torch

from pkt import testing
from pkt.data.jsonl import ChatExample, write_chat_jsonl
from pkt.errors import PktError
from pkt.inject import dense, load_deltas
from pkt.locate.pairing import counts, extract, pair, pair_v, to_deltas, v_rows
from pkt.laten import (LatenConfig, ckpt_path, wrap_models,
                       apply, locate, train)
from pkt.align.hypernet import HyperNet
from pkt.models.arch import ArchSpec

Q = [("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7. So the answer is 7."),
     ("A pen costs 2 dollars. How much do 5 pens cost?", "5 * 2 = 10. So the answer is 10."),
     ("Sam reads 6 pages a day. How many in 3 days?", "6 * 3 = 18. So the answer is 18."),
     ("Half of 48 clips?", "48 / 2 = 24. So the answer is 24."),
     ("What is 9 minus 5?", "9 - 5 = 4. So the answer is 4.")]


@pytest.fixture
def data(tmp_path):
    rows = [ChatExample(u, a, {"id": f"ex{i}"}) for i, (u, a) in enumerate(Q)]
    paths = {}
    for name, sub in (("extract", rows[:2]), ("align", rows[2:]), ("train", rows)):
        paths[name] = tmp_path / f"{name}.jsonl"
        write_chat_jsonl(sub, paths[name])
    return paths


def _cfg(data, **kw):
    base = dict(extract_file=str(data["extract"]), align_file=str(data["align"]), seed_file=str(data["train"]),
                batch_size=3, micro_batch=2, cutoff_len=64, transfer_rate=0.25, init="kaiming", vocab_top=32,
                chunk=16, teacher="unused", student="unused")
    return LatenConfig(**{**base, **kw})


def test_v_rows_under_gqa_and_dedup(qwen_pair):
    teacher, student, _ = qwen_pair
    s = ArchSpec.from_model(student)  # 6 query heads, 2 kv heads, head_dim 8: group 3
    t = ArchSpec.from_model(teacher)  # 4 query heads, 2 kv heads, head_dim 16: group 2
    assert s.gqa_group == 3 and t.gqa_group == 2
    assert v_rows(torch.tensor([4 * 8 + 5]), s).tolist() == [1 * 8 + 5]  # head 4 -> kv head 1
    assert v_rows(torch.tensor([3 * 16 + 2]), t).tolist() == [1 * 16 + 2]  # head 3 -> kv head 1
    # student neurons (h0,j1) (h1,j1) (h3,j1) (h2,j7): rows 1, 1, 9, 7 -> keep ranks 0, 2, 3
    s_idx = torch.tensor([0 * 8 + 1, 1 * 8 + 1, 3 * 8 + 1, 2 * 8 + 7])
    t_idx = torch.tensor([0, 17, 33, 50])
    t_rows, s_rows = pair_v(t_idx, s_idx, t, s)
    assert s_rows.tolist() == [1, 9, 7]
    # teacher 33 = (h2, j1) -> kv head 1 -> row 17; 50 = (h3, j2) -> row 18
    assert t_rows.tolist() == v_rows(torch.tensor([0, 33, 50]), t).tolist() == [0, 16 + 1, 16 + 2]


def test_pairing_counts_layers_and_rank_matching(tiny_pair):
    from pkt.locate.attribution import attribute_example

    teacher, student, tok = tiny_pair
    t, s = ArchSpec.from_model(teacher), ArchSpec.from_model(student)
    ex = ChatExample(*Q[0])
    ta, sa = attribute_example(teacher, tok, ex), attribute_example(student, tok, ex)
    p = pair(ta, sa, t, s, 0.25)
    n_ffn, n_attn = counts(s, t, 0.25)
    assert (n_ffn, n_attn) == (int(0.25 * s.intermediate_size), int(0.25 * s.q_dim))
    assert p.ffn_layers == sorted(torch.topk(ta.ffn_layers, s.num_layers).indices.tolist())
    assert p.attn_layers == sorted(torch.topk(ta.attn_layers, s.num_layers).indices.tolist())
    for i, (ti, si) in enumerate(p.ffn):
        assert ti.numel() == si.numel() == n_ffn
        tl = ta.ffn_neurons[p.ffn_layers[i]]
        assert bool((tl[ti][:-1] >= tl[ti][1:]).all())  # rank order
        assert bool((sa.ffn_neurons[i][si][:-1] >= sa.ffn_neurons[i][si][1:]).all())
    with pytest.raises(PktError):
        counts(s, t, 1e-4)


def test_extract_and_deltas_shapes(qwen_pair, data):
    teacher, student, tok = qwen_pair
    m = wrap_models(teacher, student, tok)
    cfg = _cfg(data, modules=["gate", "up", "down", "v", "o"])
    p = locate(m, ChatExample(*Q[0]), cfg, cfg.transfer_rate)
    sources, sites = extract(teacher, m.t_spec, m.s_spec, p, cfg.modules)
    for kind, vecs in sources.items():
        assert vecs.shape[1] == m.t_spec.hidden_size
    t_idx, _ = p.ffn[0]
    torch.testing.assert_close(sources["down"][: t_idx.numel()],
                               teacher.model.layers[p.ffn_layers[0]].mlp.down_proj.weight[:, t_idx].T)
    deltas = to_deltas({k: torch.zeros(v.shape[0], m.s_spec.hidden_size) for k, v in sources.items()}, sites)
    assert {k for _, k in deltas} == set(cfg.modules) and len(deltas) == 5 * m.s_spec.num_layers


def test_train_and_apply(qwen_pair, data, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, student, tok = qwen_pair
    original = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = _cfg(data)
    run = tmp_path / "run"
    rows = train(cfg, run, models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    h0, h2 = HyperNet.load(ckpt_path(run, 0)), HyperNet.load(ckpt_path(run, 2))
    assert not torch.equal(h0.nets["up"].fc2.weight, h2.nets["up"].fc2.weight)  # the LM loss reached H
    assert all(torch.equal(v, original[k]) for k, v in student.state_dict().items())  # student frozen
    # resume: nothing left to do, same log
    again = train(cfg, run, models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)
    assert again == rows
    # schedule "extract": stopping early and continuing gives the same schedule (it spans the extract split)
    ext = _cfg(data, schedule="extract")
    part = train(_cfg(data, max_steps=1, schedule="extract"), tmp_path / "r1", models=wrap_models(teacher, student, tok),
                 progress=False, log=lambda s: None)
    rest = train(ext, tmp_path / "r1", models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)
    assert len(part) == 1 and [r["lr"] for r in rest] == [r["lr"] for r in rows]
    torch.testing.assert_close(HyperNet.load(ckpt_path(tmp_path / "r1", 2)).nets["o"].fc2.weight,
                               h2.nets["o"].fc2.weight)
    # schedule "trained" (the default): a 1-step run is a different run, not a prefix of the 2-step one
    with pytest.raises(PktError, match="max_steps"):
        train(_cfg(data, max_steps=1), run, models=wrap_models(teacher, student, tok), progress=False,
              log=lambda s: None)
    with pytest.raises(PktError):
        train(_cfg(data, lr=1e-3), run, models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)

    manifest, deltas = apply(run, 2, 0.25, tmp_path / "fused", models=wrap_models(teacher, student, tok),
                             log=lambda s: None)
    assert manifest["step"] == 2 and manifest["ffn_per_layer"] == int(0.25 * 112)
    spec = ArchSpec.from_model(student)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).state_dict()
    touched = set()
    for (layer, kind), (idx, val) in deltas.items():
        name = spec.module_name(layer, kind) + ".weight"
        touched.add(name)
        want = dense(spec, kind, idx, val)
        diff = reloaded[name] - original[name]
        torch.testing.assert_close(diff, want, atol=1e-6, rtol=0)
        assert torch.equal(diff[want == 0], torch.zeros_like(diff[want == 0]))
        assert float(want.abs().max()) > 0
    assert all(torch.equal(reloaded[k], original[k]) for k in reloaded if k not in touched)
    # the translated values are H_step(teacher vectors) of the seed example's located neurons
    saved = load_deltas(tmp_path / "fused" / "laten_deltas.safetensors")
    assert set(saved) == set(deltas)
    with pytest.raises(PktError):
        apply(run, 7, 0.25, tmp_path / "x", models=wrap_models(teacher, student, tok), log=lambda s: None)


def _one_cycle_lr(lr: float, total: int, t: int, pct: float = 0.1) -> float:
    """torch's OneCycleLR (cos, final_div_factor 1) written out: warm-up ends at step pct*total - 1."""
    import math

    lo, up_end, end = lr / 25, pct * total - 1, total - 1
    if t <= up_end:
        a, b, frac = lo, lr, t / up_end
    else:
        a, b, frac = lr, lo, (t - up_end) / (end - up_end)
    return b + (a - b) / 2 * (1 + math.cos(math.pi * frac))


def test_schedule_spans_the_trained_steps(llama_pair, data, tmp_path):
    teacher, student, tok = llama_pair
    rows = {}
    for sched, steps in (("trained", 1), ("extract", 1), ("trained", 2)):
        rows[sched, steps] = train(_cfg(data, max_steps=steps, schedule=sched, lr=1e-3), tmp_path / f"{sched}{steps}",
                                   models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)
    # the extract split has 2 examples: one step of its 2-step cycle vs a 1-step cycle (run at the peak)
    assert rows["extract", 1][0]["lr"] == pytest.approx(_one_cycle_lr(1e-3, 2, 0))
    assert rows["trained", 1][0]["lr"] == pytest.approx(1e-3)
    assert [r["lr"] for r in rows["trained", 2]] == pytest.approx([_one_cycle_lr(1e-3, 2, t) for t in (0, 1)])


def test_trained_laten_changes_the_student_beyond_bf16(qwen_pair, data, tmp_path):
    """Trained, applied, reloaded: the logits move by far more than bf16 rounding, and H learnt (≫ its init).

    lr 1e-2: the translator's output after k Adam steps grows roughly like (k·lr)²·d_T from its 1e-5 init,
    and the tiny teacher is 24x narrower than the real one (d_T 64 vs 1536); at 3e-4 its delta stays ~1e-5
    of the weights on this pair (docs/laten.md has the real pair's figures).
    """
    from transformers import AutoModelForCausalLM

    teacher, student, tok = qwen_pair
    cfg = _cfg(data, init="normal", lr=1e-2, max_steps=2)
    run = tmp_path / "run"
    train(cfg, run, models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)
    vanilla = {k: v.clone() for k, v in student.state_dict().items()}
    m0, _ = apply(run, 0, 0.25, tmp_path / "f0", models=wrap_models(teacher, student, tok), log=lambda s: None)
    student.load_state_dict(vanilla)  # apply fuses in place
    m2, _ = apply(run, 2, 0.25, tmp_path / "f2", models=wrap_models(teacher, student, tok), log=lambda s: None)
    student.load_state_dict(vanilla)
    assert m2["delta_rel_norm"] > 1e-3 and m2["delta_bf16_changed"] > 0.5 and m2["delta_bf16_ratio"] > 1
    assert m2["delta_rel_norm"] > 100 * m0["delta_rel_norm"]  # it learnt: not the init's ~1e-10 delta
    assert m0["delta_bf16_changed"] == 0
    ids = tok("Tom has 3 apples and buys 4 more. How many? 3 + 4 = 7", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = student(input_ids=ids).logits
        fused = AutoModelForCausalLM.from_pretrained(tmp_path / "f2", dtype=torch.float32)(input_ids=ids).logits
    bf16_resolution = float((base.bfloat16().float() - base).abs().max())  # what bf16 rounding alone moves
    assert float((fused - base).abs().max()) > 20 * bf16_resolution


def test_non_finite_loss_stops_training_before_the_step_is_saved(llama_pair, data, tmp_path):
    teacher, student, tok = llama_pair
    run = tmp_path / "run"
    with pytest.raises(PktError, match=r"laten train: loss is (nan|inf) at step 2"):
        train(_cfg(data, lr=1e30, init="kaiming"), run, models=wrap_models(teacher, student, tok), progress=False,
              log=lambda s: None)
    assert ckpt_path(run, 1).is_file() and not ckpt_path(run, 2).exists()  # the diverged step left nothing


def test_delta_stats_oracle(qwen_pair):
    from pkt.inject import delta_stats

    _, student, _ = qwen_pair
    spec = ArchSpec.from_model(student)
    up = spec.linear(student, 0, "up").weight.detach()
    down = spec.linear(student, 1, "down").weight.detach()
    rows, cols = torch.tensor([0, 3, 5]), torch.tensor([1, 2])
    deltas = {(0, "up"): (rows, 0.5 * up[rows]), (1, "down"): (cols, 1e-7 * down[:, cols].T)}
    st = delta_stats(student, deltas, spec)
    assert st["per_kind"]["up"]["rel_norm"] == pytest.approx(0.5, rel=1e-5)
    assert st["per_kind"]["up"]["bf16_changed"] == pytest.approx(float((up[rows] != 0).float().mean()))
    assert st["per_kind"]["down"]["rel_norm"] == pytest.approx(1e-7, rel=1e-3)
    assert st["per_kind"]["down"]["bf16_changed"] == 0  # 1e-7 relative is far below bf16's 2^-9
    n_up, n_down = up[rows].numel(), down[:, cols].numel()
    want = ((0.25 * up[rows].pow(2).sum() + 1e-14 * down[:, cols].pow(2).sum())
            / (up[rows].pow(2).sum() + down[:, cols].pow(2).sum())).sqrt()
    assert st["rel_norm"] == pytest.approx(float(want), rel=1e-5)
    assert st["bf16_changed"] == pytest.approx(st["per_kind"]["up"]["bf16_changed"] * n_up / (n_up + n_down))
    # resolution oracle: half the gap to the next bf16 number above |w|'s bf16 neighbour below
    w = up[rows].abs().float()
    below = torch.where(w.bfloat16().float() > w, torch.nextafter(w.bfloat16(), torch.zeros_like(w.bfloat16())),
                        w.bfloat16()).float()
    half_ulp = (torch.nextafter(below.bfloat16(), torch.full_like(below.bfloat16(), float("inf"))).float() - below) / 2
    want_ratio = float((0.5 * up[rows]).norm() / half_ulp.norm())
    assert st["per_kind"]["up"]["bf16_ratio"] == pytest.approx(want_ratio, rel=1e-3)
    assert 50 < want_ratio < 300  # 0.5·W is 2^7..2^8 half-ulps: bf16 keeps 8 significant bits


def test_select_point_matches_fused_losses(qwen_pair, data, tmp_path):
    """The selection grid's losses (hooks) equal those of the fused, reloaded checkpoints; best = argmin."""
    from transformers import AutoModelForCausalLM

    from pkt.data.chat import collate, tokenize_example
    from pkt.data.jsonl import read_chat_jsonl
    from pkt.laten import lm_loss_sum, select_point

    teacher, student, tok = qwen_pair
    cfg = _cfg(data, init="normal", lr=1e-2, max_steps=2)
    run = tmp_path / "run"
    train(cfg, run, models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)
    align = read_chat_jsonl(data["align"])
    best, grid = select_point(run, [1, 2], [0.25, 0.5], align, models=wrap_models(teacher, student, tok),
                              log=lambda s: None)
    assert [(g["step"], g["rate"]) for g in grid] == [(1, 0.25), (2, 0.25), (1, 0.5), (2, 0.5)]
    vanilla = {k: v.clone() for k, v in student.state_dict().items()}
    batch = collate([tokenize_example(e, tok, "chat", 64) for e in align], tok.pad_token_id, "right")
    for g in grid:
        out = tmp_path / f"f{g['step']}-{g['rate']}"
        apply(run, g["step"], g["rate"], out, models=wrap_models(teacher, student, tok), log=lambda s: None)
        student.load_state_dict(vanilla)
        with torch.no_grad():
            fused = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            want = float(lm_loss_sum(fused, batch)) / len(align)
        assert g["align_loss"] == pytest.approx(want, rel=1e-4)
    assert best == min(grid, key=lambda g: g["align_loss"])
    assert len({round(g["align_loss"], 6) for g in grid}) > 1  # the points really differ
    with pytest.raises(PktError, match="no checkpoint for step"):
        select_point(run, [3], [0.25], align, models=wrap_models(teacher, student, tok), log=lambda s: None)


def test_step0_with_zero_output_equals_student(llama_pair, data, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, student, tok = llama_pair
    original = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = _cfg(data, init="zeros", max_steps=1)
    train(cfg, tmp_path / "run", models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)
    apply(tmp_path / "run", 0, 0.25, tmp_path / "fused", models=wrap_models(teacher, student, tok), log=lambda s: None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).state_dict()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


def test_cli_train_apply_and_errors(qwen_pair, data, tmp_path, pkt_cli):
    from transformers import AutoModelForCausalLM

    teacher, student, tok = qwen_pair
    tdir, sdir = testing.save_tiny(teacher, tok, tmp_path / "t"), testing.save_tiny(student, tok, tmp_path / "s")
    yaml_path = tmp_path / "laten.yaml"
    yaml_path.write_text(f"train:\n  teacher: {tdir}\n  student: {sdir}\n  batch_size: 3\n  cutoff_len: 64\n"
                         f"  transfer_rate: 0.25\n  init: kaiming\n  vocab_top: 32\n"
                         f"  extract_file: {data['extract']}\n  align_file: {data['align']}\n  seed_file: {data['train']}\n"
                         "apply:\n  transfer_rate: 0.5\n")
    run = tmp_path / "run"
    code, out, err = pkt_cli("laten", "train", "--config", yaml_path, "--out", run, "--steps", 1,
                             "--no-progress")
    assert code == 0, err
    assert "1 steps" in out and (run / "checkpoints" / "step-0001" / "hypernet.pt").is_file()
    assert json.loads((run / "config.json").read_text())["max_steps"] == 1
    code, out, err = pkt_cli("laten", "apply", "--config", yaml_path, "--run", run, "--step", 1,
                             "--out", tmp_path / "fused")
    assert code == 0, err
    assert json.loads(out)["transfer_rate"] == 0.5  # from the YAML apply section
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    gen = fused.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)
    code, _, err = pkt_cli("laten", "apply", "--run", run, "--step", 9, "--out", tmp_path / "x")
    assert code == 2 and "no checkpoint for step 9" in err
    code, _, err = pkt_cli("laten", "train", "--config", yaml_path, "--out", tmp_path / "r2",
                           "--transfer-rate", 2)
    assert code == 2 and "transfer_rate" in err


@pytest.mark.slow
def test_real_pair_one_step_train_and_apply(shared_data, tmp_path, pkt_cli):
    """1.5B -> 0.5B: one training step (P=2, short cutoff), apply, reload with plain transformers, generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    code, _, err = pkt_cli("laten", "train", "--out", run, "--steps", 1, "--batch-size", 2,
                           "--cutoff-len", 128, "--no-progress", "--threads", 2)
    assert code == 0, err
    code, out, err = pkt_cli("laten", "apply", "--run", run, "--step", 1, "--transfer-rate", 0.1,
                             "--out", tmp_path / "fused")
    assert code == 0, err
    assert json.loads(out)["ffn_per_layer"] == 486 and json.loads(out)["attn_per_layer"] == 89
    tok = AutoTokenizer.from_pretrained(tmp_path / "fused")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    ids = tok("Question: 2 + 3 = ?\nAnswer:", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_pkt_run_trains_the_papers_step_or_the_selection_grid(shared_data, tmp_path):
    """`pkt run`'s LaTen settings: S3 Table 4's steps per task, the grid's last step, or a fixed count; the
    schedule spans the steps trained."""
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.runner import Study
    from pkt.methods.laten import laten_cfg

    def cfg(**budget):
        return ExperimentConfig(tasks=["gsm8k", "mmlu"], budget={"loss_examples": 2, "train_examples": 4, **budget})

    paper = Study(cfg(), tmp_path / "a", log=lambda s: None)
    assert [laten_cfg(paper, t, 0).max_steps for t in ("gsm8k", "mmlu")] == [4, 2]
    assert laten_cfg(paper, "gsm8k", 0).schedule == "trained"
    grid = Study(cfg(laten_choice="select", laten_select_steps=6), tmp_path / "b", log=lambda s: None)
    assert laten_cfg(grid, "mmlu", 0).max_steps == 6
    fixed = Study(cfg(laten_choice="fixed", laten_steps=3, laten_schedule="extract"), tmp_path / "c",
                  log=lambda s: None)
    assert laten_cfg(fixed, "gsm8k", 0).max_steps == 3 and laten_cfg(fixed, "gsm8k", 0).schedule == "extract"


def test_pkt_run_laten_stage_applies_the_selected_point(shared_data, qwen_pair, tmp_path):
    """`pkt run`'s LaTen stage with laten_choice 'select': the fused model is the grid's best point."""
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.runner import Study
    from pkt.methods.laten import laten_cfg, train_and_fuse

    teacher, student, tok = qwen_pair
    t, s = testing.save_tiny(teacher, tok, tmp_path / "t"), testing.save_tiny(student, tok, tmp_path / "s")
    cfg = ExperimentConfig(teacher=t, student=s, teacher_dtype="float32", methods=["student", "laten"],
                           budget={"loss_examples": 2, "train_examples": 4, "max_length": 64, "laten_batch": 2,
                                   "laten_choice": "select", "laten_select_steps": 2, "laten_lr": 1e-2,
                                   "laten_select_rates": [0.25, 0.5], "laten_select_examples": 2})
    study = Study(cfg, tmp_path / "run", log=lambda m: None)
    lc = laten_cfg(study, "gsm8k", 0).model_copy(update={"vocab_top": 32, "chunk": 16})
    res = train_and_fuse(study, lc, tmp_path / "stage")
    grid = res["selection"]
    assert sorted((g["step"], g["rate"]) for g in grid) == [(1, 0.25), (1, 0.5), (2, 0.25), (2, 0.5)]
    best = min(grid, key=lambda g: g["align_loss"])
    assert (res["step"], res["rate"]) == (best["step"], best["rate"])
    fused = json.loads((tmp_path / "stage" / "fused" / "pkt-laten.json").read_text())
    assert (fused["step"], fused["transfer_rate"]) == (best["step"], best["rate"])
    assert res["delta_rel_norm"] == fused["delta_rel_norm"] > 0 and "bf16_ratio" in res["delta_size"]["up"]


def test_pkt_run_laten_grid_keeps_the_papers_point(shared_data, qwen_pair, tmp_path):
    """budget.laten_grid with laten_choice 'fixed': the whole (step, rate) grid is scored and recorded, the
    fused model stays at the configured step and rate, and the grid is part of the stage's key."""
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.runner import Study
    from pkt.methods.laten import laten_cfg, train_and_fuse

    teacher, student, tok = qwen_pair
    t, s = testing.save_tiny(teacher, tok, tmp_path / "t"), testing.save_tiny(student, tok, tmp_path / "s")
    budget = {"loss_examples": 2, "train_examples": 4, "max_length": 64, "laten_batch": 2, "laten_choice": "fixed",
              "laten_steps": 2, "laten_rate": 0.5, "laten_lr": 1e-2, "laten_select_rates": [0.25, 0.5],
              "laten_select_examples": 2}
    cfg = ExperimentConfig(teacher=t, student=s, teacher_dtype="float32", methods=["student", "laten"],
                           budget={**budget, "laten_grid": True})
    study = Study(cfg, tmp_path / "run", log=lambda m: None)
    lc = laten_cfg(study, "gsm8k", 0).model_copy(update={"vocab_top": 32, "chunk": 16})
    res = train_and_fuse(study, lc, tmp_path / "stage")
    assert sorted((g["step"], g["rate"]) for g in res["selection"]) == [(1, 0.25), (1, 0.5), (2, 0.25), (2, 0.5)]
    assert (res["step"], res["rate"]) == (2, 0.5)
    assert res["vanilla_align_loss"] > 0 and all(g["align_loss"] != res["vanilla_align_loss"] for g in res["selection"])
    fused = json.loads((tmp_path / "stage" / "fused" / "pkt-laten.json").read_text())
    assert (fused["step"], fused["transfer_rate"]) == (2, 0.5)
    plain = Study(ExperimentConfig(teacher=t, student=s, teacher_dtype="float32", methods=["student", "laten"],
                                   budget=budget), tmp_path / "run2", log=lambda m: None)
    keys = [{r.stage: r.key for r in x.plan_stages()}["laten-gsm8k-s0"] for x in (study, plain)]
    assert keys[0] != keys[1]
