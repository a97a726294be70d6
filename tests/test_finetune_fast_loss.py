"""Fine-tuning's memory-lean loss (pkt.align.token_loss) and length-grouped micro-batches against the reference.

* ``answer_token_loss`` (hidden states -> head at the labelled positions only, chunked, gradient taken in
  the forward) equals the full-logits cross-entropy, in value and in the gradients it sends to every LoRA
  weight, for both tiny families and for chunks of one row up to all rows;
* a fine-tuning run on the default (fast) path follows the reference path (``logits="full"``): per-step
  losses within 1e-5 relative and LoRA weights within 1e-5 after six steps, with LoRA dropout on (the
  dropout masks are the same: the head carries no LoRA);
* a head that is trained (Seeking with ``lm_head`` among its targets) falls back to the reference path;
* ``group_by_length``: micro-batches cut from the length-sorted step hold the same examples with less
  padding, and with dropout off the run's losses and weights equal the ungrouped run's to float rounding.

Tolerance 1e-5 (relative, float32): the two paths sum the same terms in another order and shape (the head's
matmul over the kept rows instead of all rows; softmax - onehot times W instead of autograd's chain), so
they agree to a few float32 roundings (measured: below 1e-6 on these runs); 1e-5 still fails on a wrong
shift, a dropped or double-counted position or a mis-scaled gradient, which move the loss by percents.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pkt.align.finetune import FinetuneConfig, finetune, micro_batches
from pkt.align.lora_init import make_lora_model
from pkt.align.token_loss import answer_token_loss, fast_path_applies, full_logits_loss
from pkt.data.chat import collate, tokenize_example
from pkt.data.jsonl import ChatExample

EXAMPLES = [ChatExample(f"What is {a} + {b}?" + " Please think it through." * (a % 4),
                        f"{a} + {b} = {a + b}." + " Check: yes." * (b % 3) + f" The answer is {a + b}")
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 5)]]
REL = 1e-5


def _lora(student, dropout=0.1, targets=None):
    torch.manual_seed(0)
    kw = {"kinds": targets} if targets else {}
    model = make_lora_model(copy.deepcopy(student), "lora", r=4, alpha=8, dropout=dropout, **kw)
    # plain LoRA starts with B = 0; random B makes the LoRA gradients of A non-zero from the start
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 100 * 7, 2**30])
def test_answer_token_loss_equals_full_logits_loss(tiny_pair, chunk_bytes):
    _, student, tok = tiny_pair
    model = _lora(student, dropout=0.0)
    model.train()
    batch = collate([tokenize_example(e, tok, "chat", 128) for e in EXAMPLES[:4]], tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()  # padding and prompts
    ref = full_logits_loss(model, batch)
    g_ref = _grads(model, ref)
    fast = answer_token_loss(model, batch, chunk_bytes=chunk_bytes)
    g_fast = _grads(model, fast)
    assert fast.item() == pytest.approx(ref.item(), rel=REL)
    assert g_ref.keys() == g_fast.keys() and any("lora_A" in n for n in g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=REL, atol=1e-6 * g_ref[n].abs().max().item(), msg=n)


def test_fast_path_run_follows_the_reference_run(qwen_pair):
    _, student, tok = qwen_pair
    cfg = dict(r=4, alpha=8, dropout=0.1, lr=1e-2, batch_size=4, micro_batch_size=2, epochs=3, max_length=128)
    ref_model, fast_model = _lora(student), _lora(student)
    assert fast_path_applies(fast_model)
    ref = finetune(ref_model, tok, EXAMPLES, FinetuneConfig(**cfg, logits="full"), progress=False)
    fast = finetune(fast_model, tok, EXAMPLES, FinetuneConfig(**cfg), progress=False)
    assert len(ref) == len(fast) == 6 and fast[-1]["loss"] < fast[0]["loss"] - 0.5  # it learns
    assert [r["loss"] for r in fast] == pytest.approx([r["loss"] for r in ref], rel=REL)
    assert [r["grad_norm"] for r in fast] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4)
    a = dict(fast_model.named_parameters())
    for n, p in ref_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(a[n], p, rtol=REL, atol=REL * p.abs().max().item(), msg=n)


def test_a_trained_head_takes_the_reference_path(qwen_pair):
    _, student, tok = qwen_pair
    model = _lora(student, targets=["q", "v", "lm_head"])
    assert not fast_path_applies(model)
    assert fast_path_applies(_lora(student))
    # the run goes through (the reference path trains the head's LoRA too)
    head_before = {n: p.clone() for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad}
    assert head_before
    finetune(model, tok, EXAMPLES[:4], FinetuneConfig(r=4, alpha=8, lr=1e-2, batch_size=4, micro_batch_size=2,
                                                      epochs=1, max_length=64, dropout=0.0), progress=False)
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in head_before.items())


def test_micro_batches_grouped_by_length_pad_less_and_keep_the_step():
    lengths = [50, 10, 48, 12, 30, 11, 49, 29]
    idx = [0, 1, 2, 3, 4, 5, 6, 7]
    plain = micro_batches(idx, lengths, 2)
    grouped = micro_batches(idx, lengths, 2, group_by_length=True)
    assert sorted(sum(grouped, [])) == sorted(sum(plain, [])) == idx

    def padded(mbs):
        return sum(len(mb) * max(lengths[i] for i in mb) for mb in mbs)

    assert padded(plain) == 2 * (50 + 48 + 30 + 49) and padded(grouped) == 2 * (11 + 29 + 48 + 50)
    # two processes: each takes every other example of the sorted step, and both run 2 micro-batches
    r0, r1 = (micro_batches(idx, lengths, 2, world=2, rank=r, group_by_length=True) for r in (0, 1))
    assert r0 == [[1, 3], [4, 6]] and r1 == [[5, 7], [2, 0]]
    assert micro_batches([3], lengths, 2, world=2, rank=1) == [[]]  # an empty, zero-weighted dummy


def test_grouped_run_equals_the_ungrouped_run(qwen_pair):
    _, student, tok = qwen_pair
    cfg = dict(r=4, alpha=8, dropout=0.0, lr=1e-2, batch_size=8, micro_batch_size=2, epochs=3, max_length=128)
    lengths = [len(tokenize_example(e, tok, "chat", 128)["input_ids"]) for e in EXAMPLES]
    assert len(set(lengths)) == len(EXAMPLES)  # the examples differ in length, so grouping changes the micro-batches
    plain_model, grouped_model = _lora(student, dropout=0.0), _lora(student, dropout=0.0)
    plain = finetune(plain_model, tok, EXAMPLES, FinetuneConfig(**cfg), progress=False)
    grouped = finetune(grouped_model, tok, EXAMPLES, FinetuneConfig(**cfg, group_by_length=True), progress=False)
    assert [r["loss"] for r in grouped] == pytest.approx([r["loss"] for r in plain], rel=REL)
    a = dict(grouped_model.named_parameters())
    for n, p in plain_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(a[n], p, rtol=REL, atol=REL * p.abs().max().item(), msg=n)
    assert "group_by_length" in FinetuneConfig().model_dump() and "logits" not in FinetuneConfig().model_dump()


def test_kept_logits_equal_the_full_logits_at_the_kept_positions(tiny_pair):
    """GKD's logits at the continuation positions only (the head applied there) equal the slice of the full
    logits, in value and in the gradients a loss on them sends to the LoRA weights (pkt.align.token_loss)."""
    from pkt.align.token_loss import kept_logits

    _, student, tok = tiny_pair
    model = _lora(student, dropout=0.0)
    model.train()
    batch = collate([tokenize_example(e, tok, "chat", 128) for e in EXAMPLES[:4]], tok.pad_token_id)
    keep = batch["labels"][:, 1:] != -100
    assert 0 < int(keep.sum()) < keep.numel()  # prompts and padding are left out

    def loss_of(logits):  # a loss that uses every logit, so that every row's gradient is compared
        return (torch.log_softmax(logits.float(), -1) * torch.linspace(-1, 1, logits.shape[-1])).sum()

    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    ref = full[:, :-1][keep]
    g_ref = _grads(model, loss_of(ref))
    got = kept_logits(model, batch, keep)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref.detach(), rtol=REL, atol=1e-6)
    g_got = _grads(model, loss_of(got))
    assert g_ref.keys() == g_got.keys() and any("lora_A" in n for n in g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=REL, atol=1e-6 * g_ref[n].abs().max().item(), msg=n)
