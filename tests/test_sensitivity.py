"""Sensitivity via post-accumulate-grad hooks equals per-example autograd; layer selection rules."""

from __future__ import annotations

import pytest
import torch

from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.locate.layers import select_layers
from pkt.locate.sensitivity import (compute_sensitivity, layer_scores, per_example_sensitivity_oracle,
                                    tokenize_samples)
from pkt.models.arch import ArchSpec

EXAMPLES = [
    ChatExample("What is 2 + 3?", "2 + 3 = 5. The answer is 5"),
    ChatExample("Write a function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ChatExample("The capital of France?", "Paris"),
]


def test_hook_sensitivity_matches_per_example_autograd(tiny_pair):
    teacher, _, tok = tiny_pair
    samples = tokenize_samples(EXAMPLES, tok)
    got = compute_sensitivity(teacher, samples, progress=False)
    want = per_example_sensitivity_oracle(teacher, samples)
    assert set(got) == set(want)
    for n in got:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6 * want[n].abs().max().item() + 1e-9)
    # weights untouched, no gradients left behind, flags restored
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())


def test_sensitivity_is_sum_of_per_sample_abs_not_abs_of_sum(qwen_pair):
    teacher, _, tok = qwen_pair
    samples = tokenize_samples(EXAMPLES[:2], tok)
    both = compute_sensitivity(teacher, samples, progress=False)
    a = compute_sensitivity(teacher, samples[:1], progress=False)
    b = compute_sensitivity(teacher, samples[1:], progress=False)
    for n in both:
        torch.testing.assert_close(both[n], a[n] + b[n], rtol=1e-5, atol=1e-8)


def test_bf16_weights_fp32_cpu_accumulators(qwen_pair):
    teacher, _, tok = qwen_pair
    samples = tokenize_samples(EXAMPLES[:1], tok)
    ref = compute_sensitivity(teacher, samples, progress=False)
    teacher = teacher.to(torch.bfloat16)
    got = compute_sensitivity(teacher, samples, accum_device="cpu", progress=False)
    for n in ref:
        assert got[n].dtype == torch.float32 and got[n].device.type == "cpu"
        # bf16 forward/backward is approximate: correlate rather than match
        c = torch.corrcoef(torch.stack([got[n].flatten(), ref[n].flatten()]))[0, 1]
        assert c > 0.9, n


def test_layer_scores_sum_layer_params(qwen_pair):
    teacher, _, tok = qwen_pair
    spec = ArchSpec.from_model(teacher)
    sens = compute_sensitivity(teacher, tokenize_samples(EXAMPLES[:1], tok), progress=False)
    scores = layer_scores(sens, spec)
    assert scores.shape == (spec.num_layers,)
    want = sum(v.double().sum() for k, v in sens.items() if k.startswith("model.layers.1."))
    assert scores[1].item() == pytest.approx(want.item(), rel=1e-9)


def test_unlabelled_sample_is_an_error(qwen_pair):
    teacher, _, _ = qwen_pair
    with pytest.raises(PktError, match="no labelled"):
        compute_sensitivity(teacher, [{"input_ids": [1, 2, 3], "labels": [-100] * 3}], progress=False)


def test_select_layers_strategies():
    s = torch.tensor([5.0, 1.0, 9.0, 3.0, 9.0, 0.5])
    assert select_layers(s, 3, "score") == [0, 2, 4]
    assert select_layers(s, 3, "sensitivity") == [0, 2, 4]
    assert select_layers(s, 2, "first") == [0, 1]
    assert select_layers(s, 2, "last") == [4, 5]
    r = select_layers(s, 4, "random", seed=3)
    assert r == sorted(r) and len(set(r)) == 4 and r == select_layers(s, 4, "random", seed=3)
    assert select_layers(None, 2, "last", n_teacher=4) == [2, 3]
    assert select_layers(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]  # ties to lower index
    with pytest.raises(PktError, match="cannot map"):
        select_layers(s, 7)
    with pytest.raises(PktError, match="expected one of"):
        select_layers(s, 2, "middle")
