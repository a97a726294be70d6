"""Batched generation and next-token scoring for evaluation.

* Prompts are sorted by length and batched (left padding, attention mask, KV cache), so padding is small;
  results come back in input order.
* Stop strings end a sequence early (transformers' ``stop_strings``) and the text is also truncated at the
  first stop string afterwards (the criterion works on tokens, a stop may end mid-token).
* Greedy when ``temperature == 0``; otherwise seeded sampling (``torch.manual_seed(seed + batch index)``), with
  ``num_samples`` continuations per prompt for pass@k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class GenStats:
    prompts: int = 0
    sequences: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "sequences": self.sequences, "new_tokens": self.new_tokens,
                "seconds": round(self.seconds, 2), "tokens_per_s": round(self.tokens_per_s, 2)}


def truncate_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    cand = getattr(gc, "eos_token_id", None) if gc is not None else None
    for x in ([cand] if isinstance(cand, int) else list(cand or [])) + [tokenizer.eos_token_id]:
        if x is not None and x not in ids:
            ids.append(int(x))
    return ids


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, unit="prompt")


def encode_left_padded(tokenizer, texts: list[str], device) -> dict[str, torch.Tensor]:
    """Left-padded batch without adding special tokens (the prompt text already has them)."""
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        if e:
            ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, stop: list[str] | None = None,
             batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, num_samples: int = 1,
             seed: int = 0, progress: bool = True, desc: str = "generating",
             stats: GenStats | None = None, min_new_tokens: int = 0) -> list[list[str]]:
    """Continuations of each prompt: ``out[i]`` is a list of ``num_samples`` strings (truncated at stops).

    ``batch_size`` counts sequences (prompts x samples) per forward batch. ``min_new_tokens`` suppresses eos
    before that many tokens (benchmarks use it to measure fixed-length decoding throughput).
    """
    stop = [s for s in (stop or []) if s]
    if num_samples > 1 and temperature <= 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be identical)")
    stats = stats if stats is not None else GenStats()
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    per_batch = max(1, batch_size // max(1, num_samples))
    results: list[list[str] | None] = [None] * len(prompts)
    bar = _progress(len(prompts), desc, progress)
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(order), per_batch)):
        idx = order[start:start + per_batch]
        batch = encode_left_padded(tokenizer, [prompts[i] for i in idx], device)
        kwargs = dict(max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad, eos_token_id=eos,
                      num_return_sequences=num_samples)
        if min_new_tokens:
            kwargs["min_new_tokens"] = min_new_tokens
        if temperature > 0:
            torch.manual_seed(seed + b)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=tokenizer)
        out = model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        for r in range(new.shape[0]):
            row = new[r].tolist()
            n = len(row)
            for j, t in enumerate(row):
                if t in eos or t == pad:
                    n = j + (t != pad or t in eos)
                    break
            stats.new_tokens += n
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for k, i in enumerate(idx):
            results[i] = [truncate_at_stop(t, stop) for t in texts[k * num_samples:(k + 1) * num_samples]]
        stats.sequences += new.shape[0]
        bar.update(len(idx))
    bar.close()
    stats.prompts += len(prompts)
    stats.seconds += time.perf_counter() - t0
    return results  # type: ignore[return-value]


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str], token_ids: list[int], *, batch_size: int = 8,
                        progress: bool = True, desc: str = "scoring") -> torch.Tensor:
    """Log-probabilities of ``token_ids`` as the next token after each prompt: shape (len(prompts), len(ids))."""
    device = next(model.parameters()).device
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    out = torch.empty(len(prompts), len(token_ids))
    ids = torch.tensor(token_ids, device=device)
    bar = _progress(len(prompts), desc, progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = encode_left_padded(tokenizer, [prompts[i] for i in idx], device)
        logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
        out[idx] = torch.log_softmax(logits, dim=-1)[:, ids].cpu()
        bar.update(len(idx))
    bar.close()
    return out


@torch.no_grad()
def response_nll(model, features: list[dict], pad_id: int, *, batch_size: int = 8, progress: bool = True,
                 desc: str = "answer loss") -> list[tuple[float, int]]:
    """(summed NLL, token count) of the labelled tokens of each tokenised example (labels -100 ignored)."""
    from pkt.data.chat import collate

    device = next(model.parameters()).device
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    res: list[tuple[float, int] | None] = [None] * len(features)
    bar = _progress(len(features), desc, progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([features[i] for i in idx], pad_id, padding_side="right")
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
        keep = labels != -100
        for k, i in enumerate(idx):
            res[i] = (float((nll[k] * keep[k]).sum()), int(keep[k].sum()))
        bar.update(len(idx))
    bar.close()
    return res  # type: ignore[return-value]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: list[str], continuations: list[list[int]], *,
                          batch_size: int = 8, progress: bool = True, desc: str = "scoring") -> list[list[float]]:
    """Summed log-probability of each continuation (token ids) after each prompt, as lm-eval's loglikelihood
    scores a multiple-choice option: ``out[i][j] = log p(continuations[j] | prompts[i])``.

    Single-token continuations (MMLU's letters for most tokenizers) need one forward per prompt; longer ones
    are scored teacher-forced, one sequence per (prompt, continuation)."""
    if all(len(c) == 1 for c in continuations):
        lp = next_token_logprobs(model, tokenizer, prompts, [c[0] for c in continuations], batch_size=batch_size,
                                 progress=progress, desc=desc)
        return lp.tolist()
    device = next(model.parameters()).device
    ctx = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(len(continuations))]
    out = [[0.0] * len(continuations) for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = _progress(len(jobs), desc, progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        seqs = [ctx[i] + continuations[j] for i, j in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, s in enumerate(seqs):  # left padding keeps every continuation at the right edge
            ids[k, width - len(s):] = torch.tensor(s)
            mask[k, width - len(s):] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for k, (i, j) in enumerate(chunk):
            n = len(continuations[j])
            pos = torch.arange(width - n - 1, width - 1)
            out[i][j] = float(logp[k, pos, torch.tensor(continuations[j])].sum())
        bar.update(len(chunk))
    bar.close()
    return out
