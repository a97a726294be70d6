"""Tokens/s of the three kinds of work a study does, per model size and dtype: the table behind the time
estimate of ``pkt run --dry-run`` (``pkt.experiment.plan.THROUGHPUT``). Not a timed test.

    flock /tmp/pkt-heavy.lock .venv/bin/python benchmarks/bench_throughput.py \
        --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct

* ``forward``: no-grad forward of a batch of real prompts (GSM8K train split, chat template), padded to a
  common length (evaluation's prefill, the answer loss, attribution, representations);
* ``train``: forward + backward + AdamW step of a rank-16 LoRA on q,k,v,o,gate,up,down (fine-tuning, KD;
  also the proxy for sensitivity's full backward);
* ``generate``: batched greedy decoding with a KV cache, every row forced to decode ``--new-tokens``
  tokens (new tokens per second, prefill included).

Prints one JSON object {mode: {dtype: [[params, tokens_per_s], ...]}} plus the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _batch(tok, n: int, length: int) -> dict:
    from pkt.data.chat import tokenize_example
    from pkt.data.tasks import load_split

    rows = load_split("gsm8k", "train")[:n]
    ids = [tokenize_example(r, tok, "chat", length, True)["input_ids"] for r in rows]
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure(name: str, dtype: str, args) -> dict:
    from peft import LoraConfig, get_peft_model

    from pkt.models.load import load_model, load_tokenizer

    tok = load_tokenizer(name)
    model = load_model(name, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    batch = _batch(tok, args.batch, args.length)
    n_tokens = int(batch["attention_mask"].sum())
    out = {"params": params}

    def forward():
        with torch.no_grad():
            model(**batch, use_cache=False)

    if "forward" in args.modes:
        out["forward"] = n_tokens / _timed(forward, args.repeats)

    gen_batch = {k: v[:, -64:] for k, v in batch.items()}  # short prompts: decoding dominates

    def gen():
        with torch.no_grad():
            model.generate(**gen_batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)

    if "generate" in args.modes:
        out["generate"] = gen_batch["input_ids"].shape[0] * args.new_tokens / _timed(gen, 1)
    if "train" not in args.modes:
        return out

    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    lora.train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-5)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def train():
        loss = lora(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out["train"] = n_tokens / _timed(train, args.repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--modes", default="forward,generate,train", help="which kinds of work to measure")
    args = ap.parse_args()
    args.modes = args.modes.split(",")
    torch.set_num_threads(args.threads)
    table: dict = {"forward": {}, "train": {}, "generate": {}}
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            t0 = time.perf_counter()
            r = measure(name, dtype, args)
            for mode in args.modes:
                table[mode].setdefault(dtype, []).append([r["params"], round(r[mode], 1)])
            print(json.dumps({"model": name, "dtype": dtype, **{k: round(v, 1) for k, v in r.items()}}),
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                 f"{args.threads} threads, torch {torch.__version__}", "throughput": table}))


if __name__ == "__main__":
    main()
