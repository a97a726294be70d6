"""P9 of docs/benchmarks.md: greedy decoding engines side by side on real task prompts (not a timed test).

    flock /tmp/pkt-heavy.lock .venv/bin/python -m benchmarks.bench_decoding --task humaneval --prompts 96 \
        --batch-size 32 --engines padded,continuous,hf-paged --out p9.json

* ``padded``: :func:`pkt.evaluate.generate.generate`'s default, ``model.generate`` on length-sorted, left-padded
  batches; a batch runs until its longest answer ends.
* ``continuous``: the same function with ``engine="continuous"`` (pkt's running batch: finished rows leave,
  new prompts join), ``--batch-size`` rows at once.
* ``hf-paged``: transformers' own continuous batching, ``model.generate_batch`` (paged KV cache), sized for
  ``--batch-size`` concurrent sequences. It has no stop strings, so its outputs run to the end token and are
  truncated at the stops afterwards (the same text, more tokens decoded).

``--engines`` takes ENGINE[@ROWS][:DTYPE] (e.g. ``continuous-whole-head@32,continuous@64,continuous@64:bfloat16``),
where ``continuous-whole-head`` is the continuous engine with the vocabulary projection as one product, its cache
grown by concatenation, its tokens taken by argmax and the prompts joining together prefilled in one padded batch
(the engine before P11), ``continuous-concat`` the engine with its cache grown by concatenation instead of in
buffers with room, ``continuous-unchunked`` the engine with the joining prompts prefilled in one padded batch
instead of chunks of similar length, ``continuous-copied`` the engine with a long shared prefix (few-shot
exemplars) copied into every row instead of attended as one copy (as the engine before P11 did too), and DTYPE
the weights' dtype (default ``--dtype``; each dtype's model is loaded once).
Every answer is scored as the task scores it (HumanEval: the EvalPlus-style program in pkt's sandbox; GSM8K: the
extracted number against the gold answer), so the gate compares *verdicts*, not only texts: for each engine, the
answers and verdicts that differ from the first engine's, and for each differing answer the token at which the
two greedy paths part (the cause: the same dtype should part nowhere; another dtype rounds the logits
differently). The texts are kept in ``--out``.

Prompts are the task's own (HumanEval: the Qwen2.5-Coder protocol; GSM8K: the pkt protocol; gsm8k-cot:
lm-eval's 8-shot chain of thought, whose exemplars the continuous engine prefills once), with the task's stops.
Reported per engine: wall seconds, real new tokens (up to the end token or stop), useful tokens/s, and how many
answers equal the first engine's. The engines run in the order given in one process, on one loaded model, so
the ratios are side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import torch


def task_prompts(task: str, tok, n: int) -> tuple[list[str], list[str], list[dict]]:
    """(prompts, stop strings, rows) of the task's first ``n`` questions in pkt's order (seed 0)."""
    from pkt.evaluate.tasks.common import select

    if task == "humaneval":
        from pkt.evaluate.tasks import humaneval as he

        rows = select(he.load_rows(), n, 0)
        return [he.qwen_prompt(r["prompt"]) for r in rows], he.EVALPLUS_STOP, rows
    from pkt.data.tasks import gsm8k_test
    from pkt.evaluate.tasks import gsm8k
    from pkt.evaluate.tasks.common import prompt_text

    rows = select(gsm8k_test(), n, 0)
    if task == "gsm8k-cot":
        return [gsm8k.lmeval_prompt(r["question"]) for r in rows], gsm8k.LMEVAL_STOP, rows
    shots = 8 if task == "gsm8k-8shot" else 0  # the study's 8-shot protocol (pkt eval --shots 8), or 0-shot
    return [prompt_text(gsm8k.user_turn(r["question"], shots, 0), tok, "chat", gsm8k.ASSISTANT_PREFIX)
            for r in rows], gsm8k.STOP, rows


def verdicts(task: str, rows: list[dict], texts: list[str]) -> list[bool]:
    """Each answer's verdict as the task's evaluation reaches it (pkt.evaluate.tasks)."""
    if task == "humaneval":
        from pkt.evaluate.harness import EvalConfig
        from pkt.evaluate.tasks import humaneval as he
        from pkt.evaluate.tasks.code import execute

        programs = [he.solution_program(r, he.qwen_solution(t, r["entry_point"])) for r, t in zip(rows, texts)]
        # the evaluation's own sandbox limits, and its refusal to run code without full isolation
        results, _ = execute(programs, EvalConfig(progress=False), "humaneval exec")
        return [r.passed for r in results]
    from pkt.evaluate.tasks import gsm8k

    gold = [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]
    if task == "gsm8k-cot":
        return [gsm8k.lmeval_exact_match(gsm8k.regex_extract(gsm8k.STRICT_RE, t, 0), g)
                for t, g in zip(texts, gold)]
    return [gsm8k.is_correct(gsm8k.extract_answer(t), g) for t, g in zip(texts, gold)]


def parting_token(tok, a: str, b: str) -> int:
    """Index of the first token at which two answers' tokenisations differ (where greedy paths part)."""
    x, y = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
    return next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


def hf_paged(model, tok, prompts, stop, max_new, batch_size) -> tuple[list[str], int]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from pkt.evaluate.generate import _eos_ids, truncate_at_stop

    eos = _eos_ids(model, tok)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    page = 32
    blocks = batch_size * (-(-(max(map(len, ids)) + max_new) // page) + 1) + 4  # default sizing fills the RAM
    cfg = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=max(batch_size, 256),
                                   max_requests_per_batch=batch_size, max_memory_percent=1.0,
                                   use_cuda_graph=False, allow_block_sharing=False)
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    out = model.generate_batch(inputs=ids, generation_config=gc, continuous_batching_config=cfg, progress_bar=False)
    gens = [out[k].generated_tokens for k in out]
    texts = [truncate_at_stop(tok.decode(g, skip_special_tokens=True), stop) for g in gens]
    useful = 0
    for g, t in zip(gens, texts):  # tokens up to the end token, or up to where the kept text ends
        n = next((j + 1 for j, x in enumerate(g) if x in eos), len(g))
        while n > 1 and len(tok.decode(g[:n - 1], skip_special_tokens=True)) >= len(t) and t:
            n -= 1
        useful += n
    return texts, useful


ENGINES = ("padded", "continuous", "continuous-whole-head", "continuous-concat", "continuous-unchunked",
           "continuous-copied", "hf-paged")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--task", choices=("humaneval", "gsm8k", "gsm8k-8shot", "gsm8k-cot"), default="humaneval")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--engines", default="padded,continuous,hf-paged")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from transformers.cache_utils import DynamicLayer

    from pkt.evaluate.generate import GenStats, generate
    from pkt.machine import kernel_class
    from pkt.models.load import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    prompts, stop, rows = task_prompts(args.task, tok, args.prompts)
    models: dict = {}

    def model_in(dtype: str):
        if dtype not in models:  # one copy per dtype, loaded (and warmed up) once
            models[dtype] = load_model(args.model, dtype=dtype).eval()
            generate(models[dtype], tok, prompts[:2], max_new_tokens=4, batch_size=2, progress=False)
        return models[dtype]

    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "kernels": kernel_class(), **{k: v for k, v in vars(args).items() if k not in ("engines", "out")},
           "engines": {}}
    ref = ref_ok = None
    for spec in args.engines.split(","):
        # ENGINE[@ROWS][:DTYPE]: rows decoded at once (default --batch-size), the weights' dtype (default
        # --dtype); "continuous-whole-head" is the continuous engine with the vocabulary projection in one
        # product, as before pkt.evaluate.logits sliced it
        head, _, dtype = spec.partition(":")
        engine, _, nrows = head.partition("@")
        if engine not in ENGINES:  # a misspelt variant must not run silently as the plain engine
            raise SystemExit(f"--engines: unknown engine {engine!r} in {spec!r}; known: {', '.join(ENGINES)}")
        batch = int(nrows) if nrows else args.batch_size
        model = model_in(dtype or args.dtype)
        t0 = time.perf_counter()
        if engine == "hf-paged":
            with torch.no_grad():
                texts, tokens = hf_paged(model, tok, prompts, stop, args.max_new_tokens, batch)
            breakdown = {}
        else:
            st = GenStats()
            whole = engine == "continuous-whole-head"
            # the cache grown by concatenation, as before the engine's buffers with room
            concat = engine in ("continuous-concat", "continuous-whole-head")
            sliced = patch("pkt.evaluate.logits.plain_head", return_value=False) if whole else nullcontext()
            # and its greedy step took argmax (pkt.evaluate.logits.greedy_tokens: the same indices, faster), and it
            # prefilled the prompts joining together in one padded batch (PREFILL_CHUNK 0)
            argmax = (patch("pkt.evaluate.generate.greedy_tokens", new=lambda logits: logits.argmax(-1)) if whole
                      else nullcontext())
            unchunked = (patch("pkt.evaluate.generate.PREFILL_CHUNK", 0.0)
                         if engine in ("continuous-whole-head", "continuous-unchunked") else nullcontext())
            grown = (patch("pkt.evaluate.kv_cache._growing_layer", return_value=DynamicLayer) if concat
                     else nullcontext())
            # a long shared prefix copied into every row's cache, as before pkt.evaluate.prefix_attention
            copied = (patch("pkt.evaluate.generate.SEPARATE_PREFIX", float("inf"))
                      if engine in ("continuous-whole-head", "continuous-copied") else nullcontext())
            with sliced, grown, argmax, unchunked, copied:
                texts = [o[0] for o in generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, stop=stop,
                                                batch_size=batch, progress=False, stats=st,
                                                engine="continuous" if engine.startswith("continuous") else engine)]
            tokens = st.new_tokens
            # where the time went: prefills (tokens, seconds) and decoding steps (mean rows decoded per step)
            # (only the continuous engine counts them; padded batches go through model.generate)
            breakdown = {"prefill_tokens": st.prefill_tokens, "prefill_seconds": round(st.prefill_seconds, 1),
                         "decode_steps": st.decode_steps,
                         "mean_rows": round(st.row_steps / st.decode_steps, 1)} if st.decode_steps else {}
        secs = time.perf_counter() - t0
        ok = verdicts(args.task, rows, texts)  # after the clock: scoring is not decoding
        ref, ref_ok = (texts, ok) if ref is None else (ref, ref_ok)
        differ = [i for i, (a, b) in enumerate(zip(ref, texts)) if a != b]
        res["engines"][spec] = {
            "seconds": round(secs, 1), "new_tokens": tokens, "tokens_per_s": round(tokens / secs, 2),
            "dtype": dtype or args.dtype, "rows": batch, **breakdown, "correct": sum(ok),
            "same_as_first": len(texts) - len(differ), "differ_from_first": differ,
            # where each differing answer's greedy path leaves the first engine's (token index)
            "parts_at_token": {i: parting_token(tok, ref[i], texts[i]) for i in differ},
            "same_verdict_as_first": sum(a == b for a, b in zip(ref_ok, ok)),
            "verdict_differs": {i: {"first": ref_ok[i], "this": ok[i]}
                                for i in range(len(ok)) if ok[i] != ref_ok[i]},
            "verdicts": ok, "texts": texts}
        print(json.dumps({spec: {k: v for k, v in res["engines"][spec].items() if k not in ("texts", "verdicts")}}),
              flush=True)
        if args.out:
            args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
