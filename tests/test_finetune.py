"""LoRA SFT for the three inits: trains only the adapter, saves a plain-peft adapter and a merged checkpoint
that agree with each other (adapter applied to the *original* student, incl. peft's mutated-init conversion)."""

from __future__ import annotations

import copy

import pytest
import torch

from pkt.align.finetune import FinetuneConfig, finetune, train_and_save
from pkt.align.lora_init import make_lora_model, module_names, svd_factors
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.models.arch import LINEAR_KINDS, ArchSpec

EXAMPLES = [ChatExample(f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}")
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]
CFG = dict(r=4, alpha=8, lr=1e-2, batch_size=4, micro_batch_size=2, epochs=2, max_length=64, dropout=0.0)


def _factors(student, r):
    spec = ArchSpec.from_model(student)
    g = torch.Generator().manual_seed(0)
    return {n: svd_factors(torch.randn(student.get_submodule(n).weight.shape, generator=g)
                           * student.get_submodule(n).weight.std().item(), r)
            for n in module_names(spec, LINEAR_KINDS)}


def _model(student, init):
    return make_lora_model(student, init, r=4, alpha=8, dropout=0.0,
                           factors=_factors(student, 4) if init == "seeking" else None)


def test_finetune_trains_adapter_only(qwen_pair):
    _, student, tok = qwen_pair
    model = _model(student, "seeking")
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    logs = finetune(model, tok, EXAMPLES, FinetuneConfig(**CFG), progress=False)
    assert len(logs) == 4  # ceil(6/4)=2 steps per epoch × 2 epochs
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)


@pytest.mark.parametrize("init", ["seeking", "pissa", "lora"])
def test_saved_adapter_and_merged_checkpoint_agree(qwen_pair, tmp_path, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, student, tok = qwen_pair
    original = copy.deepcopy(student)
    model = _model(student, init)
    out = tmp_path / init
    summary = train_and_save(model, tok, EXAMPLES, FinetuneConfig(**{**CFG, "epochs": 1}), init, out, progress=False)
    assert summary["steps"] == 2 and (out / "train_log.jsonl").is_file()
    ids = torch.tensor([tok("What is 2 + 2?")["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(copy.deepcopy(original), out / "adapter").eval()
        got = adapted(input_ids=ids).logits
        before = original(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - before).abs().max() > 1e-4  # training changed the model
    gen = merged.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen[0, ids.shape[1]].item() == int(want[0, -1].argmax())  # greedy: the merged model's own argmax


def test_config_validation():
    with pytest.raises(PktError, match="style"):
        FinetuneConfig(style="alpaca")
    with pytest.raises(PktError, match="micro_batch_size"):
        FinetuneConfig(batch_size=2, micro_batch_size=4)
