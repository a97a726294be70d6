"""Seeking/PiSSA/LoRA inits on peft: output unchanged at init, merge gives the student back, factor maths."""

from __future__ import annotations

import copy

import pytest
import torch

from pkt.align.lora_init import (init_dropout, make_lora_model, module_names, parse_kinds, svd_factors)
from pkt.errors import PktError
from pkt.models.arch import LINEAR_KINDS, ArchSpec


def _random_factors(spec: ArchSpec, kinds, r: int, seed: int = 0, student=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in module_names(spec, kinds):
        w = student.get_submodule(name).weight
        # stands in for a teacher block of the student's shape and weight scale
        block = torch.randn(w.shape, generator=g) * w.detach().float().std()
        out[name] = svd_factors(block, r)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_svd_factors_are_rank_r_truncation():
    w = torch.randn(12, 7)
    b, a, s = svd_factors(w, 3, return_spectrum=True)
    assert b.shape == (12, 3) and a.shape == (3, 7)
    torch.testing.assert_close(torch.linalg.svdvals(b @ a)[:3], s[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-5, rtol=0)  # A = V_rᵀ has orthonormal rows
    with pytest.raises(PktError, match="rank"):
        svd_factors(w, 8)


@pytest.mark.parametrize("alpha", [16, 32])
def test_seeking_init_keeps_student_output_and_merges_back(tiny_pair, alpha):
    _, student, _ = tiny_pair
    ref = copy.deepcopy(student)
    spec = ArchSpec.from_model(student)
    factors = _random_factors(spec, LINEAR_KINDS, 4, student=student)
    ids = torch.randint(0, spec.vocab_size, (2, 11))
    want = _logits(ref, ids)
    model = make_lora_model(student, "seeking", r=4, alpha=alpha, factors=factors)
    model.eval()
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=0)
    # the adapter really is the teacher block: scaling·B·A = rank-r factor product
    m = model.get_base_model().get_submodule(spec.module_name(1, "up"))
    delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
    b, a = factors[spec.module_name(1, "up")]
    torch.testing.assert_close(delta, b @ a, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    for (n, p), (n2, p2) in zip(merged.state_dict().items(), ref.state_dict().items()):
        assert n == n2
        torch.testing.assert_close(p, p2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_pissa_and_lora_inits_keep_output(qwen_pair, init):
    _, student, _ = qwen_pair
    ref = copy.deepcopy(student)
    ids = torch.randint(0, 100, (1, 9))
    model = make_lora_model(student, init, r=4, alpha=8).eval()
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-4, rtol=0)


def test_first_training_step_sees_the_preserved_function(qwen_pair):
    """In train mode (LoRA dropout active) each init's default must still give the student's function: LoRA's
    adapter starts at zero, PiSSA's defaults to no dropout. PiSSA with LoRA's 0.05 would train a noisy model:
    its adapter holds the student's principal components, so dropping their inputs changes the output."""
    _, student, _ = qwen_pair
    ids = torch.randint(0, 100, (2, 9))
    want = _logits(student, ids)
    for init in ("lora", "pissa"):
        torch.manual_seed(0)
        model = make_lora_model(copy.deepcopy(student), init, r=4, alpha=8).train()
        torch.testing.assert_close(_logits(model, ids), want, atol=1e-4, rtol=0)
    assert init_dropout("pissa") == 0.0 and init_dropout("lora") == init_dropout("seeking") == 0.05
    torch.manual_seed(0)
    noisy = make_lora_model(copy.deepcopy(student), "pissa", r=4, alpha=8, dropout=0.05).train()
    assert (_logits(noisy, ids) - want).abs().max() > 1e-2
    with pytest.raises(PktError, match="init"):
        init_dropout("dora")


def test_embed_and_lm_head_factors_on_untied_student(qwen_pair):
    _, student, _ = qwen_pair
    ref = copy.deepcopy(student)
    spec = ArchSpec.from_model(student)
    kinds = parse_kinds("q,down,embed,lm_head")
    factors = _random_factors(spec, kinds, 3, student=student)
    ids = torch.randint(0, spec.vocab_size, (1, 8))
    model = make_lora_model(student, "seeking", kinds, r=3, alpha=6, factors=factors).eval()
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=0)


def test_tied_student_refuses_embedding_transfer(llama_pair):
    _, student, _ = llama_pair
    spec = ArchSpec.from_model(student)
    factors = _random_factors(spec, ("q", "embed"), 2, student=student)
    with pytest.raises(PktError, match="untied"):
        make_lora_model(student, "seeking", ("q", "embed"), r=2, alpha=2, factors=factors)


def test_missing_factors_and_bad_kinds_are_errors(qwen_pair):
    _, student, _ = qwen_pair
    spec = ArchSpec.from_model(student)
    factors = _random_factors(spec, ("q",), 2, student=student)
    with pytest.raises(PktError, match="no extracted factors"):
        make_lora_model(student, "seeking", ("q", "k"), r=2, alpha=2, factors=factors)
    with pytest.raises(PktError, match="expected some of"):
        parse_kinds("q,attn")
    with pytest.raises(PktError, match="needs extracted factors"):
        make_lora_model(student, "seeking", ("q",), r=2)


def test_bf16_student(qwen_pair):
    _, student, _ = qwen_pair
    student = student.to(torch.bfloat16)
    ref = copy.deepcopy(student)
    spec = ArchSpec.from_model(student)
    factors = _random_factors(spec, ("v", "up"), 2, student=student)
    model = make_lora_model(student, "seeking", ("v", "up"), r=2, alpha=2, factors=factors).eval()
    # Oracle, entry by entry: every base weight is bf16(W − BA) computed in fp32, and the adapter holds B/scaling
    # and A in peft's adapter dtype (fp32: peft keeps adapters of a bf16 base in fp32) — what a silent fall-back to plain LoRA (W kept, B = 0) or a bf16 subtraction would break.
    root = model.get_base_model()
    control = copy.deepcopy(ref)  # the student with BA added but not subtracted: what output preservation prevents
    for name, (b, a) in factors.items():
        m = root.get_submodule(name)
        w0 = ref.get_submodule(name).weight.detach()
        expected = (w0.float() - b.float() @ a.float()).to(torch.bfloat16)
        assert torch.equal(m.get_base_layer().weight, expected), name
        scaling = m.scaling["default"]
        lb, la = m.lora_B["default"].weight, m.lora_A["default"].weight
        assert lb.dtype == la.dtype == torch.float32
        assert torch.equal(lb, b.float() / scaling) and torch.equal(la, a.float()), name
        with torch.no_grad():
            control.get_submodule(name).weight.copy_((w0.float() + b.float() @ a.float()).to(torch.bfloat16))
    ids = torch.randint(0, spec.vocab_size, (1, 6))
    diff = (_logits(model, ids).float() - _logits(ref, ids).float()).abs().max()
    moved = (_logits(control, ids).float() - _logits(ref, ids).float()).abs().max()
    # only the rounding of W − BA is left: far below what the unsubtracted update does to the output
    assert diff < 0.05 * moved, (float(diff), float(moved))
