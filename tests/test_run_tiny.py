"""`pkt run` end to end on tiny random models: every method, resume after a crash, determinism.

Uses the real GSM8K PKT splits and test set (PKT_DATA_DIR) with tiny budgets; the tiny pair stands in
for the real one so the whole pipeline (extraction, LoRA/PiSSA/Seeking SFT, LaTen, KD, evaluation,
analysis, report) runs in seconds.
"""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pkt.config import validate
from pkt.experiment.cache import StageCache, read_record
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.runner import Study
from pkt.testing import TINY_BUDGET, save_tiny, tiny_model


@pytest.fixture
def tiny_config(tmp_path, qwen_pair, shared_data):
    teacher, student, tok = qwen_pair
    t = save_tiny(teacher, tok, tmp_path / "teacher")
    s = save_tiny(student, tok, tmp_path / "student")
    data = {"name": "tiny", "teacher": t, "student": s, "tasks": ["gsm8k"], "seeds": [0], "dtype": "float32",
            "teacher_dtype": "float32", "analysis_examples": 2, "budget": TINY_BUDGET}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    return validate(ExperimentConfig, data), tmp_path


def _scores(out):
    rows = json.loads((out / "results.json").read_text())["records"]
    return {(r["method"], r["seed"]): (r["score"], r["answer_loss"], r["per_example"]) for r in rows}


def _interrupt_mid_write(monkeypatch, stages: Path, after: int) -> dict:
    """Kill the run (KeyboardInterrupt) half-way through writing a file of the stage being built, once ``after``
    stages have finished. Every stage writes at least its stage.json, through ``Path.write_text`` (pkt.io), so
    the interrupt comes inside a stage. Returns {"file": the half-written file, "stage": the directory the stage
    was being built in} once it happened."""
    real = Path.write_text
    seen = {"finished": 0}

    def write_text(self, data, *a, **k):
        building = next((d for d in self.parents if d.parent == stages), None)
        if building is None or "file" in seen:
            return real(self, data, *a, **k)
        if seen["finished"] < after:
            n = real(self, data, *a, **k)
            seen["finished"] += self.name.startswith(".stage.json.tmp")  # a stage's last file (pkt.io's temp name)
            return n
        real(self, data[: len(data) // 2], *a, **k)
        seen.update(file=self, stage=building)
        raise KeyboardInterrupt(f"simulated kill while writing {self.name}")

    monkeypatch.setattr(Path, "write_text", write_text)
    return seen


def _final_name(building: Path) -> str:
    """The name a stage built in ``building`` has once finished (pkt.io.atomic_dir builds in .<name>.tmp<pid>)."""
    return building.name.lstrip(".").split(".tmp")[0]


def _half_written(out: Path, seen: dict) -> list[str]:
    """What an interrupted stage left behind: temporary files or directories anywhere in the run, the stage's own
    directory (under its final name), or a stage directory that is not a finished stage."""
    stages = out / "stages"
    left = [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name]
    final = stages / _final_name(seen["stage"])
    if final.exists():
        left.append(f"{final.name} (the interrupted stage)")
    left += [f"{d.name} (no stage record)" for d in stages.iterdir() if d.is_dir() and read_record(d) is None]
    return left


def _stage_writing(name: str):
    """A stage that writes a few artifacts through pkt.io, as pkt's stages do."""
    from pkt.io import write_json, write_jsonl

    def fn(tmp: Path) -> dict:
        write_jsonl(tmp / "predictions.jsonl", [{"i": i, "text": "x" * 100} for i in range(50)])
        write_json(tmp / "metrics.json", {"stage": name, "score": 0.5})
        return {"stage": name}

    return fn


def test_interrupt_inside_a_stage_and_a_non_atomic_stage_directory(tmp_path, monkeypatch):
    """The checks of the whole-study test below on a three-stage cache: an interrupt while the second stage
    writes leaves nothing of it, and the same checks catch a stage directory written in place."""
    def run(out: Path) -> dict:
        cache = StageCache(out, log=lambda s: None)
        with monkeypatch.context() as m:
            seen = _interrupt_mid_write(m, cache.stages, after=1)
            with pytest.raises(KeyboardInterrupt), cache.lock():
                for name in ("a", "b", "c"):
                    cache.run(name, {"name": name}, _stage_writing(name))
        assert _final_name(seen["stage"]).startswith("b-") and seen["file"].parent == seen["stage"], seen
        return seen

    out = tmp_path / "atomic"
    seen = run(out)
    assert _half_written(out, seen) == []
    assert [d.name[:2] for d in (out / "stages").iterdir()] == ["a-"]
    cache = StageCache(out, log=lambda s: None)  # the rerun reuses a and builds b and c
    with cache.lock():
        for name in ("a", "b", "c"):
            cache.run(name, {"name": name}, _stage_writing(name))
    assert [(r.stage, r.cached) for r in cache.records] == [("a", True), ("b", False), ("c", False)]

    @contextlib.contextmanager
    def in_place(path, overwrite=True):  # a broken atomic_dir: the stage is written under its final name
        path.mkdir(parents=True, exist_ok=True)
        yield path

    import pkt.experiment.cache as cache_module

    monkeypatch.setattr(cache_module, "atomic_dir", in_place)
    out = tmp_path / "in-place"
    seen = run(out)
    b = _final_name(seen["stage"])
    assert _half_written(out, seen) == [f"{b} (the interrupted stage)", f"{b} (no stage record)"]


def test_whole_study_resume_and_determinism(tiny_config, monkeypatch):
    cfg, tmp = tiny_config
    out = tmp / "run"
    # 1) killed while a stage writes its artifacts, after some stages finished: the stage leaves nothing,
    #    finished stages are kept
    with monkeypatch.context() as m:
        seen = _interrupt_mid_write(m, out / "stages", after=3)
        with pytest.raises(KeyboardInterrupt):
            Study(cfg, out, log=lambda s: None).run()
    assert "file" in seen  # the interrupt came inside a stage
    assert _half_written(out, seen) == []
    done_before = {p.name for p in (out / "stages").iterdir()}
    assert len(done_before) == 3, done_before
    interrupted = _final_name(seen["stage"])
    # 2) resume: the finished stages are reused, not recomputed
    study = Study(cfg, out, log=lambda s: None)
    result = study.run()
    reused = {r.key for r in study.cache.records if r.cached}
    assert done_before <= reused and interrupted in {r.key for r in study.cache.records if not r.cached}
    methods = {r["method"] for r in result["rows"]}
    # the student is also evaluated in float32, the baseline of any model that falls back there
    assert methods == {"student", "student-fp32", "teacher", "lora", "pissa", "seeking", "seeking-random",
                       "seeking-shuffled", "laten", "laten-lora", "seqkd", "gkd"}
    for f in ("results.md", "results.csv", "results.json", "report.html", "manifest.json"):
        assert (out / f).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and len(manifest["stages"]) == study.n_stages()
    # the plan (pkt run --dry-run) names exactly the stages the run ran, and now finds all of them cached
    plan = Study(cfg, out, log=lambda s: None).plan_stages()
    assert {r.key for r in plan} == {r.key for r in study.cache.records} and all(r.cached for r in plan)
    # evaluated models' weights are pruned (keep_checkpoints: false); LaTen's delta file stays for the analysis
    stages = out / "stages"
    assert not list(stages.glob("lora-*/run/merged/model*.safetensors"))
    assert list(stages.glob("lora-*/pruned.json")) and list(stages.glob("laten-*/fused/laten_deltas.safetensors"))
    # every record says which dtype it was evaluated in; built models carry their survival report
    records = json.loads((out / "results.json").read_text())["records"]
    assert all(r["dtype"] in ("float32", "bfloat16") for r in records)
    assert all((r["precision"] is None) == (r["method"] in ("student", "student-fp32", "teacher")) for r in records)
    assert {r["method"]: r["dtype"] for r in records}["student-fp32"] == "float32"
    rows = {r["method"]: r for r in result["rows"]}
    fell_back = {r["method"] for r in records if (r["precision"] or {}).get("fallback")}
    assert all(rows[m]["delta_vs"] == "student-fp32" for m in fell_back)
    assert all(rows[m]["delta_vs"] == "student" for m in rows if m not in fell_back | {"student"})
    assert records[[r["method"] for r in records].index("laten")]["injection"]["step"] >= 1
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # scores + analysis figures
    # 3) an uninterrupted run with the same seed in a fresh directory gives identical numbers
    fresh = tmp / "run2"
    planned = Study(cfg, fresh, log=lambda s: None).plan_stages()  # planned before anything exists
    assert not any(r.cached for r in planned)
    run2 = Study(cfg, fresh, log=lambda s: None)
    run2.run()
    assert [r.key for r in planned] == [r.key for r in run2.cache.records]
    assert _scores(fresh) == _scores(out)


def test_bad_config_is_one_line(tmp_path):
    from pkt.config import load_config
    from pkt.errors import PktError

    p = tmp_path / "c.yaml"
    p.write_text("methods: [student, magic]\n")
    with pytest.raises(PktError, match=r"c.yaml: methods: .*unknown method\(s\) \['magic'\]; known: .*lora"):
        load_config(ExperimentConfig, p)
    p.write_text("tasks: [gsm8k]\nbudget: {rnak: 3}\n")
    with pytest.raises(PktError, match=r"budget.rnak: Extra inputs are not permitted"):
        load_config(ExperimentConfig, p)
    p.write_text("tasks: [gsm8k]\nbudget: {eval_protocol: 'pkt,gsm8k=lm-eval'}\n")
    with pytest.raises(PktError, match=r"budget.eval_protocol: .*gsm8k has no protocol 'lm-eval'"):
        load_config(ExperimentConfig, p)


def _diverging(tmp_path, qwen_pair):
    teacher, student, tok = qwen_pair
    data = {"name": "nan", "teacher": save_tiny(teacher, tok, tmp_path / "teacher"),
            "student": save_tiny(student, tok, tmp_path / "student"), "methods": ["student", "lora"],
            "analysis": False, "budget": {**TINY_BUDGET, "epochs": 2, "lr": 1.0e6}}
    return validate(ExperimentConfig, data)


def test_non_finite_loss_stops_the_loop(qwen_pair, shared_data):
    from pkt.align.finetune import FinetuneConfig, finetune
    from pkt.align.guard import NonFiniteLoss
    from pkt.align.lora_init import make_lora_model
    from pkt.data.tasks import load_split

    _, student, tok = qwen_pair
    rows = load_split("gsm8k", "train")[:4]
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    cfg = FinetuneConfig(lr=1e6, batch_size=2, micro_batch_size=2, epochs=2, max_length=128, r=2, alpha=2,
                         warmup_ratio=0)
    with pytest.raises(NonFiniteLoss, match=r"^fine-tuning: loss is (nan|inf|-inf) at step [2-4]; training diverged"):
        finetune(make_lora_model(student, "lora", kinds, 2, 2), tok, rows, cfg, progress=False)
    # the control: the same loop at the usual lr finishes with finite losses
    fresh = tiny_model("qwen2", "student", len(tok))  # the diverged one was trained in place
    logs = finetune(make_lora_model(fresh, "lora", kinds, 2, 2), tok, rows,
                    cfg.model_copy(update={"lr": 3e-4}), progress=False)
    assert len(logs) == 4 and all(math.isfinite(r["loss"]) for r in logs)


def test_non_finite_loss_stops_the_stage_and_caches_nothing(tmp_path, qwen_pair, shared_data):
    from pkt.errors import PktError

    cfg = _diverging(tmp_path, qwen_pair)
    out = tmp_path / "run"
    with pytest.raises(PktError, match=r"^stage lora-gsm8k-s0: fine-tuning: loss is (nan|inf|-inf) at step \d+;") as e:
        Study(cfg, out, log=lambda s: None).run()
    assert "\n" not in str(e.value)
    names = [p.name for p in (out / "stages").iterdir()]
    assert [n for n in names if n.startswith("eval-student")]  # the stage before it is kept
    assert not [n for n in names if n.startswith("lora") or ".tmp" in n]  # nothing of the diverged one
    # and the CLI reports it as one line with exit status 2
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = subprocess.run([sys.executable, "-m", "pkt.cli", "run", str(tmp_path / "nan.yaml"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("pkt: error:")]  # the rest is progress bars
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith("pkt: error: stage lora-gsm8k-s0: fine-tuning: loss is")
    assert "Traceback" not in res.stderr


def test_fixed_eval_subset_evaluates_vanilla_models_once(tiny_config):
    cfg, tmp = tiny_config
    cfg = validate(ExperimentConfig, {**cfg.model_dump(mode="json"), "methods": ["student", "teacher", "lora"],
                                      "seeds": [0, 1], "budget": {**TINY_BUDGET, "eval_seed": 7}})
    study = Study(cfg, tmp / "fixed", log=lambda s: None)
    result = study.run()
    evals = sorted(r.stage for r in study.cache.records if r.stage.startswith("eval-"))
    # the vanilla models once (as seed 0's stage; the student also in float32), the trained arm per seed
    assert evals == ["eval-lora-gsm8k-s0", "eval-lora-gsm8k-s1", "eval-student-fp32-gsm8k-s0",
                     "eval-student-gsm8k-s0", "eval-teacher-gsm8k-s0"]
    recs = json.loads((tmp / "fixed" / "results.json").read_text())["records"]
    by = {(r["method"], r["seed"]): r for r in recs}
    for m in ("student", "student-fp32", "teacher"):
        assert by[(m, 0)]["per_example"] == by[(m, 1)]["per_example"]
        assert by[(m, 0)]["answer_loss"] == by[(m, 1)]["answer_loss"]
    # every seed's lora was scored on the same questions as the student it is paired with
    preds = {s: [json.loads(x)["id"] for x in next((tmp / "fixed" / "stages").glob(f"eval-{m}-gsm8k-s{s}-*"))
                 .joinpath("predictions.jsonl").read_text().splitlines()] for m, s in (("lora", 0), ("lora", 1))}
    student_ids = [json.loads(x)["id"] for x in next((tmp / "fixed" / "stages").glob("eval-student-gsm8k-s0-*"))
                   .joinpath("predictions.jsonl").read_text().splitlines()]
    assert preds[0] == preds[1] == student_ids
    assert {r["method"] for r in result["rows"]} == {"student", "student-fp32", "teacher", "lora"}
    # the plan counts each vanilla evaluation once
    assert len(Study(cfg, tmp / "fixed", log=lambda s: None).plan_stages()) == len(study.cache.records)


def test_study_evaluates_under_the_chosen_protocol(tiny_config):
    """budget.eval_protocol and budget.eval_shots reach the evaluation: GSM8K asked in lm-eval's 8-shot CoT
    wording (raw text, its exemplars), or in the PKT format with 8 exemplars; recorded in the stage's metrics."""
    cfg, tmp = tiny_config
    cfg = validate(ExperimentConfig, {**cfg.model_dump(mode="json"), "methods": ["student"], "analysis": False,
                                      "budget": {**TINY_BUDGET, "eval_protocol": "pkt,gsm8k=lm-eval-cot"}})
    study = Study(cfg, tmp / "proto", log=lambda s: None)
    study.run()
    stage = next((tmp / "proto" / "stages").glob("eval-student-gsm8k-s0-*"))
    metrics = json.loads((stage / "stage.json").read_text())["result"]["metrics"]
    assert metrics["protocol"]["name"] == "lm-eval-cot" and metrics["protocol"]["shots"] == 8
    prompt = json.loads((stage / "predictions.jsonl").read_text().splitlines()[0])["prompt"]
    assert prompt.startswith("Q: There are 15 trees in the grove.") and prompt.endswith("\nA:")
    assert "<|im_start|>" not in prompt
    # the PKT papers' 8-shot chain of thought: the pkt protocol with budget.eval_shots (here per task)
    cfg = validate(ExperimentConfig, {**cfg.model_dump(mode="json"), "budget": TINY_BUDGET,
                                      "per_task": {"gsm8k": {"eval_shots": 8}}})
    Study(cfg, tmp / "shots", log=lambda s: None).run()
    stage = next((tmp / "shots" / "stages").glob("eval-student-gsm8k-s0-*"))
    metrics = json.loads((stage / "stage.json").read_text())["result"]["metrics"]
    assert metrics["protocol"]["name"] == "pkt" and metrics["shots"] == 8 and metrics["protocol"]["shots"] == 8
    prompt = json.loads((stage / "predictions.jsonl").read_text().splitlines()[0])["prompt"]
    assert "Answer the following questions.\n\nQuestion: There are 15 trees" in prompt
    assert prompt.count("\nAnswer: ") == 8 and prompt.count("So the answer is") == 8


def test_laten_lora_alone_prunes_its_laten_student(tiny_config):
    cfg, tmp = tiny_config
    cfg = validate(ExperimentConfig, {**cfg.model_dump(mode="json"), "methods": ["student", "laten-lora"],
                                      "analysis": False})
    study = Study(cfg, tmp / "ll", log=lambda s: None)
    study.run()
    assert [r.stage for r in study.cache.records].count("laten-gsm8k-s0") == 1  # built once, for laten-lora
    stages = tmp / "ll" / "stages"
    # the LaTen student laten-lora started from is deleted once the seed's arms are done; its deltas stay
    assert not list(stages.glob("laten-*/fused/model*.safetensors"))
    assert list(stages.glob("laten-*/fused/laten_deltas.safetensors"))
    assert not list(stages.glob("laten-lora-*/run/merged/model*.safetensors"))


def test_laten_random_is_laten_on_random_teacher_vectors(tiny_config):
    """The null arm: laten's training and point, the same located sites, values of its own; its model card and
    the report's comparison name it."""
    from pkt.inject import load_deltas

    cfg, tmp = tiny_config
    cfg = validate(ExperimentConfig, {**cfg.model_dump(mode="json"), "methods": ["student", "laten", "laten-random"],
                                      "analysis": False})
    Study(cfg, tmp / "null", log=lambda s: None).run()
    stages = tmp / "null" / "stages"
    real_dir, null_dir = (next(stages.glob(f"{m}-gsm8k-s0-*")) / "fused" for m in ("laten", "laten-random"))
    manifests = [json.loads((d / "pkt-laten.json").read_text()) for d in (real_dir, null_dir)]
    assert [m["teacher_vectors"] for m in manifests] == ["real", "random"]
    assert manifests[0]["step"] == manifests[1]["step"] and manifests[0]["transfer_rate"] == manifests[1]["transfer_rate"]
    real, null = (load_deltas(d / "laten_deltas.safetensors") for d in (real_dir, null_dir))
    assert set(real) == set(null)
    for key in real:
        assert torch.equal(real[key][0], null[key][0]), key  # the same located student sites
    assert any(not torch.allclose(real[k][1], null[k][1]) for k in real)  # other values
    assert "`laten-random`" in (null_dir / "README.md").read_text()
    rows = json.loads((tmp / "null" / "results.json").read_text())["records"]
    assert {r["method"] for r in rows} >= {"laten", "laten-random"}
    assert "laten − laten-random" in (tmp / "null" / "results.md").read_text()


def test_laten_at_a_selected_point_trains_and_applies_as_the_budget_says(tiny_config):
    """A point `pkt study laten-dose` may select: k steps of the extract split's cycle, λ 0, trained at one rate
    and applied at another; pkt run's laten build is exactly that point."""
    cfg, tmp = tiny_config
    budget = {**cfg.budget.model_dump(mode="json"), "laten_choice": "fixed", "laten_steps": 2,
              "laten_schedule": "extract", "laten_rate": 0.1, "laten_apply_rate": 0.5, "laten_penalty": 0.0}
    cfg = validate(ExperimentConfig, {**cfg.model_dump(mode="json"), "methods": ["student", "laten"],
                                      "analysis": False, "budget": budget})
    Study(cfg, tmp / "point", log=lambda s: None).run()
    stage = next((tmp / "point" / "stages").glob("laten-gsm8k-s0-*"))
    trained = json.loads((stage / "train" / "config.json").read_text())
    assert (trained["max_steps"], trained["schedule"], trained["transfer_rate"], trained["penalty"]) == (
        2, "extract", 0.1, 0.0)
    manifest = json.loads((stage / "fused" / "pkt-laten.json").read_text())
    assert (manifest["step"], manifest["transfer_rate"]) == (2, 0.5)
    rows = [json.loads(x) for x in (stage / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["penalty"] for r in rows] == [0.0, 0.0] and rows[0]["lr"] < cfg.budget.laten_lr / 5  # the cycle's warm-up
    with pytest.raises(Exception, match="laten_apply_rate: laten_choice 'select' chooses the rate itself"):
        validate(ExperimentConfig, {**cfg.model_dump(mode="json"), "budget": {**budget, "laten_choice": "select"}})
