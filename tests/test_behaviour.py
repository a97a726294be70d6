"""Behavioural similarity on tiny models: teacher-forced per-token KL and top-1 agreement."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pkt.analyse import behaviour as B
from pkt.data.chat import IGNORE, tokenize_example
from pkt.data.jsonl import ChatExample

EXAMPLES = [
    ChatExample("Natalia sold 48 clips in April and half as many in May. How many?", "48 + 24 = 72. Answer: 72"),
    ChatExample("def add(a, b):", "    return a + b"),
    ChatExample("What is the capital of France?", "Paris."),
]


def _direct(teacher, student, tok, ex):
    """Unbatched, full-logits reference for one example."""
    f = tokenize_example(ex, tok)
    ids = torch.tensor([f["input_ids"]])
    with torch.no_grad():
        lt = F.log_softmax(teacher(ids).logits[0].float(), -1)
        ls = F.log_softmax(student(ids).logits[0].float(), -1)
    out = []
    for t in range(1, ids.shape[1]):
        if f["labels"][t] != IGNORE:
            p = lt[t - 1]
            out.append((float((p.exp() * (p - ls[t - 1])).sum()), int(p.argmax()), int(ls[t - 1].argmax())))
    return out


def test_token_kl_matches_unbatched_reference(tiny_pair):
    teacher, student, tok = tiny_pair
    rows = B.token_kl(teacher, student, tok, EXAMPLES, B.BehaviourConfig(batch_size=2))
    ref = [r for ex in EXAMPLES for r in _direct(teacher, student, tok, ex)]
    assert len(rows["kl"]) == len(ref)
    for kl, tt, st, (rkl, rt, rs) in zip(rows["kl"], rows["teacher_top1"], rows["student_top1"], ref):
        assert kl == pytest.approx(rkl, rel=1e-4, abs=1e-5)
        assert (tt, st) == (rt, rs)
    assert sorted(set(rows["example"])) == [0, 1, 2]


def test_self_kl_zero_and_full_agreement(qwen_pair):
    teacher, _, tok = qwen_pair
    res = B.behaviour_similarity(teacher, teacher, tok, EXAMPLES)
    s = res["summary"]
    assert s["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert s["top1_agreement"] == 1.0
    assert s["teacher_top1_accuracy"] == s["student_top1_accuracy"]
    assert len(s["per_example_kl_mean"]) == 3
    json.dumps(res)


def test_kl_positive_for_different_models(llama_pair):
    teacher, student, tok = llama_pair
    s = B.behaviour_similarity(teacher, student, tok, EXAMPLES, B.BehaviourConfig(keep_per_token=False))
    assert "per_token" not in s
    s = s["summary"]
    assert s["kl_mean"] > 0 and 0 <= s["top1_agreement"] <= 1
    assert s["kl_median"] <= s["kl_p90"] <= s["kl_max"]
