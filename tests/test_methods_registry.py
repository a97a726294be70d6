"""Adding a method is adding a file: a toy method registered here, and nowhere else, runs through the plan,
the run, the committed records and `pkt report` on the tiny random models; plus the typed Stage (its name
round trip, the format committed records use) and the registry itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pkt import methods
from pkt.config import validate
from pkt.experiment.config import ALL_METHODS, STAGE_KINDS, ExperimentConfig
from pkt.experiment.executors import stage_graph
from pkt.experiment.records import load
from pkt.experiment.runner import Study
from pkt.stage import ANALYSIS_STAGE, Stage, build, evaluation, shared
from pkt.methods.base import Method
from pkt.testing import invoke_cli, save_tiny, tiny_model, tiny_tokenizer

BUDGET = dict(train_examples=4, epochs=1, batch_size=2, max_length=160, rank=2, alpha=2, eval_limit=3,
              eval_max_new_tokens=8, loss_examples=3)


class Toy(Method):
    """The student with its final norm's weights raised by ``bump``: a deterministic change, in one stage."""

    name = "toy"
    bump = 0.25

    def build(self, study, task, seed, inputs):
        c = study.cfg
        base = self.base(study, task, seed, inputs)
        payload = {"method": self.name, "task": task, "base": base, "bump": self.bump}

        def fn(d: Path) -> dict:
            from pkt.models.load import load_model, load_tokenizer

            model = load_model(base, dtype="float32")
            with torch.no_grad():
                model.model.norm.weight.add_(self.bump)
            model.save_pretrained(d / "model")
            load_tokenizer(base).save_pretrained(d / "model")
            return {"bump": self.bump}

        path, _ = study.run_stage(build(self.name, task, seed), payload, fn, reads={"models": [base]})
        return str(path / "model"), c.eval_dtype

    def base(self, study, task, seed, inputs) -> str:
        return study.cfg.student


class ToyOnToy(Toy):
    """The toy's change applied once more, on the toy's model of the same task and seed (a method that reads
    another method's build, as laten-lora reads laten)."""

    name = "toy-on-toy"
    reads = ("toy",)
    resource = "laten"  # any kind of the config's resources: the executor must take it from here

    def base(self, study, task, seed, inputs) -> str:
        ref, _ = study.build("toy", task, seed, inputs)
        return ref


@pytest.fixture(scope="module")
def toys():
    toy, on_toy = methods.register(Toy()), methods.register(ToyOnToy())
    yield toy, on_toy
    methods.unregister(toy.name)
    methods.unregister(on_toy.name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy-models")
    tok = tiny_tokenizer()
    return (save_tiny(tiny_model("qwen2", "teacher", len(tok)), tok, tmp / "teacher"),
            save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp / "student"))


def toy_config(models, arms: list[str], **extra) -> ExperimentConfig:
    teacher, student = models
    cfg = validate(ExperimentConfig, {"name": "toy", "teacher": teacher, "student": student, "tasks": ["gsm8k"],
                                      "seeds": [0], "dtype": "float32", "teacher_dtype": "float32",
                                      "analysis": False, "budget": BUDGET, **extra})
    # the config file's method list is validated against the shipped methods; a method registered at run time
    # is set on the validated config
    return cfg.model_copy(update={"methods": arms})


# ---- the toy method end to end ----------------------------------------------------------------------------
def test_a_toy_method_runs_through_plan_run_records_and_report(toys, models, tmp_path, shared_data):
    toy, on_toy = toys
    records_dir = tmp_path / "records"
    cfg = toy_config(models, ["student", "toy", "toy-on-toy"], records=str(records_dir))
    # plan: its build and evaluation are stages, estimated by the method (the default: LoRA fine-tuning)
    study = Study(cfg, tmp_path / "run", "name: toy\n", log=lambda s: None)
    est = study.preflight(plan=True)
    names = [s["stage"] for s in est.stages]
    assert names == ["eval-student-gsm8k-s0", "eval-student-fp32-gsm8k-s0", "toy-gsm8k-s0", "eval-toy-gsm8k-s0",
                     "toy-on-toy-gsm8k-s0", "eval-toy-on-toy-gsm8k-s0"]
    assert est.of["toy-on-toy-gsm8k-s0"] == build("toy-on-toy", "gsm8k", 0)
    row = est.stages[names.index("toy-gsm8k-s0")]
    assert row["work"] == cost(study, toy).work and row["bytes"] > 0
    # the Ray executor's graph: kinds and dependencies from what the methods declare
    nodes = {n.name: n for n in stage_graph(study)}
    assert nodes["toy-on-toy-gsm8k-s0"].deps == [nodes["toy-gsm8k-s0"].id]
    assert nodes["eval-toy-gsm8k-s0"].deps == [nodes["toy-gsm8k-s0"].id]
    assert nodes["toy-gsm8k-s0"].kind == "finetune" and nodes["toy-on-toy-gsm8k-s0"].kind == "laten"
    assert not (tmp_path / "run").exists()  # a plan writes nothing

    # run
    result = study.run()
    assert [(r["method"], r["seed"]) for r in result["records"]] == [
        ("student", 0), ("student-fp32", 0), ("toy", 0), ("toy-on-toy", 0)]
    rows = {r["method"]: r for r in result["records"]}
    assert rows["toy"]["precision"]["changed"] > 0  # the build really changed the student
    toy_dir = Path(rows["toy"]["model_dir"]).parent
    assert json.loads((toy_dir / "stage.json").read_text())["of"] == build("toy", "gsm8k", 0).to_dict()
    # toy-on-toy read the toy's weights, so they were pruned only after every arm of the seed
    assert (toy_dir / "pruned.json").is_file() and not list(toy_dir.glob("model/model*.safetensors"))

    # records: each stage's record carries its typed stage; they alone give the study's rows back
    rec = json.loads((records_dir / "stages" / "eval-toy-on-toy-gsm8k-s0.json").read_text())
    assert Stage.from_dict(rec["of"]) == evaluation("toy-on-toy", "gsm8k", 0)
    loaded = load(records_dir)
    assert [(r["method"], r["score"]) for r in loaded.records] == [(r["method"], r["score"]) for r in result["records"]]

    # report: rebuilt from the records alone, byte for byte what the run wrote, with the toy's rows
    out = tmp_path / "report"
    res = invoke_cli(["report", records_dir, "--out", out])
    assert res.exit_code == 0, res.output
    md = (out / "results.md").read_text()
    assert md == (tmp_path / "run" / "results.md").read_text()
    assert re.search(r"^\| toy \| gsm8k \|", md, re.M) and re.search(r"^\| toy-on-toy \| gsm8k \|", md, re.M)

    # records written before stages carried their typed value (no "of", no "evaluated_as") give the same report
    for f in (records_dir / "stages").glob("*.json"):
        old = json.loads(f.read_text())
        old.pop("of")
        if isinstance(old["result"], dict):
            old["result"].pop("evaluated_as", None)
        f.write_text(json.dumps(old))
    old_out = tmp_path / "old-report"
    assert invoke_cli(["report", records_dir, "--out", old_out]).exit_code == 0
    assert (old_out / "results.md").read_text() == md


def cost(study, method):
    """The method's build cost for the study's first task, as the plan computes it."""
    from pkt.experiment.plan import PlanContext, _Tokens
    from pkt.experiment.preflight import check_models, meta_facts

    teacher, student = (meta_facts(f) for f in check_models(study.cfg, plan=True))
    return method.estimate(PlanContext(study, teacher, student, _Tokens(None)), study.cfg.tasks[0])


def test_a_method_that_reads_a_build_the_study_does_not_evaluate(toys, models, tmp_path, shared_data):
    """toy-on-toy without toy: the toy's build is a stage of its own, in the plan and in the graph."""
    cfg = toy_config(models, ["student", "toy-on-toy"])
    study = Study(cfg, tmp_path / "run", log=lambda s: None)
    names = [r.stage for r in study.plan_stages()]
    assert "toy-gsm8k-s0" in names and "eval-toy-gsm8k-s0" not in names
    assert names.index("toy-gsm8k-s0") < names.index("toy-on-toy-gsm8k-s0")
    nodes = {n.name: n for n in stage_graph(study)}
    assert nodes["toy-on-toy-gsm8k-s0"].deps == [nodes["toy-gsm8k-s0"].id]


def test_the_float32_student_follows_the_study(models, tmp_path, shared_data):
    """The float32 student is evaluated when some arm is built and the study evaluates in another dtype."""
    def evals(arms, **extra):
        study = Study(toy_config(models, arms, **extra), tmp_path / "run", log=lambda s: None)
        return [r.stage for r in study.plan_stages() if r.of.kind == "eval"]

    assert evals(["student", "teacher"]) == ["eval-student-gsm8k-s0", "eval-teacher-gsm8k-s0"]
    assert "eval-student-fp32-gsm8k-s0" in evals(["student", "lora"])
    assert "eval-student-fp32-gsm8k-s0" not in evals(["student", "lora"], eval_dtype="float32")


# ---- Stage ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, name", [
    (build("lora", "gsm8k", 0), "lora-gsm8k-s0"),
    (build("seeking-random", "humaneval", 2), "seeking-random-humaneval-s2"),
    (build("laten-lora", "mbpp", 11), "laten-lora-mbpp-s11"),
    (evaluation("student-fp32", "gsm8k", 1), "eval-student-fp32-gsm8k-s1"),
    (evaluation("seeking-shuffled", "humaneval", 0), "eval-seeking-shuffled-humaneval-s0"),
    (shared("extract", "gsm8k"), "extract-gsm8k"),
    (shared("kd-data", "humaneval"), "kd-data-humaneval"),
    (ANALYSIS_STAGE, "analysis"),
])
def test_stage_names_round_trip(stage, name):
    assert stage.name == name == str(stage)
    assert Stage.from_name(name, ["gsm8k", "humaneval", "mbpp"]) == stage
    assert Stage.from_dict(json.loads(json.dumps(stage.to_dict()))) == stage


def test_stage_names_of_the_committed_studies_round_trip():
    """Every stage a committed study lists reads back into a Stage whose name is the listed one."""
    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    studies = sorted(root.glob("*/study.json"))
    assert studies
    for f in studies:
        study = json.loads(f.read_text())
        for s in study["stages"]:
            assert Stage.from_name(s["stage"], study["tasks"]).name == s["stage"], (f, s["stage"])
            assert s["key"].startswith(s["stage"] + "-")


def test_a_name_of_no_stage_is_refused():
    with pytest.raises(ValueError, match="eval-lora-mmlu-s0"):
        Stage.from_name("eval-lora-mmlu-s0", ["gsm8k"])
    with pytest.raises(ValueError):
        Stage.from_dict({"method": "lora"})


# ---- the registry -----------------------------------------------------------------------------------------
def test_every_null_is_compared_with_the_arm_it_controls():
    """A method that declares ``controls`` is a null: its arm exists, and every report states arm − null (the
    comparisons are read from the registry, so a new null needs nothing else)."""
    from pkt.experiment.rows import HEAD_TO_HEAD, comparison_pairs

    nulls = {m.name: m.controls for m in methods.REGISTRY.values() if m.controls}
    assert {"seeking-random", "seeking-shuffled", "function-transfer-random", "function-transfer-shuffled",
            "semalign-shuffled", "laten-random", "laten-random-lora"} <= set(nulls)
    pairs = comparison_pairs()
    for null, arm in nulls.items():
        assert arm in methods.REGISTRY and (arm, null) in pairs, null
    assert pairs[-len(HEAD_TO_HEAD):] == HEAD_TO_HEAD and len(pairs) == len(set(pairs))


def test_every_configurable_method_is_registered_and_consistent():
    assert set(ALL_METHODS) <= set(methods.REGISTRY)
    for m in methods.REGISTRY.values():
        assert m.resource in STAGE_KINDS, m.name
        assert all(r in methods.SHARED or r in methods.REGISTRY for r in m.reads), m.name
        assert m.companion_of is None or m.companion_of in methods.REGISTRY
    assert [k for k in methods.SHARED] == ["extract", "kd-data"]  # the order a study runs them in
    assert [m.name for m in methods.companions("student")] == ["student-fp32"]
    assert methods.is_vanilla("teacher") and not methods.is_vanilla("lora") and not methods.is_vanilla("nope")


def test_register_and_get(toys):
    toy, _ = toys
    assert methods.get("toy") is toy
    with pytest.raises(KeyError, match="unknown method 'nope'.*lora"):
        methods.get("nope")
    with pytest.raises(KeyError, match="unknown shared stage 'nope'"):
        methods.get_shared("nope")
    with pytest.raises(ValueError, match="needs a name"):
        methods.register(Method())


def test_the_default_estimate_is_lora_fine_tuning(toys, models, tmp_path, shared_data):
    toy, _ = toys
    study = Study(toy_config(models, ["student", "lora"]), tmp_path / "run", log=lambda s: None)
    toy_cost = cost(study, toy)
    assert toy_cost == cost(study, methods.get("lora")) and toy_cost.checkpoint and toy_cost.seconds > 0
    assert cost(study, methods.get("gkd")).seconds > toy_cost.seconds  # a method's own estimate is used


def test_a_config_names_any_registered_method_and_nothing_else():
    """``methods:`` is checked against the registry (a new method file is enough for a config to name it); an
    unknown name, a companion listed on its own or a repeat is one settings error."""
    from pkt.errors import PktError

    class Extra(Method):
        name = "extra-for-config"

    methods.register(Extra())
    try:
        cfg = validate(ExperimentConfig, {"methods": ["student", "extra-for-config"]})
        assert cfg.methods == ["student", "extra-for-config"]
        for bad, msg in ((["student", "nonesuch"], "unknown method"), (["student", "student-fp32"], "unknown method"),
                         (["student", "lora", "lora"], "listed twice")):
            with pytest.raises(PktError, match=msg):
                validate(ExperimentConfig, {"methods": bad})
    finally:
        methods.unregister("extra-for-config")
