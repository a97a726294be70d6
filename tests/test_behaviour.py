"""Behavioural similarity on tiny models: teacher-forced per-token KL and top-1 agreement."""

from __future__ import annotations

import json
import math

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
    """Unbatched, full-logits reference for one example: (KL, teacher top-1, student top-1, gold) per
    response token, over the tokenizer's vocabulary (embedding rows past it are padding, not tokens)."""
    f = tokenize_example(ex, tok)
    ids = torch.tensor([f["input_ids"]])
    v = len(tok)
    with torch.no_grad():
        lt = F.log_softmax(teacher(ids).logits[0, :, :v].float(), -1)
        ls = F.log_softmax(student(ids).logits[0, :, :v].float(), -1)
    out = []
    for t in range(1, ids.shape[1]):
        if f["labels"][t] != IGNORE:
            p = lt[t - 1]
            out.append((float((p.exp() * (p - ls[t - 1])).sum()), int(p.argmax()), int(ls[t - 1].argmax()),
                        f["input_ids"][t]))
    return out


def test_token_kl_matches_unbatched_reference(tiny_pair):
    teacher, student, tok = tiny_pair
    rows = B.token_kl(teacher, student, tok, EXAMPLES, B.BehaviourConfig(batch_size=2))
    ref = [r for ex in EXAMPLES for r in _direct(teacher, student, tok, ex)]
    assert len(rows["kl"]) == len(ref)
    for kl, tt, st, (rkl, rt, rs, _) in zip(rows["kl"], rows["teacher_top1"], rows["student_top1"], ref):
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


def test_summary_is_the_statistics_of_the_unbatched_reference(llama_pair):
    teacher, student, tok = llama_pair
    s = B.behaviour_similarity(teacher, student, tok, EXAMPLES, B.BehaviourConfig(keep_per_token=False, batch_size=2))
    assert "per_token" not in s
    s = s["summary"]
    per_ex = [_direct(teacher, student, tok, ex) for ex in EXAMPLES]
    ref = [r for rows in per_ex for r in rows]
    kl = sorted(r[0] for r in ref)
    n = len(kl)
    assert (s["n_examples"], s["n_tokens"]) == (3, n)
    assert s["kl_mean"] == pytest.approx(sum(kl) / n, rel=1e-4)
    assert s["kl_median"] == pytest.approx((kl[(n - 1) // 2] + kl[n // 2]) / 2, rel=1e-4)
    assert s["kl_p90"] == pytest.approx(kl[int(0.9 * n)], rel=1e-4)  # nearest rank
    assert s["kl_max"] == pytest.approx(kl[-1], rel=1e-4)
    assert s["top1_agreement"] == pytest.approx(sum(r[1] == r[2] for r in ref) / n)
    assert s["teacher_top1_accuracy"] == pytest.approx(sum(r[1] == r[3] for r in ref) / n)
    assert s["student_top1_accuracy"] == pytest.approx(sum(r[2] == r[3] for r in ref) / n)
    assert s["per_example_kl_mean"] == pytest.approx([sum(r[0] for r in rows) / len(rows) for rows in per_ex], rel=1e-4)
    assert 0 < s["top1_agreement"] < 1 and s["kl_mean"] > 0.1  # a pair that neither agrees nor disagrees fully


def test_uniform_student_with_padded_vocabularies_gives_log_v_minus_entropy(tiny_tok):
    """A student whose lm_head is zero predicts the uniform distribution over the tokenizer's V tokens, so
    KL(p‖u) = log V − H(p) at every position, with p the teacher's softmax over those V tokens. Both models
    have embedding rows past the tokenizer (8 and 16, as the real Qwen2.5 models have padding rows): they
    are not tokens and must not enter either softmax."""
    from pkt import testing

    v = len(tiny_tok)
    teacher = testing.tiny_model("qwen2", "teacher", v + 8)
    student = testing.tiny_model("qwen2", "student", v + 16)
    with torch.no_grad():
        student.lm_head.weight.zero_()
    rows = B.token_kl(teacher, student, tiny_tok, EXAMPLES)
    want = []
    for ex in EXAMPLES:
        f = tokenize_example(ex, tiny_tok)
        with torch.no_grad():
            lp = F.log_softmax(teacher(torch.tensor([f["input_ids"]])).logits[0, :, :v].double(), -1)
        want += [math.log(v) + float((lp[t - 1].exp() * lp[t - 1]).sum())
                 for t in range(1, len(f["labels"])) if f["labels"][t] != IGNORE]
    assert rows["kl"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert set(rows["student_top1"]) == {0}  # all logits tie: the first token
