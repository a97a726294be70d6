"""Behavioural similarity: per-token KL(teacher‖student) and top-1 agreement on response tokens.

Teacher-forced: both models read the same tokenised example (same tokenizer, checked by the caller via
``assert_same_tokenizer``); at each response token the next-token distributions predicted from the
preceding position are compared. Only the logits at those positions are computed (``logits_to_keep``),
so a 152k vocabulary costs no full ``[B, T, V]`` tensor. The two vocabularies are cut to the shared
size ``min(V_teacher, V_student, len(tokenizer))`` before the softmax (padding rows of an embedding
matrix are not tokens). KL is in nats.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pkt.data.chat import IGNORE, tokenize_example
from pkt.errors import PktError
from pkt.models.load import module_device


@dataclass(frozen=True)
class BehaviourConfig:
    batch_size: int = 4
    style: str = "chat"
    max_length: int = 1024
    keep_per_token: bool = True


def _batches(feats: list[dict], batch_size: int, pad_id: int):
    for s in range(0, len(feats), batch_size):
        chunk = feats[s: s + batch_size]
        width = max(len(f["input_ids"]) for f in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        b_idx, p_idx, gold = [], [], []
        for b, f in enumerate(chunk):
            n = len(f["input_ids"])
            ids[b, :n] = torch.tensor(f["input_ids"])
            mask[b, :n] = 1
            for t in range(1, n):
                if f["labels"][t] != IGNORE:
                    b_idx.append(b)
                    p_idx.append(t - 1)  # the position whose logits predict token t
                    gold.append(f["input_ids"][t])
        yield s, ids, mask, torch.tensor(b_idx), torch.tensor(p_idx), torch.tensor(gold)


def _logprobs(model, ids, mask, keep: torch.Tensor, b_idx, col, vocab: int) -> torch.Tensor:
    device = module_device(model.get_input_embeddings())  # not next(parameters()): meta when offloaded
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device),
                use_cache=False)
    dev = out.logits.device  # the lm_head's device, not necessarily the embedding's
    logits = out.logits[b_idx.to(dev), col.to(dev), :vocab].float().cpu()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def token_kl(teacher: nn.Module, student: nn.Module, tokenizer, examples, cfg: BehaviourConfig = BehaviourConfig(),
             progress: Callable | None = None) -> dict:
    """Per response token: KL(teacher‖student), top-1 of each model and the gold token."""
    feats = [tokenize_example(e, tokenizer, cfg.style, cfg.max_length) for e in examples]
    vocab = min(teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0],
                len(tokenizer))
    rows = {"example": [], "kl": [], "teacher_top1": [], "student_top1": [], "gold": []}
    batches = list(_batches(feats, cfg.batch_size, tokenizer.pad_token_id))
    for start, ids, mask, b_idx, p_idx, gold in (progress(batches) if progress else batches):
        if len(b_idx) == 0:
            continue
        keep = torch.unique(p_idx)  # sorted positions to compute logits at
        col = torch.searchsorted(keep, p_idx)
        lt = _logprobs(teacher, ids, mask, keep, b_idx, col, vocab)
        ls = _logprobs(student, ids, mask, keep, b_idx, col, vocab)
        kl = (lt.exp() * (lt - ls)).sum(-1).clamp_min(0.0)
        rows["example"] += (b_idx + start).tolist()
        rows["kl"] += kl.tolist()
        rows["teacher_top1"] += lt.argmax(-1).tolist()
        rows["student_top1"] += ls.argmax(-1).tolist()
        rows["gold"] += gold.tolist()
    if not rows["kl"]:
        raise PktError("no response tokens in the examples")
    return rows


def summarise(rows: dict, n_examples: int) -> dict:
    kl = rows["kl"]
    agree = [a == b for a, b in zip(rows["teacher_top1"], rows["student_top1"])]
    skl = sorted(kl)
    per_ex: dict[int, list[float]] = {}
    for e, v in zip(rows["example"], kl):
        per_ex.setdefault(e, []).append(v)
    return {
        "n_examples": n_examples,
        "n_tokens": len(kl),
        "kl_mean": statistics.fmean(kl),
        "kl_median": statistics.median(kl),
        "kl_p90": skl[min(len(skl) - 1, int(0.9 * len(skl)))],
        "kl_max": skl[-1],
        "top1_agreement": statistics.fmean(agree),
        "teacher_top1_accuracy": statistics.fmean(a == g for a, g in zip(rows["teacher_top1"], rows["gold"])),
        "student_top1_accuracy": statistics.fmean(a == g for a, g in zip(rows["student_top1"], rows["gold"])),
        "per_example_kl_mean": [statistics.fmean(per_ex[e]) for e in sorted(per_ex)],
    }


def behaviour_similarity(teacher, student, tokenizer, examples, cfg: BehaviourConfig = BehaviourConfig(),
                         progress: Callable | None = None) -> dict:
    """Summary (and, if ``cfg.keep_per_token``, the per-token rows) as a JSON-ready dict."""
    rows = token_kl(teacher, student, tokenizer, examples, cfg, progress)
    out = {"config": asdict(cfg), "summary": summarise(rows, len(examples))}
    if cfg.keep_per_token:
        out["per_token"] = rows
    return out
