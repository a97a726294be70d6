"""The shared training loop (pkt.align.loop) changed no number: SFT and GKD against the loops they replaced.

LoRA SFT and GKD each had their own copy of the loop (schedule, shuffle, clipping, log record); both now
run :func:`pkt.align.loop.train_loop` with their own step function. The two functions below are the
former loops, kept here, verbatim in their arithmetic (progress bar and tracker left out: they compute
nothing), as the oracle: on the same tiny runs the new code must give *exactly* the same per-step losses,
gradient norms, learning rates and LoRA weights. The runs use LoRA dropout and GKD's mix of sampled and
gold answers, so the loops' RNG draws (torch's for the dropout masks and the sampling, the loop's
``random.Random`` for the shuffle and GKD's on-policy coin) must also happen in the same order.
SFT here takes the reference loss path (``logits="full"``), whose arithmetic is the old one; the default
path is compared with it to float tolerance in tests/test_finetune_fast_loss.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from pkt.align.finetune import FinetuneConfig, finetune
from pkt.align.gkd import GKDConfig, generalized_jsd_loss, gkd_finetune, sample_continuations
from pkt.align.guard import check_finite
from pkt.align.lora_init import make_lora_model
from pkt.data.chat import IGNORE, collate, render_prompt, tokenize_example
from pkt.data.jsonl import ChatExample

EXAMPLES = [ChatExample(f"What is {a} + {b}?" + " Think." * (a % 3), f"{a} + {b} = {a + b}. The answer is {a + b}")
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1)]]


def _old_finetune(model, tokenizer, examples, cfg) -> list[dict]:
    """The SFT loop of pkt.align.finetune before the shared loop (commit d642a07)."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    def n_labels(feat):
        return sum(1 for x in feat["labels"][1:] if x != IGNORE)

    feats = [tokenize_example(e, tokenizer, cfg.style, cfg.max_length, cfg.train_on_inputs, cfg.assistant_turns)
             for e in examples]
    feats = [f for f in feats if n_labels(f)]
    acc = Accelerator()
    torch.manual_seed(cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(feats) / cfg.batch_size)
    total = max(1, math.ceil(per_epoch * cfg.epochs))
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * total),
                          num_training_steps=total)
    model, opt = acc.prepare(model, opt)
    model.train()
    amp = (torch.autocast(acc.device.type, dtype=torch.bfloat16) if cfg.autocast == "bf16"
           else contextlib.nullcontext())
    rng = random.Random(cfg.seed)
    logs: list[dict] = []
    world, rank = acc.num_processes, acc.process_index
    step = 0
    while step < total:
        order = list(range(len(feats)))
        rng.shuffle(order)
        for s in range(per_epoch):
            if step >= total:
                break
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            mine = idx[rank::world]
            n_micro = max(1, math.ceil(math.ceil(len(idx) / world) / cfg.micro_batch_size))
            n_tokens = sum(n_labels(feats[i]) for i in idx)
            loss_sum = torch.zeros((), device=acc.device)
            for m in range(n_micro):
                mb = [feats[i] for i in mine[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]]
                batch = {k: v.to(acc.device) for k, v in collate(mb or [feats[idx[0]]], tokenizer.pad_token_id).items()}
                sync = contextlib.nullcontext() if m == n_micro - 1 else acc.no_sync(model)
                with sync:
                    with amp:
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       use_cache=False).logits
                    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE, reduction="sum") * (1.0 if mb else 0.0)
                    acc.backward(token_loss * (world / n_tokens))
                loss_sum += token_loss.detach() / n_tokens
            loss_sum = float(acc.reduce(loss_sum, reduction="sum")) if world > 1 else float(loss_sum)
            check_finite(loss_sum, step + 1, "fine-tuning")
            grad_norm = float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            logs.append({"step": step, "epoch": round(step / per_epoch, 3), "loss": round(loss_sum, 5), "lr": lr,
                         "grad_norm": round(grad_norm, 5)})
    model.eval()
    return logs


def _old_gkd(model, teacher, tokenizer, examples, ft, gcfg) -> list[dict]:
    """The loop of pkt.align.gkd.gkd_finetune before the shared loop (commit d642a07)."""
    from transformers import get_scheduler

    dev = next(model.parameters()).device
    gold = [tokenize_example(e, tokenizer, ft.style, ft.max_length) for e in examples]
    prompts = [tokenizer(render_prompt(e.messages()[:-1], tokenizer, ft.style), add_special_tokens=False)["input_ids"]
               for e in examples]
    torch.manual_seed(ft.seed)
    teacher.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=ft.lr, weight_decay=ft.weight_decay)
    per_epoch = math.ceil(len(examples) / ft.batch_size)
    total = max(1, math.ceil(per_epoch * ft.epochs))
    sched = get_scheduler(ft.scheduler, opt, num_warmup_steps=int(ft.warmup_ratio * total), num_training_steps=total)
    rng = random.Random(ft.seed)
    logs: list[dict] = []
    step = 0
    while step < total:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(per_epoch):
            if step >= total:
                break
            idx = order[s * ft.batch_size:(s + 1) * ft.batch_size]
            on_policy = [rng.random() < gcfg.lmbda for _ in idx]
            feats: list[dict] = []
            model.eval()
            for m in range(0, len(idx), ft.micro_batch_size):
                part = idx[m:m + ft.micro_batch_size]
                pol = [i for i, on in zip(part, on_policy[m:m + ft.micro_batch_size]) if on]
                sampled = dict(zip(pol, sample_continuations(model, tokenizer, [prompts[i] for i in pol], gcfg,
                                                             seed=ft.seed * 100003 + step * 1009 + m))) if pol else {}
                for i in part:
                    feats.append({"input_ids": prompts[i] + sampled[i],
                                  "attention_mask": [1] * (len(prompts[i]) + len(sampled[i])),
                                  "labels": [IGNORE] * len(prompts[i]) + sampled[i]} if i in sampled else gold[i])
            model.train()
            n_tokens = sum(sum(1 for x in f["labels"][1:] if x != IGNORE) for f in feats)
            loss_sum = 0.0
            for m in range(0, len(feats), ft.micro_batch_size):
                batch = {k: v.to(dev) for k, v in collate(feats[m:m + ft.micro_batch_size],
                                                          tokenizer.pad_token_id).items()}
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                s_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).logits
                keep = batch["labels"][:, 1:] != IGNORE
                loss = generalized_jsd_loss(s_logits[:, :-1][keep], t_logits[:, :-1][keep].to(s_logits.device),
                                            None, beta=gcfg.beta) / n_tokens
                loss.backward()
                loss_sum += float(loss.detach())
            check_finite(loss_sum, step + 1, "gkd")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, ft.max_grad_norm or float("inf")))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            logs.append({"step": step, "epoch": round(step / per_epoch, 3), "loss": round(loss_sum, 6), "lr": lr,
                         "grad_norm": round(grad_norm, 5), "on_policy": sum(on_policy), "tokens": n_tokens})
    model.eval()
    return logs


def _lora(student, seed=0):
    torch.manual_seed(seed)  # the LoRA A init draws from torch's global RNG
    return make_lora_model(copy.deepcopy(student), "lora", r=4, alpha=8, dropout=0.1)


def _lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _same(new_logs, old_logs, keys):
    assert len(new_logs) == len(old_logs)
    for a, b in zip(new_logs, old_logs):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_sft_on_the_shared_loop_is_the_old_loop(qwen_pair, autocast):
    _, student, tok = qwen_pair
    cfg = FinetuneConfig(r=4, alpha=8, dropout=0.1, lr=1e-2, batch_size=4, micro_batch_size=2, epochs=2,
                         max_length=64, warmup_ratio=0.25, logits="full", autocast=autocast)
    old_model, new_model = _lora(student), _lora(student)
    old = _old_finetune(old_model, tok, EXAMPLES, cfg)
    new = finetune(new_model, tok, EXAMPLES, cfg, progress=False)
    assert len(new) == 4 and new[-1]["loss"] < new[0]["loss"]  # 2 steps per epoch (4 + 3 examples), 2 epochs
    _same(new, old, ["step", "epoch", "loss", "lr", "grad_norm"])
    a, b = _lora_state(new_model), _lora_state(old_model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_gkd_on_the_shared_loop_is_the_old_loop(qwen_pair):
    teacher, student, tok = qwen_pair
    ft = FinetuneConfig(r=4, alpha=8, dropout=0.1, lr=1e-2, batch_size=4, micro_batch_size=2, epochs=2,
                        max_length=64)
    gcfg = GKDConfig(lmbda=0.5, max_new_tokens=6)
    old_model, new_model = _lora(student), _lora(student)
    old = _old_gkd(old_model, teacher, tok, EXAMPLES, ft, gcfg)
    new = gkd_finetune(new_model, teacher, tok, EXAMPLES, ft, gcfg, progress=False)
    assert len(new) == 4
    # the coin gave both kinds of answers, so sampling and the gold path are both compared
    assert 0 < sum(r["on_policy"] for r in old) < len(EXAMPLES) * 2
    # the loop applies both heads at the continuation rows only (pkt.align.token_loss.kept_logits) where the old
    # one sliced the full logits: the same sums from a GEMM of another shape, so equal to float rounding, not bit
    # for bit (a wrong row, shift or scale moves the loss by percents)
    _same(new, old, ["step", "epoch", "lr", "on_policy", "tokens"])
    for a, b in zip(new, old):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert list(new[0]) == ["step", "epoch", "loss", "lr", "grad_norm", "on_policy", "tokens", "tokens_per_s",
                            "seconds"]
    a, b = _lora_state(new_model), _lora_state(old_model)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6 * b[n].abs().max().item(), msg=n)
    assert any(not torch.equal(a[n], _lora_state(_lora(student))[n]) for n in a)  # it trained
