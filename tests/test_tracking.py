"""Training logs through accelerate's trackers: TensorBoard event files hold exactly the loops' own logs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pkt import tracking
from pkt.align.finetune import FinetuneConfig, finetune, train_and_save
from pkt.align.lora_init import make_lora_model
from pkt.data.chat import IGNORE, collate, tokenize_example
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError

EXAMPLES = [ChatExample(f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}")
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]
CFG = dict(r=4, alpha=8, lr=1e-2, batch_size=6, micro_batch_size=3, epochs=3, max_length=64, dropout=0.0,
           warmup_ratio=0.0)
TAGS = ("loss", "lr", "grad_norm", "tokens_per_s")


def _assert_matches(scalars: dict, rows: list[dict], tags=TAGS):
    for tag in tags:
        got = scalars[tag]
        assert [s for s, _ in got] == [r["step"] for r in rows], tag
        # event files store float32
        assert [v for _, v in got] == pytest.approx([r[tag] for r in rows], rel=1e-6, abs=1e-12), tag


def test_finetune_tensorboard_scalars_equal_the_loop_log(qwen_pair, tmp_path):
    _, student, tok = qwen_pair
    model = make_lora_model(student, "lora", r=4, alpha=8, dropout=0.0)
    out = tmp_path / "run"
    train_and_save(model, tok, EXAMPLES, FinetuneConfig(**CFG), "lora", out, progress=False)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    scalars = tracking.read_tensorboard(out / "logs" / "finetune")
    _assert_matches(scalars, rows)
    assert json.loads((out / "summary.json").read_text())["report_to"] == "tensorboard"
    # linear schedule without warm-up: lr_k = lr (1 - (k-1)/total)
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * (1 - k / 3) for k in range(3)])
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]) for r in rows)


def test_logged_grad_norm_is_the_norm_of_the_first_steps_gradient(qwen_pair):
    """Oracle: one step over all examples is the mean token loss of the whole set; its gradient's norm,
    computed here by hand on a copy, is what the loop logs (before clipping)."""
    _, student, tok = qwen_pair
    model = make_lora_model(student, "lora", r=4, alpha=8, dropout=0.0)
    # B=0 at init gives A no gradient; give B a value so that every LoRA factor gets one
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    cfg = FinetuneConfig(**{**CFG, "epochs": 1, "max_grad_norm": 1e-3})
    logs = finetune(model, tok, EXAMPLES, cfg, progress=False)
    feats = [tokenize_example(e, tok, "chat", 64) for e in EXAMPLES]
    batch = collate(feats, tok.pad_token_id)
    ref.train()
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    (loss / (labels != IGNORE).sum()).backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ref.parameters() if p.requires_grad)).item()
    assert norm > 1e-3  # so clipping happened, and the logged value is still the norm before it
    assert logs[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_report_to_none_writes_no_tracker_files(qwen_pair, tmp_path):
    _, student, tok = qwen_pair
    model = make_lora_model(student, "lora", r=4, alpha=8, dropout=0.0)
    out = tmp_path / "run"
    train_and_save(model, tok, EXAMPLES, FinetuneConfig(**CFG, report_to="none"), "lora", out, progress=False)
    assert not (out / "logs").exists() and (out / "train_log.jsonl").is_file()


def test_report_to_is_checked_with_the_setting_named(monkeypatch):
    with pytest.raises(PktError, match="report_to 'comet': expected one of tensorboard, trackio, wandb, mlflow, none"):
        FinetuneConfig(report_to="comet")
    monkeypatch.setattr(tracking, "_available", lambda name: False)
    with pytest.raises(PktError,
                       match=r"report_to 'wandb': the wandb package is not installed \(pip install 'pkt\[wandb\]'\)"):
        FinetuneConfig(report_to="wandb")
    # not part of the dumped settings: switching trackers changes no stage key, no saved run config
    assert "report_to" not in FinetuneConfig(report_to="none").model_dump()


def test_training_log_keeps_numbers_only(tmp_path):
    rows = [{"step": 1, "loss": 2.5, "lr": 1e-3, "example": "gsm_1", "ok": True, "layers": [1, 2]},
            {"step": 2, "loss": float("nan"), "lr": 5e-4, "example": "gsm_2"}]
    with tracking.TrainingLog("tensorboard", tmp_path, "unit", config={"targets": ["q", "v"], "r": 4}) as tl:
        for r in rows:
            tl.log(r)
        log_dir = tl.log_dir
    s = tracking.read_tensorboard(log_dir)
    assert sorted(s) == ["loss", "lr"]
    assert s["lr"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(5e-4))]
    assert s["loss"] == [(1, 2.5)]  # a non-finite value is not sent


def test_laten_tensorboard_scalars_equal_the_loop_log(qwen_pair, tmp_path):
    from pkt.data.jsonl import write_chat_jsonl
    from pkt.laten import LatenConfig, train, wrap_models

    teacher, student, tok = qwen_pair
    rows = [ChatExample(f"What is {i} + 1?", f"{i} + 1 = {i + 1}. So the answer is {i + 1}.", {"id": f"e{i}"})
            for i in range(5)]
    paths = {}
    for name, sub in (("extract", rows[:2]), ("align", rows[2:]), ("train", rows)):
        paths[name] = tmp_path / f"{name}.jsonl"
        write_chat_jsonl(sub, paths[name])
    cfg = LatenConfig(extract_file=str(paths["extract"]), align_file=str(paths["align"]), seed_file=str(paths["train"]),
                      batch_size=3, micro_batch=2, cutoff_len=64, transfer_rate=0.25, init="kaiming", vocab_top=32,
                      chunk=16, teacher="unused", student="unused")
    run = tmp_path / "run"
    log = train(cfg, run, models=wrap_models(teacher, student, tok), progress=False, log=lambda s: None)
    assert [r["step"] for r in log] == [1, 2]
    _assert_matches(tracking.read_tensorboard(run / "logs" / "laten"), log, ("loss", "lm_loss", "lr", "grad_norm"))


def test_loss_curves_for_the_report(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.5, "lr": 5e-4}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = tracking.read_loss_curve(log)
    assert curve == [(1, 2.0), (2, 1.5)]
    png = tracking.plot_loss_curves({"lora (gsm8k, seed 0)": curve, "empty": []}, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tracking.plot_loss_curves({"empty": []}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_seed_bands_average_each_step_over_the_seeds_that_logged_it(tmp_path):
    curves = {"lora (gsm8k, seed 0)": [(1, 2.0), (2, 1.0)], "lora (gsm8k, seed 1)": [(1, 4.0)],
              "laten (humaneval, seed 0)": [(1, 0.5)]}
    assert tracking.seed_bands(curves) == {"gsm8k": {"lora": [(1, 3.0, 2.0, 4.0, 2), (2, 1.0, 1.0, 1.0, 1)]},
                                           "humaneval": {"laten": [(1, 0.5, 0.5, 0.5, 1)]}}
    # a label outside the study's pattern: no grouping, a line per label
    assert tracking.seed_bands({"lora (gsm8k, seed 0)": [(1, 1.0)], "my run": [(1, 1.0)]}) is None
    for name, c in (("bands.png", curves), ("plain.png", {"my run": [(1, 1.0), (2, 0.5)]})):
        assert tracking.plot_loss_curves(c, tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_curves_find_each_trained_arms_log(tmp_path):
    ft = tmp_path / "stages" / "lora-gsm8k-s0-abc" / "run"
    (ft / "merged").mkdir(parents=True)
    (ft / "train_log.jsonl").write_text('{"step": 1, "loss": 1.25}\n{"step": 2, "loss": 0.75}\n')
    lt = tmp_path / "stages" / "laten-gsm8k-s0-def"
    (lt / "fused").mkdir(parents=True)
    (lt / "train").mkdir()
    (lt / "train" / "log.jsonl").write_text('{"step": 1, "loss": 3.5, "lm_loss": 3.0}\n')
    records = [{"method": "student", "task": "gsm8k", "seed": 0, "model_dir": "qwen2.5-coder-0.5b-instruct"},
               {"method": "lora", "task": "gsm8k", "seed": 0, "model_dir": str(ft / "merged")},
               {"method": "laten", "task": "gsm8k", "seed": 0, "model_dir": str(lt / "fused")}]
    assert tracking.study_curves(records) == {"lora (gsm8k, seed 0)": [(1, 1.25), (2, 0.75)],
                                              "laten (gsm8k, seed 0)": [(1, 3.5)]}
    assert tracking.study_loss_curves(records, tmp_path) == tmp_path / "loss_curves.png"
