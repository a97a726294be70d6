"""bf16 autocast in LoRA fine-tuning (``FinetuneConfig.autocast``): it really runs the matmuls in bf16, keeps
fp32 master weights, follows the fp32 loss curve, and its update reaches the model.

Tolerance of the loss curve: 1% relative per step. bf16 keeps 8 significant bits (unit roundoff 2^-8 ≈ 0.39%),
so the logits, and with them a mean token loss, carry errors of that order; a mean over many tokens averages
much of it out (the tiny runs here deviate by ≤ 0.07%). 1% leaves room for that noise compounding over the
steps while still failing on a loop that loses precision systematically (a bf16 loss reduction, a wrong
scale) or on a curve that departs from fp32's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pkt.align.finetune import FinetuneConfig, finetune
from pkt.align.lora_init import make_lora_model
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError

EXAMPLES = [ChatExample(f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}")
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]
CFG = dict(r=4, alpha=8, lr=1e-2, batch_size=2, micro_batch_size=2, epochs=3, max_length=64, dropout=0.0)
REL_TOL = 0.01


def _train(student, tok, autocast: str):
    """Fine-tune a plain LoRA on a copy of ``student`` from the same seeded init; returns (model, logs, init
    adapter, output dtypes seen by the first q_proj during training)."""
    torch.manual_seed(0)
    model = make_lora_model(copy.deepcopy(student), "lora", r=4, alpha=8, dropout=0.0)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    q = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    seen: set = set()
    hook = q.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype) if torch.is_grad_enabled() else None)
    try:
        logs = finetune(model, tok, EXAMPLES, FinetuneConfig(**CFG, autocast=autocast), progress=False)
    finally:
        hook.remove()
    return model, logs, init, seen


def test_autocast_default_is_off():
    assert FinetuneConfig().autocast == "none"
    with pytest.raises((PktError, ValueError)):
        FinetuneConfig(autocast="fp16")


def test_bf16_autocast_follows_fp32_curve_and_trains(qwen_pair):
    _, student, tok = qwen_pair
    ref, ref_logs, init, ref_seen = _train(student, tok, "none")
    amp, amp_logs, init2, amp_seen = _train(student, tok, "bf16")
    assert all(torch.equal(init[n], init2[n]) for n in init)  # same start, same batches (same seed)
    # the option really switches the arithmetic: the projections compute in bf16 only under autocast
    assert ref_seen == {torch.float32} and amp_seen == {torch.bfloat16}

    ref_loss, amp_loss = [r["loss"] for r in ref_logs], [r["loss"] for r in amp_logs]
    assert len(ref_loss) == len(amp_loss) == 9  # ceil(6/2) = 3 steps per epoch × 3 epochs
    for step, (a, b) in enumerate(zip(ref_loss, amp_loss), 1):
        assert abs(a - b) <= REL_TOL * a, f"step {step}: fp32 {a} vs bf16 autocast {b}"
    assert amp_loss[-1] < amp_loss[0] - 0.5  # it learns, as fp32 does (6.18 → 4.63 here)

    trained = dict(amp.named_parameters())
    # master weights stay fp32: autocast casts copies for the matmuls, the optimizer updates fp32 tensors
    assert all(trained[n].dtype == torch.float32 for n in init)
    # the change reached the adapter (plain LoRA starts with B = 0) ...
    moved = [n for n in init if not torch.equal(trained[n], init[n])]
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)
    # ... in the direction fp32 training took it
    ref_params = dict(ref.named_parameters())
    d_amp = torch.cat([(trained[n] - init[n]).flatten() for n in init])
    d_ref = torch.cat([(ref_params[n] - init[n]).flatten() for n in init])
    assert torch.nn.functional.cosine_similarity(d_amp, d_ref, dim=0) > 0.9
    # ... and to the model's output
    ids = tok("What is 3 + 4?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(amp(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-3)
