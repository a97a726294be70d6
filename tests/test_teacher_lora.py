"""teacher-lora on the tiny pair: a config names it, the plan costs it at the teacher's size, the run fine-tunes
the teacher (not the student) with lora's settings, and its evaluation measures the change against the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pkt import methods
from pkt.config import validate
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.runner import Study
from pkt.models.load import load_model
from pkt.testing import TINY_BUDGET, save_tiny, tiny_model, tiny_tokenizer


def test_teacher_lora_fine_tunes_the_teacher(tmp_path, shared_data):
    tok = tiny_tokenizer()
    teacher = save_tiny(tiny_model("qwen2", "teacher", len(tok)), tok, tmp_path / "teacher")
    student = save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp_path / "student")
    cfg = validate(ExperimentConfig, {"name": "tl", "teacher": teacher, "student": student, "tasks": ["gsm8k"],
                                      "seeds": [0], "methods": ["student", "teacher", "lora", "teacher-lora"],
                                      "dtype": "float32", "teacher_dtype": "float32", "eval_dtype": "float32",
                                      "analysis": False, "budget": TINY_BUDGET, "keep_checkpoints": True})
    study = Study(cfg, tmp_path / "run", log=lambda s: None)
    plan = study.preflight(plan=True)
    rows = {s["stage"]: s for s in plan.stages}
    # the same fine-tuning, costed at the teacher's size (its adapter and optimiser state: the wider model's)
    assert rows["teacher-lora-gsm8k-s0"]["bytes"] > rows["lora-gsm8k-s0"]["bytes"] > 0
    assert rows["teacher-lora-gsm8k-s0"]["work"].startswith("fine-tune the teacher on 4 examples")
    assert methods.get("teacher-lora").sized_as == "teacher"

    result = study.run()
    rows = {r["method"]: r for r in result["records"]}
    merged = Path(rows["teacher-lora"]["model_dir"])
    tuned = load_model(str(merged), dtype="float32")
    base = load_model(teacher, dtype="float32")
    assert tuned.config.hidden_size == base.config.hidden_size != load_model(student).config.hidden_size
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj")) for n in changed)
    # its precision check measured the change against the teacher it was built from
    assert rows["teacher-lora"]["precision"]["changed"] > 0
    # lora's fine-tuning settings exactly (rank, rate, steps, batches, seed): the run summaries agree on them
    runs = {m: json.loads((Path(rows[m]["model_dir"]).parent / "summary.json").read_text())
            for m in ("lora", "teacher-lora")}
    assert runs["teacher-lora"]["config"] == runs["lora"]["config"]
    assert runs["teacher-lora"]["student"] == teacher and runs["lora"]["student"] == student  # what each tuned
    # the report compares it with the teacher it was fine-tuned from (does the split teach the teacher?)
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| teacher-lora − teacher | gsm8k | 1 |" in md
