"""P11 of docs/benchmarks.md: the continuous engine's refill threshold, and where its time goes.

    PKT_DATA_DIR=../shared/data .venv/bin/python -m benchmarks.bench_refill --task gsm8k --dtype bfloat16 \
        --fractions 0.25,0.0625,0.015625

The student decodes the task's prompts (greedy, <= 256 new tokens, ``--rows`` at once) once per refill threshold
(``pkt.evaluate.generate.REFILL_AT``: free rows are refilled once this fraction of them is free), one process, one
loaded model, the thresholds one after another; ``--prefill-chunk 0`` prefills joining prompts unchunked. Prints
per threshold: wall seconds, useful new tokens and tok/s, seconds and tokens in prefills, decoding steps, mean rows
per step, and how many texts equal the first threshold's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from benchmarks.bench_decoding import task_prompts
    from pkt.evaluate import generate as G
    from pkt.models.load import load_model, load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--task", choices=("humaneval", "gsm8k", "gsm8k-8shot"), default="gsm8k")
    ap.add_argument("--prompts", type=int, default=150)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fractions", default="0.25,0.0625")
    ap.add_argument("--prefill-chunk", type=float, default=None,
                    help="pkt.evaluate.generate.PREFILL_CHUNK for every run (0: the joining prompts prefilled in one "
                         "padded batch, as before the chunked prefill); default: the engine's")
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    prompts, stop, _ = task_prompts(args.task, tok, args.prompts)
    model = load_model(args.model, dtype=getattr(torch, args.dtype)).eval()
    if args.prefill_chunk is not None:
        G.PREFILL_CHUNK = args.prefill_chunk
    G.generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up
    first = None
    for frac in (float(f) for f in args.fractions.split(",")):
        G.REFILL_AT = frac
        st = G.GenStats()
        t0 = time.perf_counter()
        texts = [o[0] for o in G.generate(model, tok, prompts, max_new_tokens=256, stop=stop, batch_size=args.rows,
                                          progress=False, stats=st, engine="continuous")]
        secs = time.perf_counter() - t0
        first = first or texts
        print(json.dumps({"refill_at": frac, "seconds": round(secs, 1), "new_tokens": st.new_tokens,
                          "tokens_per_s": round(st.new_tokens / secs, 2), "prefill_tokens": st.prefill_tokens,
                          "prefill_seconds": round(st.prefill_seconds, 1), "decode_steps": st.decode_steps,
                          "mean_rows": round(st.row_steps / max(1, st.decode_steps), 1),
                          "texts_equal_first": sum(a == b for a, b in zip(first, texts))}), flush=True)


if __name__ == "__main__":
    main()
