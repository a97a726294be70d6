"""Model cards: every checkpoint and adapter pkt writes has a README.md that huggingface_hub parses, whose
fields (base model hub id, library, tags, datasets, licence, evaluation results) match the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

from pkt import cards, testing
from pkt.align.finetune import FinetuneConfig, train_and_save
from pkt.align.lora_init import make_lora_model
from pkt.data.jsonl import ChatExample

STUDENT_HUB = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
TEACHER_HUB = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
EXAMPLES = [ChatExample(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.") for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
CFG = dict(r=4, alpha=8, lr=1e-2, batch_size=4, micro_batch_size=2, epochs=1, max_length=64, dropout=0.0)


def test_hub_id_never_a_local_path(tmp_path, monkeypatch):
    assert cards.hub_id("qwen2.5-coder-0.5b-instruct") == STUDENT_HUB
    assert cards.hub_id("someone/some-model") == "someone/some-model"
    monkeypatch.setenv("PKT_HOME", str(tmp_path / "home"))
    prepared = tmp_path / "home" / "models" / "qwen2.5-coder-0.5b-instruct"
    prepared.mkdir(parents=True)
    assert cards.hub_id(str(prepared)) == STUDENT_HUB  # the prepared cache copy is that model
    other = tmp_path / "my" / "model"
    other.mkdir(parents=True)
    assert cards.hub_id(str(other)) is None and cards.hub_id("./model") is None
    assert cards.license_of("qwen2.5-coder-0.5b-instruct") == "apache-2.0"
    assert cards.license_of(str(other)) is None


@pytest.fixture
def run_dir(qwen_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    _, student, tok = qwen_pair
    path = testing.save_tiny(student, tok, tmp_path / "student")
    model = make_lora_model(AutoModelForCausalLM.from_pretrained(path), "pissa", r=4, alpha=8, dropout=0.0)
    out = tmp_path / "run"
    summary = train_and_save(model, tok, EXAMPLES, FinetuneConfig(**CFG), "pissa", out, progress=False,
                             extra={"task": "gsm8k", "teacher": str(tmp_path / "teacher"), "student": str(path)})
    return out, summary


def test_every_written_directory_has_a_card_without_machine_paths(run_dir, tmp_path):
    out, summary = run_dir
    for sub, library in (("merged", "transformers"), ("adapter", "peft"), ("adapter_init", "peft")):
        card = ModelCard.load(out / sub / "README.md")
        assert card.data.library_name == library
        assert card.data.tags == ["pkt", "pissa"] and card.data.datasets == ["openai/gsm8k"]
        assert card.data.base_model is None  # a local student has no hub id; its path is not a base_model
        assert str(tmp_path) not in str(card) and "More Information Needed" not in str(card)
        assert f"{summary['steps']} optimizer steps" in card.text and "PiSSA" in card.text


def test_card_fields_match_the_run_for_an_embedded_student(run_dir):
    out, summary = run_dir
    run = {**summary, "student": "qwen2.5-coder-0.5b-instruct", "teacher": "qwen2.5-coder-1.5b-instruct"}
    cards.write_run_cards(out, run,
                          command="pkt postpkt --student qwen2.5-coder-0.5b-instruct --task gsm8k --init pissa")
    adapter = ModelCard.load(out / "adapter" / "README.md")
    merged = ModelCard.load(out / "merged" / "README.md")
    for card in (adapter, merged):
        assert card.data.base_model == STUDENT_HUB and card.data.license == "apache-2.0"
        assert card.data.tags == ["pkt", "pissa"] and card.data.datasets == ["openai/gsm8k"]
        assert TEACHER_HUB in card.text and "pkt postpkt --student qwen2.5-coder-0.5b-instruct" in card.text
        assert card.data.eval_results is None  # not evaluated yet
    # the adapter's own config names the hub id too (peft wrote the local path there)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == STUDENT_HUB


def test_evaluation_results_go_into_the_model_index(run_dir):
    out, summary = run_dir
    cards.write_run_cards(out, {**summary, "student": "qwen2.5-coder-0.5b-instruct"}, command="pkt run study.yaml")
    cards.add_results(out / "merged", [{"task": "gsm8k", "score": 0.375, "n": 8}, {"task": "humaneval", "score": 0.25}])
    card = ModelCard.load(out / "merged" / "README.md")
    assert card.data.base_model == STUDENT_HUB and card.data.tags == ["pkt", "pissa"]  # kept
    got = {(r.dataset_type, r.metric_type, r.metric_value, r.dataset_split) for r in card.data.eval_results}
    assert got == {("openai/gsm8k", "accuracy", 0.375, "test"), ("openai/openai_humaneval", "pass@1", 0.25, "test")}
    assert card.data.model_name  # model-index needs a name
    assert "model-index" in (out / "merged" / "README.md").read_text()


def test_adapter_loads_with_plain_peft_on_the_named_base(run_dir, tmp_path):
    """The adapter card's base_model is what `PeftModel.from_pretrained` is applied to; for a local student
    pkt keeps the user's directory in adapter_config.json, and the adapter loads onto it unchanged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, summary = run_dir
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base_dir = cfg["base_model_name_or_path"]
    assert base_dir == summary["student"]  # the directory the user gave, not a cache path
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_laten_fused_checkpoint_has_a_card(qwen_pair, tmp_path):
    from pkt.data.jsonl import write_chat_jsonl
    from pkt.laten import LatenConfig, apply, train, wrap_models

    teacher, student, tok = qwen_pair
    rows = [ChatExample(f"What is {i} + 1?", f"{i} + 1 = {i + 1}.", {"id": f"e{i}"}) for i in range(4)]
    paths = {}
    for name, sub in (("extract", rows[:1]), ("align", rows[1:]), ("train", rows)):
        paths[name] = tmp_path / f"{name}.jsonl"
        write_chat_jsonl(sub, paths[name])
    cfg = LatenConfig(extract_file=str(paths["extract"]), align_file=str(paths["align"]), seed_file=str(paths["train"]),
                      batch_size=2, micro_batch=2, cutoff_len=64, transfer_rate=0.25, vocab_top=32, chunk=16,
                      teacher="qwen2.5-coder-1.5b-instruct", student="qwen2.5-coder-0.5b-instruct", report_to="none")
    models = wrap_models(teacher, student, tok)
    train(cfg, tmp_path / "run", models=models, progress=False, log=lambda s: None)
    apply(tmp_path / "run", 1, 0.25, tmp_path / "fused", models=models, log=lambda s: None)
    card = ModelCard.load(tmp_path / "fused" / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["pkt", "laten"]
    assert card.data.base_model == STUDENT_HUB and card.data.datasets == ["openai/gsm8k"]
    assert TEACHER_HUB in card.text and "hypernetwork step:** 1" in card.text


def test_cli_card_records_the_command(tmp_path, tiny_tok):
    data = tmp_path / "data" / "pkt_splits" / "gsm"
    data.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(4)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = testing.save_tiny(testing.tiny_model("qwen2", "student", len(tiny_tok)), tiny_tok, tmp_path / "student")
    out = tmp_path / "run"
    args = ["postpkt", "--student", str(s), "--task", "gsm8k", "--init", "lora", "--out", str(out), "--r", "2",
            "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "64", "--epochs", "1", "--quiet"]
    p = subprocess.run([sys.executable, "-m", "pkt.cli", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PKT_DATA_DIR": str(tmp_path / "data")})
    assert p.returncode == 0, p.stderr
    card = ModelCard.load(out / "adapter" / "README.md")
    assert "pkt postpkt --student" in card.text and "--init lora" in card.text
    assert card.data.tags == ["pkt", "lora"]


def test_study_results_reach_the_checkpoint_and_adapter_cards_only_of_pkt_models(run_dir, tmp_path):
    out, summary = run_dir
    users_model = tmp_path / "users_teacher"
    users_model.mkdir()
    (users_model / "README.md").write_text("---\nlicense: mit\n---\n# someone else's model\n")
    before = (users_model / "README.md").read_text()
    cards.add_study_results([
        {"method": "pissa", "task": "gsm8k", "seed": 0, "score": 0.5, "n": 8, "model_dir": str(out / "merged")},
        {"method": "teacher", "task": "gsm8k", "seed": 0, "score": 0.75, "n": 8, "model_dir": str(users_model)},
        {"method": "student", "task": "gsm8k", "seed": 0, "score": 0.25, "n": 8,
         "model_dir": "qwen2.5-coder-0.5b-instruct"}])
    for sub in ("merged", "adapter"):
        res = ModelCard.load(out / sub / "README.md").data.eval_results
        assert [(r.dataset_type, r.metric_value) for r in res] == [("openai/gsm8k", 0.5)]
    assert ModelCard.load(out / "adapter_init" / "README.md").data.eval_results is None
    assert (users_model / "README.md").read_text() == before


def test_study_cards_curves_data_and_tracker(tmp_path, qwen_pair, shared_data):
    """`pkt run` on the tiny pair with `data:` and `report_to:`: the fine-tuned arm trains on the conversations,
    logs to TensorBoard in its stage, its cards carry the study's score, report.html shows the loss curves."""
    import yaml

    from pkt.config import validate
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.runner import Study
    from pkt.tracking import read_tensorboard

    teacher, student, tok = qwen_pair
    t = testing.save_tiny(teacher, tok, tmp_path / "teacher")
    s = testing.save_tiny(student, tok, tmp_path / "student")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"{i + 1}."}]}) + "\n" for i in range(4)))
    budget = dict(train_examples=4, epochs=1, batch_size=2, max_length=96, rank=2, alpha=2, laten_choice="fixed",
                  laten_steps=1, laten_batch=2, eval_limit=2, eval_max_new_tokens=4, loss_examples=2)
    data = {"name": "tiny", "teacher": t, "student": s, "tasks": ["gsm8k"], "seeds": [0], "dtype": "float32",
            "teacher_dtype": "float32", "methods": ["student", "lora", "laten"], "analysis": False,
            "budget": budget, "data": str(chat), "report_to": "tensorboard", "keep_checkpoints": True}
    cfg = validate(ExperimentConfig, data)
    out = tmp_path / "study"
    Study(cfg, out, config_text=yaml.safe_dump(data), log=lambda m: None).run()
    records = {r["method"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    lora_run = next((out / "stages").glob("lora-gsm8k-s0*")) / "run"
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["data_source"] == str(chat) and summary["n_train"] == 4
    logged = read_tensorboard(lora_run / "logs" / "finetune")
    assert [v for _, v in logged["loss"]] == pytest.approx(
        [json.loads(x)["loss"] for x in (lora_run / "train_log.jsonl").read_text().splitlines()], rel=1e-6)
    laten_stage = next((out / "stages").glob("laten-gsm8k-s0*"))
    assert "loss" in read_tensorboard(laten_stage / "train" / "logs" / "laten")
    for d in (lora_run / "merged", lora_run / "adapter"):
        res = ModelCard.load(d / "README.md").data.eval_results
        assert [(r.dataset_type, r.metric_value) for r in res] == [("openai/gsm8k", records["lora"]["score"])]
    assert ModelCard.load(laten_stage / "fused" / "README.md").data.eval_results[0].metric_value == \
        records["laten"]["score"]
    assert (out / "loss_curves.png").is_file() and 'alt="loss_curves"' in (out / "report.html").read_text()


def test_study_config_checks_data_and_tracker_first(tmp_path):
    from pkt.config import validate
    from pkt.errors import PktError
    from pkt.experiment.config import ExperimentConfig

    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    with pytest.raises(PktError, match=f"data: .*{bad.name}:1: the last turn must be the assistant's"):
        validate(ExperimentConfig, {"data": str(bad)})
    with pytest.raises(PktError, match="report_to: .*expected one of tensorboard"):
        validate(ExperimentConfig, {"report_to": "paper"})
