"""`pkt run --executor ray` on a local 2-CPU Ray instance: the tiny-pair study gives byte-identical results
to the sequential executor, survives a worker killed mid-stage, fails on a raising stage with its one line
and resumes from the store. Ray is started and stopped here."""

import json
import os
import re
from pathlib import Path

import pytest
import ray
import yaml

from pkt.config import validate
from pkt.errors import PktError
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.executors import RayExecutor, stage_graph
from pkt.experiment.runner import Study
from pkt.testing import TINY_BUDGET, save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def local_ray():
    assert os.environ.get("PKT_DATA_DIR"), "this test reads the benchmark data: set PKT_DATA_DIR (see README)"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny-pair study of test_run_tiny (every method, one seed, analysis) and its sequential run."""
    tmp = tmp_path_factory.mktemp("ray")
    tok = tiny_tokenizer()
    data = {"name": "tiny", "teacher": save_tiny(tiny_model("qwen2", "teacher", len(tok)), tok, tmp / "teacher"),
            "student": save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp / "student"),
            "tasks": ["gsm8k"], "seeds": [0], "dtype": "float32", "teacher_dtype": "float32",
            "analysis_examples": 2, "budget": TINY_BUDGET}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(data))
    cfg = validate(ExperimentConfig, data)
    Study(cfg, tmp / "seq", log=lambda s: None).run()
    return cfg, tmp


class Injected(RayExecutor):
    """Wraps the named stage's function (test-only): a crash or an error inside that stage's worker."""

    def __init__(self, stage: str, wrap):
        super().__init__()
        self.stage, self.wrap = stage, wrap

    def graph(self, study):
        nodes = super().graph(study)
        for n in nodes:
            if n.name == self.stage:
                n.fn = self.wrap(n.fn)
        return nodes


def _untimed(x, out: Path):
    """``x`` without wall-clock fields (seconds, tokens/s) and with the output directory, the stage keys
    (which hash paths under it) and the writing process's temporary directory names made neutral: they
    differ between any two runs into different directories."""
    if isinstance(x, dict):
        return {k: _untimed(v, out) for k, v in x.items() if not ("seconds" in k or "per_s" in k)}
    if isinstance(x, list):
        return [_untimed(v, out) for v in x]
    if not isinstance(x, str):
        return x
    return re.sub(r"-[0-9a-f]{16}\b", "-KEY", re.sub(r"\.tmp\d+", ".tmp", x.replace(str(out), "OUT")))


def _outputs(out: Path) -> dict:
    """Every result and every stage's outputs (JSON without timings, weights as bytes), by stage name."""
    files = {name: (out / name).read_bytes() for name in ("results.csv", "results.md")}
    files["results.json"] = _untimed(json.loads((out / "results.json").read_text()), out)
    for d in (out / "stages").iterdir():
        rec = json.loads((d / "stage.json").read_text())
        files[rec["stage"] + "/result"] = _untimed(rec["result"], out)
        for f in sorted(d.rglob("*.jsonl")):
            files[f"{rec['stage']}/{f.relative_to(d)}"] = [_untimed(json.loads(ln), out)
                                                    for ln in f.read_text().splitlines()]
        for f in sorted(d.rglob("*.safetensors")):
            files[f"{rec['stage']}/{f.relative_to(d)}"] = f.read_bytes()
    return files


def test_stage_graph_orders_the_study(study):
    cfg, tmp = study
    nodes = stage_graph(Study(cfg, tmp / "graph", log=lambda s: None))
    by = {n.name: n for n in nodes}
    ids = {n.name: n.id for n in nodes}
    # the plan's stages, none cached in an empty directory, each with its dependencies
    assert [n.id for n in nodes] == [r.key for r in Study(cfg, tmp / "graph", log=lambda s: None).plan_stages()]
    assert by["seeking-gsm8k-s0"].deps == [ids["extract-gsm8k"]]
    assert set(by["seeking-random-gsm8k-s0"].deps) == {ids["extract-gsm8k"]}
    assert by["seqkd-gsm8k-s0"].deps == [ids["kd-data-gsm8k"]]
    assert by["eval-lora-gsm8k-s0"].deps == [ids["lora-gsm8k-s0"]]
    assert by["eval-student-gsm8k-s0"].deps == [] and by["lora-gsm8k-s0"].deps == []
    assert by["eval-student-fp32-gsm8k-s0"].deps == []
    assert set(by["analysis"].deps) == set(ids.values()) - {ids["analysis"]}
    assert {n.name: n.kind for n in nodes if n.name.endswith("s0") and "eval" not in n.name} == {
        "lora-gsm8k-s0": "finetune", "pissa-gsm8k-s0": "finetune", "seeking-gsm8k-s0": "finetune",
        "seeking-random-gsm8k-s0": "finetune", "seeking-shuffled-gsm8k-s0": "finetune",
        "seqkd-gsm8k-s0": "finetune", "laten-gsm8k-s0": "laten", "gkd-gsm8k-s0": "gkd",
        "laten-lora-gsm8k-s0": "finetune"}
    # laten-lora fine-tunes its seed's LaTen student: it waits for that laten stage (and nothing else)
    assert by["laten-lora-gsm8k-s0"].deps == [ids["laten-gsm8k-s0"]]
    assert not (tmp / "graph").exists()  # a plan writes nothing


def test_ray_equals_sequential_and_survives_a_killed_worker(study, local_ray):
    cfg, tmp = study
    attempts = tmp / "attempts"

    def crash_first_attempt(fn):
        def wrapped(d):
            with open(attempts, "a") as f:
                f.write(f"{os.getpid()}\n")
            (d / "half-written").write_text("x")
            if len(attempts.read_text().split()) == 1:
                os._exit(1)  # the worker process dies in the middle of the stage
            return fn(d)
        return wrapped

    out = tmp / "ray"
    with Injected("lora-gsm8k-s0", crash_first_attempt) as ex:
        result = Study(cfg, out, log=lambda s: None).run(executor=ex)
    pids = attempts.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # retried once, in a new worker
    ours, theirs = _outputs(out), _outputs(tmp / "seq")
    assert [k for k in theirs if k.endswith(".safetensors")]  # factors, adapters, LaTen deltas compared too
    assert ours == theirs  # identical results and stage outputs, weights byte for byte
    assert not list((out / "stages").glob(".*tmp*"))  # the killed attempt's temporary directory is gone
    manifest = json.loads((out / "manifest.json").read_text())
    seq = json.loads((tmp / "seq" / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == [s["stage"] for s in seq["stages"]]
    assert all(not s["cached"] for s in manifest["stages"])  # computed in this run, by the Ray tasks
    # every method, and the student evaluated again in float32 (the baseline of models that fall back there)
    assert {r["method"] for r in result["rows"]} == set(cfg.methods) | {"student-fp32"}
    # evaluated weights pruned as in the sequential run
    assert not list((out / "stages").glob("lora-*/run/merged/model*.safetensors"))
    assert list((out / "stages").glob("laten-*/fused/laten_deltas.safetensors"))


def test_raising_stage_fails_the_run_and_the_rerun_resumes(study, local_ray):
    cfg, tmp = study

    def boom(fn):
        def wrapped(d):
            raise PktError("injected failure")
        return wrapped

    out = tmp / "fail"
    with pytest.raises(PktError, match=r"^stage seeking-gsm8k-s0: injected failure$"), \
            Injected("seeking-gsm8k-s0", boom) as ex:
        Study(cfg, out, log=lambda s: None).run(executor=ex)
    finished = {p.name for p in (out / "stages").iterdir()}
    assert not [n for n in finished if n.startswith("seeking-gsm8k") or ".tmp" in n]
    assert [n for n in finished if n.startswith("extract-gsm8k")]  # its dependency finished and is recorded
    assert not (out / "results.json").exists()
    # re-running resumes: what finished is reused, and the results equal the sequential run's
    rerun = Study(cfg, out, log=lambda s: None)
    with RayExecutor() as ex:
        rerun.run(executor=ex)
    assert finished <= {r.key for r in rerun.cache.records if r.cached}
    assert _outputs(out) == _outputs(tmp / "seq")


def test_retries_are_bounded(study, local_ray):
    cfg, tmp = study
    small = cfg.model_copy(update={"methods": ["student", "lora"], "analysis": False, "stage_retries": 1})
    attempts = tmp / "always"

    def always_crash(fn):
        def wrapped(d):
            with open(attempts, "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)
        return wrapped

    with pytest.raises(PktError, match=r"^stage lora-gsm8k-s0: its worker died 2 time\(s\) \(WorkerCrashedError\)"), \
            Injected("lora-gsm8k-s0", always_crash) as ex:
        Study(small, tmp / "crashing", log=lambda s: None).run(executor=ex)
    assert len(attempts.read_text().split()) == 2  # the first attempt and stage_retries=1 retry, no more
    assert not list((tmp / "crashing" / "stages").glob(".*tmp*"))


def test_resources_and_errors(study, local_ray, monkeypatch):
    cfg, tmp = study
    # a request no node can meet is refused before any stage runs
    gpu_eval = validate(ExperimentConfig, {"resources": {"eval": {"gpus": 1}}}).resources
    big = cfg.model_copy(update={"resources": gpu_eval})
    with pytest.raises(PktError, match=r"^resources.eval: no node of the Ray cluster has 1 CPU, 1 GPU"), \
            RayExecutor() as ex:
        Study(big, tmp / "big", log=lambda s: None).run(executor=ex)
    assert not list((tmp / "big" / "stages").glob("*"))
    opts = RayExecutor.options(validate(ExperimentConfig, {"resources": {"default": {"cpus": 2},
                                                                         "laten": {"gpus": 1, "memory_gb": 1.5}}}),
                               "laten")
    assert opts == {"num_cpus": 1, "num_gpus": 1, "max_retries": 2, "retry_exceptions": False,
                    "memory": 3 * 2**29}
    assert RayExecutor.options(validate(ExperimentConfig, {"resources": {"default": {"cpus": 2}}}),
                               "eval")["num_cpus"] == 2
    with pytest.raises(PktError, match=r"resources.evl"):
        validate(ExperimentConfig, {"resources": {"evl": {"gpus": 1}}})
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(PktError, match=r"^--executor ray: Ray is not installed; pip install 'pkt\[ray\]'$"):
        RayExecutor()


def test_cli_executor_flags(study):
    import subprocess
    import sys

    _, tmp = study
    for flags, line in ((["--executor", "dask"], "pkt: error: --executor 'dask': choose sequential or ray"),
                        (["--address", "x:1"], "pkt: error: --address needs --executor ray")):
        r = subprocess.run([sys.executable, "-m", "pkt.cli", "run", str(tmp / "tiny.yaml"), "--out", str(tmp / "cli"),
                            *flags], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and [ln for ln in r.stderr.splitlines() if ln.strip()] == [line], r.stderr
    assert not (tmp / "cli").exists()
