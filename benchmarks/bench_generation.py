"""Tokens/s of pkt's batched generation vs one-prompt-at-a-time ``model.generate`` (not a timed test).

    flock /tmp/pkt-real.lock .venv/bin/python benchmarks/bench_generation.py \
        --model qwen2.5-coder-0.5b-instruct --prompts 16 --batch-size 16 --max-new-tokens 64

Both sides use greedy decoding on the same GSM8K 0-shot chat prompts and count only real new tokens (up to
and including the end-of-turn token). The baseline is plain ``model.generate`` on one un-padded prompt at a
time (KV cache on); the batched side is :func:`pkt.evaluate.generate.generate` (length-sorted, left-padded).
Writes a JSON line with both rates and their ratio. ``--fixed-length`` makes every row decode exactly
``--max-new-tokens`` tokens (raw throughput); without it, rows that finish early leave batch slots idle, which
lowers the batched rate on short answers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed-length", action="store_true",
                    help="Suppress eos before max-new-tokens on both sides (raw decoding throughput, no idle slots "
                         "in the batch); without it, early-finishing rows leave batch slots idle.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pkt.data.tasks import gsm8k_test
    from pkt.evaluate.generate import GenStats, _eos_ids, generate
    from pkt.evaluate.tasks import gsm8k
    from pkt.evaluate.tasks.common import prompt_text, select
    from pkt.models.load import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype)
    rows = select(gsm8k_test(), args.prompts, 0)
    prompts = [prompt_text(gsm8k.user_turn(r["question"]), tok, "chat", gsm8k.ASSISTANT_PREFIX) for r in rows]
    eos = _eos_ids(model, tok)

    # warm-up (first-call overheads)
    generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2, progress=False)

    # baseline: one prompt at a time, plain HF generate
    seq_tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            enc = tok(p, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                 min_new_tokens=args.max_new_tokens if args.fixed_length else 0)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            seq_tokens += next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    seq_s = time.perf_counter() - t0

    stats = GenStats()
    generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
             progress=False, stats=stats, min_new_tokens=args.max_new_tokens if args.fixed_length else 0)
    res = {
        "fixed_length": args.fixed_length, "model": args.model, "prompts": len(prompts), "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "threads": args.threads,
        "sequential_tokens": seq_tokens, "sequential_s": round(seq_s, 2),
        "sequential_tok_s": round(seq_tokens / seq_s, 2),
        "batched_tokens": stats.new_tokens, "batched_s": round(stats.seconds, 2),
        "batched_tok_s": round(stats.tokens_per_s, 2),
        "speedup": round(stats.tokens_per_s / (seq_tokens / seq_s), 2),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
