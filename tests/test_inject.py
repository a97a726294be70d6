"""Injection: hooks equal the fused weights, zero deltas change nothing, gradients flow, fused saves reload."""

from __future__ import annotations

import pytest
import torch

from pkt.errors import PktError
from pkt.inject import Injector, dense, fuse, load_deltas, save_fused
from pkt.models.arch import ArchSpec


def _ids(tok):
    return torch.tensor([tok("Question: 48 clips in April, half in May. Answer: 72", add_special_tokens=False)["input_ids"]])


def _random_deltas(spec, gen, scale=0.5, requires_grad=False):
    deltas = {}
    for layer in range(spec.num_layers):
        for kind in ("gate", "up", "down", "v", "o", "q", "k"):
            out_f, in_f = spec.weight_shape(kind)
            n_axis, length = (out_f, in_f) if kind not in ("o", "down") else (in_f, out_f)
            idx = torch.randperm(n_axis, generator=gen)[: max(1, n_axis // 5)]
            val = (torch.randn(idx.numel(), length, generator=gen) * scale).requires_grad_(requires_grad)
            deltas[(layer, kind)] = (idx, val)
    return deltas


@torch.no_grad()
def test_zero_delta_is_the_student_and_hooks_equal_fused_weights(tiny_pair):
    _, student, tok = tiny_pair
    spec = ArchSpec.from_model(student)
    ids = _ids(tok)
    ref = student(input_ids=ids).logits
    deltas = _random_deltas(spec, torch.Generator().manual_seed(0))
    zero = {k: (i, torch.zeros_like(v)) for k, (i, v) in deltas.items()}
    with Injector(student, spec).set(zero):
        assert torch.equal(student(input_ids=ids).logits, ref)
    with Injector(student, spec).set(deltas):
        hooked = student(input_ids=ids).logits
    assert torch.equal(student(input_ids=ids).logits, ref)  # hooks removed on exit
    assert not torch.allclose(hooked, ref)
    fuse(student, deltas, spec)
    torch.testing.assert_close(student(input_ids=ids).logits, hooked, atol=1e-4, rtol=1e-4)


def test_gradient_reaches_the_values(qwen_pair):
    _, student, tok = qwen_pair
    spec = ArchSpec.from_model(student)
    student.requires_grad_(False)
    deltas = _random_deltas(spec, torch.Generator().manual_seed(1), scale=0.01, requires_grad=True)
    ids = _ids(tok)
    with Injector(student, spec).set(deltas):
        loss = student(input_ids=ids, labels=ids).loss
    loss.backward()
    for key, (_, val) in deltas.items():
        assert val.grad is not None and val.grad.abs().sum() > 0, key
    assert all(p.grad is None for p in student.parameters())


def test_fused_checkpoint_differs_exactly_at_located_rows_and_columns(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    _, student, tok = tiny_pair
    spec = ArchSpec.from_model(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    deltas = _random_deltas(spec, torch.Generator().manual_seed(2))
    out = save_fused(student, tok, deltas, tmp_path / "fused", {"note": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    touched = set()
    for (layer, kind), (idx, val) in deltas.items():
        name = spec.module_name(layer, kind) + ".weight"
        touched.add(name)
        diff = reloaded.state_dict()[name] - before[name]
        want = dense(spec, kind, idx, val)
        torch.testing.assert_close(diff, want, atol=1e-6, rtol=0)
        mask = want != 0
        assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))  # untouched entries bit-identical
    for name, w in reloaded.state_dict().items():
        if name not in touched:
            assert torch.equal(w, before[name]), name
    saved = load_deltas(out / "laten_deltas.safetensors")
    assert set(saved) == set(deltas)
    for key, (idx, val) in deltas.items():
        assert torch.equal(saved[key][0], idx) and torch.equal(saved[key][1], val)


def test_bad_deltas(qwen_pair):
    _, student, _ = qwen_pair
    spec = ArchSpec.from_model(student)
    d = spec.hidden_size
    with pytest.raises(PktError):
        Injector(student).set({(0, "up"): (torch.tensor([0, 0]), torch.zeros(2, d))})
    with pytest.raises(PktError):
        Injector(student).set({(0, "up"): (torch.tensor([0]), torch.zeros(1, d + 1))})
    with pytest.raises(PktError):
        Injector(student).set({(99, "up"): (torch.tensor([0]), torch.zeros(1, d))})
    with pytest.raises(PktError):
        Injector(student).set({(0, "v"): (torch.tensor([spec.kv_dim]), torch.zeros(1, d))})
