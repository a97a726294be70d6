"""P11 of docs/benchmarks.md: where one decoding step of pkt's continuous engine goes (torch.profiler).

    PKT_DATA_DIR=../shared/data .venv/bin/python -m benchmarks.profile_decode_step --dtype bfloat16 --rows 64

The student decodes ``--rows`` HumanEval prompts together (prefilled at once), ``--warm`` steps to grow the context,
then ``--steps`` steps are timed and profiled (``--concat``: the cache grown by concatenation, as before); prints
the seconds per step, the context length and the operators' self CPU time (the largest first).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_decoding import task_prompts
    from pkt.evaluate.kv_cache import _prefill, _Rows
    from pkt.evaluate.logits import greedy_tokens, last_logits
    from pkt.models.load import load_model, load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--warm", type=int, default=40)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--concat", action="store_true",
                    help="grow the KV cache by concatenation, as the engine did before its buffers with room")
    ap.add_argument("--argmax", action="store_true",
                    help="take the greedy token by argmax, as the engine did before greedy_tokens")
    args = ap.parse_args()
    pick = (lambda logits: logits.argmax(-1)) if args.argmax else greedy_tokens
    if args.concat:
        from transformers.cache_utils import DynamicLayer

        from pkt.evaluate import kv_cache

        kv_cache._growing_layer = lambda: DynamicLayer
    tok, model = load_tokenizer(args.model), load_model(args.model, dtype=args.dtype)
    prompts, _, _ = task_prompts("humaneval", tok, args.rows)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with torch.no_grad():
        logits, cache, mask = _prefill(model, ids, None, 0, tok.pad_token_id, "cpu")
        rows = _Rows()
        rows.add(cache, mask, list(range(len(ids))), mask.sum(-1), pick(logits))

        def step():  # the engine's decoding step (pkt.evaluate.generate._generate_refill), no row leaving
            rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), 1)], dim=1)
            out = last_logits(model, input_ids=rows.last[:, None], attention_mask=rows.mask,
                              position_ids=rows.pos[:, None], past_key_values=rows.cache)
            rows.last, rows.pos = pick(out), rows.pos + 1

        for _ in range(args.warm):
            step()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        print(f"{(time.perf_counter() - t) / args.steps:.3f} s a step at context {rows.mask.shape[1]}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
