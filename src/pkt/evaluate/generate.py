"""Batched generation and next-token scoring for evaluation.

* Prompts are sorted by length and batched (left padding, attention mask, KV cache), so padding is small;
  results come back in input order.
* Stop strings end a sequence early (transformers' ``stop_strings``) and the text is also truncated at the
  first stop string afterwards (the criterion works on tokens, a stop may end mid-token).
* Greedy when ``temperature == 0``; otherwise seeded sampling (``torch.manual_seed(seed + batch index)``), with
  ``num_samples`` continuations per prompt for pass@k.
* ``engine="continuous"`` decodes greedy prompts in one running batch: a finished sequence leaves it and the
  next prompts join (their prefill cache left-padded to the batch's), so the batch no longer waits for its
  longest answer. Built on transformers' DynamicCache and the model's own forward; transformers' paged
  ``generate_batch`` gives the same answers but was slower than padded batches on the reference CPU
  (docs/benchmarks.md P9). A long prefix every prompt shares (few-shot exemplars) is prefilled once and attended
  as one copy (:mod:`pkt.evaluate.prefix_attention`). Sampling always uses the padded path, whose per-batch
  seeds make samples reproducible.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from pkt.evaluate.kv_cache import (_Rows, _prefill, _prefill_prefix, _prefix_groups, _shared_prefix,
                                   _supports_refill, left_padded)
from pkt.evaluate.logits import greedy_tokens, last_logits
from pkt.evaluate.prefix_attention import attending


# the continuous engine refills its free rows once this fraction of them is free: prefills then come in groups
# (fuller matrix products, fewer merges of new rows into the cache)
REFILL_AT = 0.25
# prompts joining together are prefilled in chunks of similar length: a chunk ends where the next prompt is shorter
# than this fraction of the chunk's longest, so no row pads more than (1 - PREFILL_CHUNK) of its width. One padded
# prefill of the first 64 HumanEval prompts (47-400 tokens) computed 1.9x its real tokens. 0: one prefill per refill.
PREFILL_CHUNK = 0.75
# a prompt prefix every prompt shares is attended as one copy (pkt.evaluate.prefix_attention) from this many tokens
# on (few-shot exemplars): below it, copied into every row, as the chat templates' system turns (31 tokens here)
# are, so that zero-shot evaluations keep SDPA's kernel and its exact numbers
SEPARATE_PREFIX = 256


@dataclass
class GenStats:
    prompts: int = 0
    sequences: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    # the continuous engine's breakdown (benchmarks read it; records keep to_dict's fields): seconds spent in
    # prefills, decoding steps taken and the rows they decoded (row_steps / decode_steps = mean occupancy)
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_steps: int = 0
    row_steps: int = 0

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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return left_padded(enc, pad, device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, stop: list[str] | None = None,
             batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, num_samples: int = 1,
             seed: int = 0, progress: bool = True, desc: str = "generating",
             stats: GenStats | None = None, min_new_tokens: int = 0, engine: str = "padded") -> list[list[str]]:
    """Continuations of each prompt: ``out[i]`` is a list of ``num_samples`` strings (truncated at stops).

    ``batch_size`` counts sequences (prompts x samples) per forward batch. ``min_new_tokens`` suppresses eos
    before that many tokens (benchmarks use it to measure fixed-length decoding throughput). ``engine``:
    ``padded`` or ``continuous`` (greedy only; ``batch_size`` is then the number of sequences decoded at once).
    """
    if engine not in ("padded", "continuous"):
        raise ValueError(f"engine must be 'padded' or 'continuous', not {engine!r}")
    stop = [s for s in (stop or []) if s]
    if num_samples > 1 and temperature <= 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be identical)")
    stats = stats if stats is not None else GenStats()
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    per_batch = max(1, batch_size // max(1, num_samples))
    results: list[list[str] | None] = [None] * len(prompts)
    bar = _progress(len(prompts), desc, progress)
    t0 = time.perf_counter()
    if engine == "continuous" and temperature <= 0 and not min_new_tokens and prompts:
        done = _generate_refill(model, tokenizer, enc, max_new_tokens=max_new_tokens, stop=stop,
                                batch_size=batch_size, eos=eos, pad=pad, stats=stats, bar=bar)
        if done is not None:
            results, order = done, []
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



def _length_chunks(items: list[int], lengths: list[int], ratio: float) -> list[list[int]]:
    """``items`` (longest first) cut into runs in which every length is at least ``ratio`` times the run's first;
    ``ratio`` 0 keeps them in one run."""
    chunks: list[list[int]] = []
    tops: list[int] = []
    for item, n in zip(items, lengths):
        if chunks and n >= ratio * tops[-1]:
            chunks[-1].append(item)
        else:
            chunks.append([item])
            tops.append(n)
    return chunks


def _generate_refill(model, tokenizer, ids: list[list[int]], *, max_new_tokens: int, stop: list[str],
                     batch_size: int, eos: list[int], pad: int, stats: GenStats, bar) -> list[list[str]] | None:
    """Greedy continuations with ``batch_size`` sequences decoded at once; a finished sequence's slot is given
    to the next prompt (longest prompts first) once a quarter of the slots are free, so that prefills come in
    groups. A prefix every prompt shares is prefilled once; from ``SEPARATE_PREFIX`` tokens on (few-shot
    exemplars) the rows attend to that one copy, shorter ones are copied into each row. Returns None when the
    model's cache is not a plain dynamic one (sliding windows): use the padded path then."""
    device = next(model.parameters()).device
    shared = _shared_prefix(ids)
    prefix = None
    if shared:  # e.g. few-shot exemplars: their cache is computed once
        t_fill = time.perf_counter()
        prefix = _prefill_prefix(model, ids[0][:shared], device)
        if prefix is None:  # the padded path takes over and counts nothing of this
            return None
        stats.prefill_seconds += time.perf_counter() - t_fill
        stats.prefill_tokens += shared
    # a long prefix stays one copy that every row attends to; a short one (a chat template's system turn) is copied
    # into each row, where SDPA's kernel attends to it, and so is any prefix on an accelerator (the one-copy
    # attention runs torch's CPU flash kernel)
    separate = shared >= SEPARATE_PREFIX and device.type == "cpu"
    with attending(model, prefix) if separate else contextlib.nullcontext():
        return _decode_rows(model, tokenizer, ids, prefix, shared, separate, device, max_new_tokens=max_new_tokens,
                            stop=stop, batch_size=batch_size, eos=eos, pad=pad, stats=stats, bar=bar)


def _decode_rows(model, tokenizer, ids, prefix, shared: int, separate: bool, device, *, max_new_tokens: int, stop,
                 batch_size: int, eos, pad: int, stats: GenStats, bar) -> list[list[str]] | None:
    """The continuous engine's loop (:func:`_generate_refill`) behind a prefilled shared ``prefix`` (or None)."""
    todo = sorted(range(len(ids)), key=lambda i: -len(ids[i]))[::-1]  # pop() from the end: longest first
    tail = max((len(s) for s in stop), default=0) + 1  # tokens are >= 1 character: covers any stop just ended
    out: dict[int, list[int]] = {}
    rows = _Rows()
    gen: dict[int, list[int]] = {}
    refill_at = max(1, int(batch_size * REFILL_AT))

    def finished(i: int) -> bool:
        toks = gen[i]
        if toks[-1] in eos or len(toks) >= max_new_tokens:
            return True
        return bool(stop) and any(s in tokenizer.decode(toks[-tail:], skip_special_tokens=True) for s in stop)

    while todo or len(rows):
        free = batch_size - len(rows)
        if todo and (free >= min(refill_at, len(todo)) or not len(rows)):
            new = [todo.pop() for _ in range(min(free, len(todo)))]
            t_fill = time.perf_counter()
            for chunk in _length_chunks(new, [len(ids[i]) - shared for i in new], PREFILL_CHUNK):
                logits, cache, mask = _prefill(model, [ids[i][shared:] for i in chunk], prefix, shared, pad, device,
                                               separate)
                if not _supports_refill(cache):
                    return None
                first = greedy_tokens(logits)
                for i, t in zip(chunk, first.tolist()):
                    gen[i] = [t]
                rows.add(cache, mask, chunk, mask.sum(-1) + (shared if separate else 0), first)
            stats.prefill_seconds += time.perf_counter() - t_fill
            stats.prefill_tokens += sum(len(ids[i]) - shared for i in new)
        else:
            stats.decode_steps += 1
            stats.row_steps += len(rows)
            rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), 1)], dim=1)
            logits = last_logits(model, input_ids=rows.last[:, None], attention_mask=rows.mask,
                                 position_ids=rows.pos[:, None], past_key_values=rows.cache)
            rows.last = greedy_tokens(logits)
            rows.pos = rows.pos + 1
            for i, t in zip(rows.ids, rows.last.tolist()):
                gen[i].append(t)
        alive = []
        for r, i in enumerate(rows.ids):
            if finished(i):
                out[i] = gen.pop(i)
                bar.update(1)
            else:
                alive.append(r)
        rows.keep(alive)
    results: list[list[str]] = []
    for i in range(len(ids)):
        toks = out[i]
        n = next((j + 1 for j, t in enumerate(toks) if t in eos), len(toks))
        stats.new_tokens += n
        results.append([truncate_at_stop(tokenizer.decode(toks[:n], skip_special_tokens=True), stop)])
    stats.sequences += len(ids)
    return results


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str], token_ids: list[int], *, batch_size: int = 8,
                        progress: bool = True, desc: str = "scoring", engine: str = "padded") -> torch.Tensor:
    """Log-probabilities of ``token_ids`` as the next token after each prompt: shape (len(prompts), len(ids)).

    ``engine="continuous"``: prompts that share a header (one MMLU subject's few-shot examples) are scored
    together behind that header's cache, computed once per group."""
    if engine == "continuous" and prompts:
        out = _grouped_next_token_logprobs(model, tokenizer, prompts, token_ids, batch_size=batch_size,
                                           progress=progress, desc=desc)
        if out is not None:
            return out
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


def _grouped_next_token_logprobs(model, tokenizer, prompts, token_ids, *, batch_size, progress, desc):
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = torch.empty(len(prompts), len(token_ids))
    cols = torch.tensor(token_ids, device=device)
    bar = _progress(len(prompts), desc, progress)
    for group in _prefix_groups(ids):
        shared = _shared_prefix([ids[i] for i in group]) if len(group) > 1 else 0
        prefix = _prefill_prefix(model, ids[group[0]][:shared], device) if shared else None
        if shared and prefix is None:
            bar.close()
            return None
        group.sort(key=lambda i: -len(ids[i]))
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            logits, _, _ = _prefill(model, [ids[i][shared:] for i in chunk], prefix, shared, pad, device)
            out[chunk] = torch.log_softmax(logits.float(), dim=-1)[:, cols].cpu()
            bar.update(len(chunk))
    bar.close()
    return out


LOSS_LOGITS_BYTES = 1 << 30  # the answer loss's float32 logits per forward (see response_nll)


@torch.no_grad()
def response_nll(model, features: list[dict], pad_id: int, *, batch_size: int = 8, progress: bool = True,
                 desc: str = "answer loss") -> list[tuple[float, int]]:
    """(summed NLL, token count) of the labelled tokens of each tokenised example (labels -100 ignored)."""
    from pkt.data.chat import collate

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    res: list[tuple[float, int] | None] = [None] * len(features)
    bar = _progress(len(features), desc, progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([features[i] for i in idx], pad_id, padding_side="right")
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        # Vocabulary logits only from the first labelled position on: the prompt's would be thrown away, and
        # at ~150k tokens they are a large share of the forward's time and memory.
        labelled = (labels != -100).any(0).nonzero()
        first = max(1, int(labelled[0])) if len(labelled) else labels.shape[1] - 1
        keep_at = torch.arange(first - 1, labels.shape[1] - 1, device=device)
        # The float32 logits (rows x positions x vocabulary) and the cross-entropy's log-softmax of them are the
        # peak: at 32 rows x 384 positions x 152k tokens that is 2 x 7.5 GB, beyond a 24 GB machine with the
        # model beside it. Rows go through the model in chunks that keep the logits under LOSS_LOGITS_BYTES.
        rows = max(1, LOSS_LOGITS_BYTES // (len(keep_at) * vocab * 4))
        for c in range(0, len(idx), rows):
            part = slice(c, c + rows)
            logits = model(input_ids=batch["input_ids"][part], attention_mask=batch["attention_mask"][part],
                           use_cache=False, logits_to_keep=keep_at).logits.float()
            lab = labels[part, first:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), lab.clamp_min(0), reduction="none")
            keep = lab != -100
            for k, i in enumerate(idx[part]):
                res[i] = (float((nll[k] * keep[k]).sum()), int(keep[k].sum()))
            del logits, nll
        bar.update(len(idx))
    bar.close()
    return res  # type: ignore[return-value]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: list[str], continuations: list[list[int]], *,
                          batch_size: int = 8, progress: bool = True, desc: str = "scoring",
                          engine: str = "padded") -> list[list[float]]:
    """Summed log-probability of each continuation (token ids) after each prompt, as lm-eval's loglikelihood
    scores a multiple-choice option: ``out[i][j] = log p(continuations[j] | prompts[i])``.

    Single-token continuations (MMLU's letters for most tokenizers) need one forward per prompt; longer ones
    are scored teacher-forced, one sequence per (prompt, continuation)."""
    if all(len(c) == 1 for c in continuations):
        lp = next_token_logprobs(model, tokenizer, prompts, [c[0] for c in continuations], batch_size=batch_size,
                                 progress=progress, desc=desc, engine=engine)
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
