"""benchmarks/eval_chunked.py: a chunked, resumable evaluation gives exactly what one `evaluate_model` call on
the same seeded subset gives (ids, outputs, verdicts, score), and a rerun evaluates nothing again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pkt.evaluate import evaluate_model
from pkt.testing import save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where benchmarks/ lives


@pytest.mark.parametrize("task,protocol,limit,variant", [("gsm8k", "gsm8k=lm-eval-cot", 3, None),
                                                         ("mmlu", "mmlu=lm-eval", 5, None),
                                                         ("mbpp", "mbpp=qwen-coder", 2, "sanitized")])
def test_chunked_equals_one_call(tmp_path, fixture_data_dir, qwen_pair, monkeypatch, task, protocol, limit, variant):
    from benchmarks import eval_chunked as ec
    import pkt.models.load as load

    _, student, tok = qwen_pair
    model_dir = save_tiny(student, tok, tmp_path / "student")
    kw = dict(batch_size=2, max_new_tokens=6, limit=limit, seed=3, **({"mbpp_variant": variant} if variant else {}))
    one = evaluate_model(load.load_model(str(model_dir)), load.load_tokenizer(str(model_dir)), [task],
                         out_dir=tmp_path / "one", protocol=protocol, progress=False, log=None, **kw)
    run = tmp_path / "chunked"
    assert ec.produce(run, str(model_dir), task, protocol, "float32", chunk=2, budget_min=-1, **kw) is None
    merged = ec.produce(run, str(model_dir), task, protocol, "float32", chunk=2, budget_min=60, **kw)
    assert merged["complete"] and merged["n"] == one[task]["n"] == limit
    assert merged["accuracy"] == pytest.approx(one[task].get("accuracy", one[task].get("pass@1")))
    a = [json.loads(x) for x in (tmp_path / "one" / task / "predictions.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (run / task / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["output"], r["correct"]) for r in a] == [(r["id"], r["output"], r["correct"]) for r in b]
    # a rerun loads no model and evaluates nothing; the record carries every verdict
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("finished chunks were evaluated again"))
    assert ec.produce(run, str(model_dir), task, protocol, "float32", chunk=2, budget_min=60, **kw) == merged
    rec = ec.record(run, task, tmp_path / "rec.json")
    assert rec["verdicts"] == {str(r["id"]): r["correct"] for r in a} and rec["score"] == merged["accuracy"]
    assert (rec["limit"], rec["seed"], rec["n"]) == (limit, 3, limit)  # the subset, not a chunk's own settings
    if variant:  # the sanitized rows (their own task ids), not the full set's, and the record says so
        from pkt.data.tasks import mbpp_rows

        ids = {str(r["task_id"]) for r in mbpp_rows(variant)}
        assert rec["mbpp_variant"] == variant and set(rec["verdicts"]) <= ids
        assert ids != {str(r["task_id"]) for r in mbpp_rows("full")}


def test_continuous_mmlu_scores_like_padded(fixture_data_dir, qwen_pair):
    """MMLU 5-shot under `decoding: continuous` (each subject's few-shot header scored once): the padded path's
    per-question verdicts."""
    _, student, tok = qwen_pair
    kw = dict(batch_size=2, limit=6, seed=1, protocol="mmlu=lm-eval", progress=False, log=None)
    a = evaluate_model(student, tok, ["mmlu"], **kw)["mmlu"]
    b = evaluate_model(student, tok, ["mmlu"], decoding="continuous", **kw)["mmlu"]
    assert a["n"] == b["n"] >= 2 and a["accuracy"] == b["accuracy"] and a["macro_accuracy"] == b["macro_accuracy"]


def test_continuous_decoding_gives_the_padded_records(fixture_data_dir, qwen_pair):
    """`decoding: continuous` end to end (GSM8K 8-shot CoT: the exemplars are the shared prefix): the same
    outputs and verdicts as padded decoding, and metrics.json says which engine ran."""
    _, student, tok = qwen_pair
    kw = dict(batch_size=2, max_new_tokens=6, limit=5, seed=3, protocol="gsm8k=lm-eval-cot", progress=False,
              log=None)
    padded = evaluate_model(student, tok, ["gsm8k"], **kw)
    cont = evaluate_model(student, tok, ["gsm8k"], decoding="continuous", **kw)
    assert (cont["gsm8k"]["protocol"]["decoding"], padded["gsm8k"]["protocol"]["decoding"]) == ("continuous",
                                                                                                 "padded")
    assert cont["gsm8k"]["accuracy"] == padded["gsm8k"]["accuracy"]
    n = padded["gsm8k"]["n"]
    assert cont["gsm8k"]["hit_max_new_tokens"] == padded["gsm8k"]["hit_max_new_tokens"] == n >= 2
