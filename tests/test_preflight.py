"""`pkt run` refuses a study that cannot succeed before any stage runs: one line, exit status 2.

Each case starts from a config whose preflight passes (the control) and breaks exactly one thing. The
CLI cases run `pkt`'s entry point (the ``pkt_cli`` fixture: its stderr captured at the file descriptor);
sandbox and disk failures are simulated (the machine's real isolation and free space are what they are).
"""

import pytest
import yaml

from pkt.config import validate
from pkt.errors import PktError
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.runner import Study
from pkt.testing import TINY_BUDGET, save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture
def pair(tmp_path, qwen_pair):
    teacher, student, tok = qwen_pair
    return save_tiny(teacher, tok, tmp_path / "teacher"), save_tiny(student, tok, tmp_path / "student")


def _config(tmp_path, name="c.yaml", **over):
    data = {"name": "pre", "teacher": str(tmp_path / "teacher"), "student": str(tmp_path / "student"),
            "tasks": ["gsm8k"], "methods": ["student", "teacher", "seeking", "laten"], "seeds": [0],
            "teacher_dtype": "float32", "analysis": False, "budget": TINY_BUDGET, **over}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path, validate(ExperimentConfig, data)


def _one_line(res, *needles):
    """The one error line of a ``pkt_cli`` result that exited 2, holding each of ``needles``."""
    code, _, err = res
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("pkt: error:"), err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_control_passes_preflight(tmp_path, pair, shared_data):
    _, cfg = _config(tmp_path)
    est = Study(cfg, tmp_path / "out", log=lambda s: None).preflight()
    assert [s["stage"] for s in est.stages][:2] == ["extract-gsm8k", "eval-student-gsm8k-s0"]
    assert not (tmp_path / "out").exists()  # preflight writes nothing


def test_model_that_does_not_resolve(tmp_path, pair, shared_data, pkt_cli):
    path, _ = _config(tmp_path, teacher=str(tmp_path / "no-such-model"))
    line = _one_line(pkt_cli("run", path, "--out", tmp_path / "out"), "no-such-model")
    assert "not an embedded name" in line
    assert not (tmp_path / "out").exists()


def test_directory_that_is_not_a_causal_lm(tmp_path, pair, shared_data, pkt_cli):
    from transformers import BertConfig

    d = tmp_path / "bert"
    d.mkdir()
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
               architectures=["BertForMaskedLM"]).save_pretrained(d)  # a masked-LM checkpoint
    (d / "model.safetensors").write_bytes(b"")
    path, _ = _config(tmp_path, student=str(d))
    _one_line(pkt_cli("run", path, "--out", tmp_path / "out"), "BertForMaskedLM (bert) is not a causal language model")


def test_teacher_smaller_than_student(tmp_path, pair, shared_data, pkt_cli):
    # the tiny teacher is deeper and wider than the student in every projection: swapping them must fail,
    # naming each dimension in which the "teacher" is smaller (tiny_config: 3 < 4 layers, 48 < 64 hidden ...)
    path, _ = _config(tmp_path, teacher=str(tmp_path / "student"), student=str(tmp_path / "teacher"))
    line = _one_line(pkt_cli("run", path, "--out", tmp_path / "out"), "is smaller than student", "layers 3 < 4",
                     "up_proj 112x48 < 176x64", "seeking, laten")
    assert not (tmp_path / "out").exists()
    assert line.count("_proj") == 7  # every projection is smaller in the swapped pair


def test_transfer_free_study_accepts_any_sizes(tmp_path, pair, shared_data):
    # the same swap without a parametric transfer is a valid study (KD works from any teacher)
    _, cfg = _config(tmp_path, teacher=str(tmp_path / "student"), student=str(tmp_path / "teacher"),
                     methods=["student", "teacher", "lora"])
    Study(cfg, tmp_path / "out", log=lambda s: None).preflight()


def test_tokenizers_differ(tmp_path, qwen_pair, shared_data, pkt_cli):
    teacher, student, tok = qwen_pair
    save_tiny(teacher, tok, tmp_path / "teacher")
    other = tiny_tokenizer(vocab_size=300)
    save_tiny(tiny_model("qwen2", "student", len(tok)), other, tmp_path / "student")
    path, _ = _config(tmp_path)
    _one_line(pkt_cli("run", path, "--out", tmp_path / "out"), "laten:", "tokenizers differ")
    # LaTen is what needs them identical: without it (and without the analysis) the study may proceed
    _, cfg = _config(tmp_path, methods=["student", "teacher", "seeking"])
    Study(cfg, tmp_path / "out", log=lambda s: None).preflight()


def test_sandbox_isolation_missing(tmp_path, pair, shared_data, monkeypatch):
    from pkt.evaluate import sandbox

    monkeypatch.setattr(sandbox, "isolation", lambda config=None: {"net": "prelude", "fs": "none", "user": "self"})
    _, cfg = _config(tmp_path, tasks=["mbpp"])
    with pytest.raises(PktError, match=r"^mbpp run generated code, but the sandbox isolation is incomplete") as e:
        Study(cfg, tmp_path / "out", log=lambda s: None).run()
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    _, ok = _config(tmp_path, tasks=["mbpp"], allow_weak_sandbox=True)
    Study(ok, tmp_path / "out", log=lambda s: None).preflight()
    _, no_code = _config(tmp_path, tasks=["gsm8k"])  # no code task: isolation is not needed
    Study(no_code, tmp_path / "out", log=lambda s: None).preflight()


def test_disk_too_small(tmp_path, pair, shared_data, monkeypatch):
    import pkt.experiment.preflight as pf

    _, cfg = _config(tmp_path)
    study = Study(cfg, tmp_path / "out", log=lambda s: None)
    need = study.preflight().disk_bytes
    assert need > 0
    monkeypatch.setattr(pf, "free_bytes", lambda out: need - 1)
    with pytest.raises(PktError, match=r"^disk: .* GB free, the plan writes up to") as e:
        study.run()
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    monkeypatch.setattr(pf, "free_bytes", lambda out: need)
    assert study.preflight().disk_bytes == need


def test_identical_tokenizer_files_load_one_tokenizer(tmp_path, pair):
    from pkt.experiment import preflight as pf

    teacher, student = pf.model_facts(str(tmp_path / "teacher")), pf.model_facts(str(tmp_path / "student"))
    pf.check_tokenizers(teacher, student, ["laten"], analysis=False)
    assert teacher.tokenizer is None and student.tokenizer is not None  # identical files: one load, no comparison
    # the same vocabulary behind files that differ (an extra harmless key) goes through the full comparison
    cfg = tmp_path / "student" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().rstrip()[:-1] + ', "pkt_note": "x"}')
    teacher, student = pf.model_facts(str(tmp_path / "teacher")), pf.model_facts(str(tmp_path / "student"))
    pf.check_tokenizers(teacher, student, ["laten"], analysis=False)
    assert teacher.tokenizer is not student.tokenizer
    assert teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab()


def test_plan_facts_from_headers_match_the_loaded_model(tmp_path, pair):
    from pkt.experiment import preflight as pf
    from pkt.models.arch import ArchSpec, ConfigDims
    from pkt.models.load import load_model

    for d in (tmp_path / "teacher", tmp_path / "student"):
        facts = pf.meta_facts(pf.model_facts(str(d)))
        model = load_model(str(d))
        spec = ArchSpec.from_model(model)
        assert isinstance(facts.spec, ConfigDims)  # read from the headers and the config, no model built
        assert facts.params == sum(p.numel() for p in model.parameters())
        assert (facts.spec.num_layers, facts.spec.hidden_size) == (spec.num_layers, spec.hidden_size)
        for kind in ("q", "k", "v", "o", "gate", "up", "down"):
            assert facts.spec.weight_shape(kind) == spec.weight_shape(kind)
    (tmp_path / "student" / "model.safetensors").write_bytes(b"\x00")  # unreadable header: no fast path
    assert pf.safetensors_params(tmp_path / "student") is None
