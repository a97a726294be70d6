"""`pkt run --dry-run`: every shipped config plans, with the stages a run would run, and its comment tells
the truth about the estimate; the throughput table's interpolation and the disk rule.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pkt.config import load_config, validate
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.plan import THROUGHPUT, tokens_per_second
from pkt.experiment.runner import Study
from pkt.testing import save_tiny

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STUDIES = ["default.yaml", "full.yaml", "paper-llama2.yaml", "cpu-study.yaml", "cpu-study-dropout0.yaml",
           "decisive-function-gsm8k.yaml", "decisive-arms-gsm8k.yaml"]


def expected_stages(cfg: ExperimentConfig) -> int:
    """Stages of a study, counted from its config: per task the extraction (if a Seeking arm runs) and the
    teacher's KD answers (if SeqKD runs), per seed one evaluation per method and one build per built method
    (plus the student in float32 when the study evaluates in another dtype), then the analysis."""
    m = cfg.methods
    per_task = any(x.startswith("seeking") for x in m) + ("seqkd" in m)
    built = [x for x in m if x not in ("student", "teacher")]
    # the student's evaluation again in float32, the baseline of built models that fall back there
    vanilla = len(m) - len(built) + int(bool(built) and cfg.eval_dtype != "float32")
    # laten-lora starts from its seed's laten build, which is a stage of its own unless laten also runs
    per_seed = 2 * len(built) + int("laten-lora" in m and "laten" not in m)
    total = 0
    for task in cfg.tasks:
        # with one evaluation subset for every seed (eval_seed), the vanilla models are evaluated once
        once = cfg.budget_for(task).eval_seed is not None
        total += per_task + len(cfg.seeds) * per_seed + vanilla * (1 if once else len(cfg.seeds))
    return total + int(cfg.analysis)


@pytest.mark.parametrize("name", STUDIES)
def test_every_shipped_study_dry_runs(name, tmp_path, shared_data):
    path = CONFIGS / name
    cfg = load_config(ExperimentConfig, path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "pkt.cli", "run", "--dry-run", str(path), "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = re.search(r"^plan: (\d+) stages \((\d+) cached\), estimated (.+?) on the reference machine .*, "
                        r"disk up to ([\d.]+) GB", res.stdout, re.M)
    assert summary, res.stdout[-3000:]
    assert int(summary.group(1)) == expected_stages(cfg) and summary.group(2) == "0"
    stage_lines = [ln for ln in res.stdout.splitlines() if re.match(r"^\S+-\S+|^analysis ", ln) and " run " in ln]
    assert len(stage_lines) == expected_stages(cfg)
    assert not out.exists()  # a dry run writes nothing
    # the config's comment states the estimate the dry run gives (so it cannot silently go stale)
    header = path.read_text().split("\nname:")[0]
    assert re.search(rf"{summary.group(1)} stages, {re.escape(summary.group(3))}, disk up to "
                     rf"{float(summary.group(4)):.1f} GB", header), (name, summary.group(0))


def test_method_settings_files_validate():
    from pkt.align.finetune import FinetuneConfig
    from pkt.laten import ApplyConfig, LatenConfig
    from pkt.postpkt import SeekingConfig

    assert load_config(LatenConfig, CONFIGS / "laten.yaml", section="train").transfer_rate == 0.1
    assert load_config(ApplyConfig, CONFIGS / "laten.yaml", section="apply").step == 4
    assert load_config(SeekingConfig, CONFIGS / "postpkt.yaml", section="extract").n_samples == 32
    assert load_config(FinetuneConfig, CONFIGS / "postpkt.yaml", section="finetune").batch_size == 64


def test_paper_budgets_per_task():
    cfg = load_config(ExperimentConfig, CONFIGS / "full.yaml")
    got = {t: (cfg.budget_for(t).epochs, cfg.budget_for(t).lr, cfg.budget_for(t).train_examples,
               cfg.budget_for(t).train_on_inputs) for t in cfg.tasks}
    # docs/methods.md §2.4 (S3 Table 5): epochs 5/5/3/5, lr 3e-4 except HumanEval 3e-5, 1000 examples except MBPP 300
    assert got == {"gsm8k": (5, 3e-4, 1000, False), "mmlu": (5, 3e-4, 1000, True),
                   "humaneval": (3, 3e-5, 1000, False), "mbpp": (5, 3e-4, 300, False)}
    assert cfg.budget.batch_size == 64 and cfg.budget_for("mbpp").batch_size == 64
    with pytest.raises(Exception, match=r"per_task: Value error, mmlu.epochs: Input should be greater than 0"):
        validate(ExperimentConfig, {"per_task": {"mmlu": {"epochs": 0}}}, "c.yaml")
    with pytest.raises(Exception, match=r"per_task: Value error, unknown task 'gsm9k'"):
        validate(ExperimentConfig, {"per_task": {"gsm9k": {"epochs": 1}}}, "c.yaml")


def test_throughput_interpolation():
    for work, by_dtype in THROUGHPUT.items():
        for dtype, pts in by_dtype.items():
            for params, tps in pts:
                assert tokens_per_second(work, params, dtype) == pytest.approx(tps)  # exact at measured sizes
            (p0, t0), (p1, t1) = sorted(pts)[0], sorted(pts)[-1]
            # beyond the table, time per token grows in proportion to the size
            assert tokens_per_second(work, 10 * p1, dtype) == pytest.approx(t1 / 10)
            assert tokens_per_second(work, p0 / 2, dtype) == pytest.approx(2 * t0)
            mid = (p0 * p1) ** 0.5  # log-midpoint: the geometric mean of the neighbours' rates
            if len(pts) == 2:
                assert tokens_per_second(work, mid, dtype) == pytest.approx((t0 * t1) ** 0.5)


def test_disk_counts_one_checkpoint_unless_kept(tmp_path, qwen_pair, shared_data):
    teacher, student, tok = qwen_pair
    base = {"name": "disk", "teacher": save_tiny(teacher, tok, tmp_path / "t"),
            "student": save_tiny(student, tok, tmp_path / "s"), "methods": ["student", "lora", "pissa", "seqkd"],
            "seeds": [0, 1], "analysis": False,
            "budget": {"train_examples": 4, "loss_examples": 3, "eval_limit": 2, "rank": 2}}
    ckpt = sum(p.numel() for p in student.parameters()) * 4  # one fp32 copy of the student
    pruned = Study(validate(ExperimentConfig, base), tmp_path / "o", log=lambda s: None).preflight(plan=True)
    kept = Study(validate(ExperimentConfig, {**base, "keep_checkpoints": True}), tmp_path / "o",
                 log=lambda s: None).preflight(plan=True)
    # 3 built methods x 2 seeds = 6 merged students; pruning keeps one at a time
    assert kept.disk_bytes - pruned.disk_bytes == 5 * ckpt
    assert [s["stage"] for s in kept.stages] == [s["stage"] for s in pruned.stages]


def test_answer_tokens_take_the_cap_for_loops_and_the_mean_for_the_rest():
    from pkt.experiment.plan import ANSWER_LENGTHS, answer_tokens

    looping, others = ANSWER_LENGTHS[("gsm8k", False)]
    assert answer_tokens("gsm8k", 256) == pytest.approx(looping * 256 + (1 - looping) * others)
    assert answer_tokens("gsm8k", 10) == 10  # a cap below every answer's length: each takes the cap
    caps = [8, 32, 64, 128, 256, 512, 2048]
    expected = [answer_tokens("humaneval", c) for c in caps]
    assert all(a < b for a, b in zip(expected, expected[1:])) and all(e <= c for e, c in zip(expected, caps))
    assert answer_tokens("gsm8k", 256, fewshot=True) != answer_tokens("gsm8k", 256)
    assert answer_tokens("no-such-task", 300) == 300  # not measured: counted at the cap


def test_is_fewshot_follows_the_protocol_unless_shots_are_set():
    from pkt.evaluate.tasks.common import is_fewshot

    assert not is_fewshot("gsm8k", "pkt", None) and is_fewshot("gsm8k", "standard", None)
    assert is_fewshot("gsm8k", "pkt", 4) and not is_fewshot("gsm8k", "standard", 0)
    assert not is_fewshot("humaneval", "standard", None)


def test_continuous_generation_scales_with_the_rows_and_padded_waits_for_the_cap():
    from pkt.experiment.plan import CONTINUOUS_ROWS, answer_tokens, continuous_rows_factor, generation_seconds

    rate = {"generate-continuous": 100.0, "generate-continuous-fewshot": 80.0, "forward": 1000.0, "generate": 10.0}

    def secs(work, tokens):
        return tokens / rate[work]

    assert continuous_rows_factor(CONTINUOUS_ROWS) == 1 and continuous_rows_factor(4 * CONTINUOUS_ROWS) == 1
    factors = [continuous_rows_factor(r) for r in (1, 2, 8, 32, 64)]
    assert all(a < b for a, b in zip(factors, factors[1:])) and 0 < factors[0]
    full = generation_seconds(secs, "gsm8k", 300, 256, decoding="continuous", batch=64, fewshot=False,
                              prompt_tokens=120)
    assert full == pytest.approx(300 * answer_tokens("gsm8k", 256) / 100.0)
    # fewer questions than rows decode at fewer rows, so more slowly per token
    few = generation_seconds(secs, "gsm8k", 8, 256, decoding="continuous", batch=64, fewshot=False, prompt_tokens=120)
    assert few == pytest.approx(8 * answer_tokens("gsm8k", 256) / 100.0 / continuous_rows_factor(8))
    fewshot = generation_seconds(secs, "gsm8k", 300, 256, decoding="continuous", batch=64, fewshot=True,
                                 prompt_tokens=120)
    assert fewshot == pytest.approx(300 * answer_tokens("gsm8k", 256, fewshot=True) / 80.0)
    padded = generation_seconds(secs, "gsm8k", 300, 256, decoding="padded", batch=64, fewshot=False,
                                prompt_tokens=120)
    assert padded == pytest.approx(300 * 120 / 1000.0 + 300 * 256 / 10.0)


def test_the_gsm8k_answer_lengths_agree_with_the_decisive_study_records():
    """The share of GSM8K answers that run to the cap, in ANSWER_LENGTHS, against the at_cap counts of every
    evaluation the decisive study has committed (the student's and its builds', held-out and test, 256-token cap)."""
    import json

    from pkt.experiment.plan import ANSWER_LENGTHS

    root = CONFIGS.parent / "docs" / "results" / "decisive-gsm8k"
    results = list(json.loads((root / "student.json").read_text()).values())
    for path in sorted((root / "points").glob("*.json")) + sorted((root / "tests").glob("*.json")):
        rec = json.loads(path.read_text())
        results += [rec[k] for k in ("heldout", "test") if isinstance(rec.get(k), dict)]
    results = [r for r in results if "at_cap" in r]
    assert len(results) >= 6
    share = sum(r["at_cap"] for r in results) / sum(r["n"] for r in results)
    assert share == pytest.approx(ANSWER_LENGTHS[("gsm8k", False)][0], abs=0.05)


def test_answer_lengths_counts_answers_within_two_tokens_of_the_cap_as_capped():
    from benchmarks.answer_lengths import summary

    n, share, mean = summary([10, 254, 256, 20, 253], 256)
    assert (n, share, mean) == (5, 0.4, pytest.approx((10 + 20 + 253) / 3))


def test_method_lrs_change_only_their_methods_stages(tmp_path, qwen_pair, shared_data):
    """``method_lrs`` gives one fine-tuned arm its own lr: its build (and the evaluation of that build) get new
    keys, with the lr in the fine-tuning settings; every other stage keeps its key. A method that fine-tunes
    nothing, or one the study does not run, is refused naming the setting."""
    from types import SimpleNamespace

    from pkt.errors import PktError
    from pkt.methods.base import finetune_cfg

    teacher, student, tok = qwen_pair
    base = {"name": "lrs", "teacher": save_tiny(teacher, tok, tmp_path / "t"),
            "student": save_tiny(student, tok, tmp_path / "s"), "methods": ["student", "lora", "seqkd"],
            "seeds": [0], "analysis": False, "per_task": {"gsm8k": {"lr": 2e-4}},
            "budget": {"train_examples": 4, "loss_examples": 3, "eval_limit": 2, "rank": 2}}
    plain = validate(ExperimentConfig, base)
    own = validate(ExperimentConfig, {**base, "method_lrs": {"seqkd": 1e-4}})
    keys = [{s.stage: s.key for s in Study(c, tmp_path / "o", log=lambda s: None).plan_stages()} for c in (plain, own)]
    assert keys[0].keys() == keys[1].keys()
    changed = sorted(k for k in keys[0] if keys[0][k] != keys[1][k])
    assert changed and all("seqkd" in k for k in changed), changed
    assert changed == ["eval-seqkd-gsm8k-s0", "seqkd-gsm8k-s0"]  # its build and its evaluation
    study = SimpleNamespace(cfg=own, n_train={"gsm8k": 4})
    assert finetune_cfg(study, "gsm8k", 0, "seqkd").lr == 1e-4
    assert finetune_cfg(study, "gsm8k", 0, "lora").lr == 2e-4  # the task's budget, not method_lrs
    for lrs, needle in [({"student": 1e-4}, "student: fine-tunes nothing"),
                        ({"pissa": 1e-4}, "pissa: not among the study's methods"),
                        ({"lora": 0}, "method_lrs.lora: Input should be greater than 0")]:
        with pytest.raises(PktError, match=needle):
            validate(ExperimentConfig, {**base, "method_lrs": lrs})
    # a bad `methods` list is the one error: method_lrs does not add a second, misleading one about membership
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        ExperimentConfig.model_validate({**base, "methods": ["student", "lorra"], "method_lrs": {"lora": 1e-4}})
    assert [e["loc"] for e in err.value.errors()] == [("methods",)], err.value.errors()
