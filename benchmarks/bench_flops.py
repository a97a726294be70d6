"""P6 and P7 of docs/benchmarks.md: how close fine-tuning and decoding come to this machine's own limits.

    flock /tmp/pkt-heavy.lock nice -n 0 .venv/bin/python -m benchmarks.bench_flops --out p6p7.json

* **P6, fine-tuning against the GEMM peak.** The peak is a timed ``torch.matmul`` of large square matrices in
  fp32 and in bf16 (2·n³ FLOPs each) in the same process, so it sees the same threads and the same load.
  Fine-tuning is pkt's own loop (:func:`pkt.align.finetune.finetune`) on a plain LoRA of pkt's default
  targets (r=16, α=16, dropout 0.05), batches of ``--batch`` GSM8K train examples cut to exactly
  ``--max-length`` tokens (no padding, so every position computed is a token counted), in fp32 and under
  bf16 autocast (``FinetuneConfig.autocast``), from the same LoRA init on the same batches. Achieved FLOP/s
  = :func:`lora_train_flops_per_token` × tokens/s; it is divided by the peak of the dtype the matmuls run in.
  Why a FLOP count rather than the usual 6·N: the base is frozen, so backward computes input gradients
  through it (2·P) but no weight gradients (the other 2·P of 6·N); only the LoRA factors get both.
* **P7, greedy decoding against the memory-bandwidth bound.** Each decoding step reads every weight a token
  passes through once (:func:`decode_weight_bytes`), so tokens/s ≤ batch × copy bandwidth / weight bytes.
  The bandwidth is a timed ``copy_`` of a ≥ 1 GiB buffer (bytes read + written); decoding is
  :func:`pkt.evaluate.generate.generate` with every row forced to the same number of new tokens, timed at N
  and at 1 new token: the difference is N−1 decoding steps with the prefill cancelled out (reported from the
  medians of the repeats and from the fastest repeats: other jobs only ever add time).

``--quick`` runs everything on pkt's tiny random Qwen2 model with small sizes (the end-to-end test); its
numbers mean nothing. The JSON (``--out``) is rewritten after every section, so an interrupted run keeps
what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pkt.models.arch import LINEAR_KINDS, ConfigDims

MODEL = "qwen2.5-coder-0.5b-instruct"
KINDS = LINEAR_KINDS  # the decoder projections pkt's default LoRA adapts


# ---- counting ---------------------------------------------------------------------------------

def projections(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder projection kind, from pkt's one shape table (which is (out, in))."""
    return {k: (i, o) for k, (o, i) in ConfigDims.from_config(config).shapes().items()}


def matmul_params(config) -> int:
    """Weights every token is multiplied by: the decoder projections and the lm_head (biases, norms and the
    embedding lookup are not matmuls; a tied embedding is the lm_head, counted once)."""
    s = ConfigDims.from_config(config)
    return s.num_layers * sum(i * o for i, o in projections(config).values()) + s.vocab_size * s.hidden_size


def lora_params(config, r: int, kinds=KINDS) -> int:
    """LoRA factor parameters: r·(in + out) per adapted projection per layer."""
    proj = projections(config)
    return ConfigDims.from_config(config).num_layers * sum(r * (proj[k][0] + proj[k][1]) for k in kinds)


def lora_train_flops_per_token(config, r: int, seq: int, kinds=KINDS) -> dict:
    """FLOPs of one token of a LoRA fine-tuning step (forward + backward) at sequence length ``seq``.

    * forward through the frozen base: 2·P (P = :func:`matmul_params`, one multiply-add per weight);
    * backward through the frozen base: 2·P for the input gradients, and **no** weight gradients (a full
      fine-tune would add another 2·P here, giving the familiar 6·P);
    * LoRA factors: 6·P_lora (forward 2, input gradient 2, weight gradient 2 per factor parameter);
    * attention scores: Q·Kᵀ and softmax·V are 2·seq·(heads·head_dim) each per token per layer, the full
      seq×seq square as usually counted (causal masking could skip half), ×3 for forward + backward
      (both operands need gradients): 12·L·seq·heads·head_dim.

    ``autograd_skips``: what autograd does not compute and the formula counts, for reference: layer 0's
    q/k/v read the embedding output, which needs no gradient, so their input gradients (base and lora_A)
    are skipped. It is ~0.1% of the total for the 0.5B.
    """
    s = ConfigDims.from_config(config)
    proj = projections(config)
    p, p_lora = matmul_params(config), lora_params(config, r, kinds)
    out = {"forward": 2 * p, "backward_input": 2 * p, "lora": 6 * p_lora,
           "attention": 12 * s.num_layers * seq * s.q_dim}
    out["total"] = sum(out.values())
    out["autograd_skips"] = sum(2 * proj[k][0] * (proj[k][1] + (r if k in kinds else 0)) for k in ("q", "k", "v"))
    out.update(params=p, lora_params=p_lora, seq=seq)
    return out


def decode_weight_bytes(model) -> dict:
    """Bytes of weights one decoding step reads: every parameter once (``named_parameters`` lists a tied
    embedding once), except an untied input embedding, of which a step reads only the batch's rows."""
    allp = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = emb is model.get_output_embeddings().weight
    read = allp if tied else allp - emb.numel() * emb.element_size()
    return {"read": read, "all_params": allp, "tied": tied, "dtype": str(emb.dtype).removeprefix("torch.")}


# ---- the machine ------------------------------------------------------------------------------

def gemm(dtype: torch.dtype, n: int, repeats: int) -> dict:
    """GFLOP/s of an n×n×n ``torch.matmul`` (2·n³ FLOPs), median of ``repeats`` after one warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, first-touch of ``out``
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "seconds": [round(t, 4) for t in times],
            "gflops": 2 * n ** 3 / statistics.median(times) / 1e9}


def gemm_peaks(sizes: list[int], repeats: int) -> dict:
    """Per dtype, the best of the sizes' medians (a peak is the best the machine did in this run)."""
    runs = [gemm(dt, n, repeats) for dt in (torch.float32, torch.bfloat16) for n in sizes]
    peak = {dt: max(r["gflops"] for r in runs if r["dtype"] == dt) for dt in ("float32", "bfloat16")}
    return {"runs": runs, "peak_gflops": peak, "fastest": max(peak, key=peak.get)}


def copy_bandwidth(nbytes: int, repeats: int) -> dict:
    """GB/s of ``dst.copy_(src)`` counting bytes read + written (2·nbytes), median after one warm-up."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)  # written, so its pages exist before timing
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    moved = 2 * src.numel() * 4
    return {"bytes": src.numel() * 4, "seconds": [round(t, 4) for t in times],
            "gb_s": moved / statistics.median(times) / 1e9}


def machine(threads: int) -> dict:
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    isa = sorted({f for f in flags.split() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx512_fp16"))})
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "isa": isa, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# ---- the workloads ----------------------------------------------------------------------------

def training_examples(tok, n: int, max_length: int, quick: bool):
    """``n`` chat examples whose tokenisation reaches ``max_length`` (cut to exactly that: no padding)."""
    from pkt.data.chat import tokenize_example
    from pkt.data.jsonl import ChatExample

    if quick:
        return [ChatExample(f"What is {i} + {i + 1}? " * 4, f"{i} + {i + 1} = {2 * i + 1}. " * 6) for i in range(n)]
    from pkt.data.tasks import load_split

    rows = [r for r in load_split("gsm8k", "train")
            if len(tokenize_example(r, tok, "chat", 10 ** 6)["input_ids"]) >= max_length][:n]
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} GSM8K train examples reach {max_length} tokens; lower --max-length")
    return rows


def measure_training(model, tok, args) -> dict:
    """pkt's fine-tuning loop, fp32 then bf16 autocast, same LoRA init and batches; per-step times and losses."""
    from pkt.align.finetune import FinetuneConfig, finetune
    from pkt.align.lora_init import DEFAULT_KINDS, make_lora_model
    from pkt.data.chat import tokenize_example

    n = args.batch * args.steps
    examples = training_examples(tok, n, args.max_length, args.quick)
    lens = [len(tokenize_example(e, tok, "chat", args.max_length)["input_ids"]) for e in examples]
    assert set(lens) == {args.max_length}, f"examples not all {args.max_length} tokens: {sorted(set(lens))}"
    torch.manual_seed(0)
    peft = make_lora_model(model, "lora", DEFAULT_KINDS, r=args.rank, alpha=args.rank, dropout=0.05)
    init = {k: p.detach().clone() for k, p in peft.named_parameters() if p.requires_grad}
    flops = lora_train_flops_per_token(model.config, args.rank, args.max_length)
    out: dict = {"flops_per_token": flops, "batch": args.batch, "max_length": args.max_length, "rank": args.rank,
                 "steps": args.steps, "variants": {}}
    for variant in args.autocast:
        with torch.no_grad():
            for k, p in peft.named_parameters():
                if k in init:
                    p.copy_(init[k])
        cfg = FinetuneConfig(r=args.rank, alpha=args.rank, lr=3e-4, batch_size=args.batch,
                             micro_batch_size=args.batch, max_length=args.max_length, epochs=1, autocast=variant,
                             report_to="none")
        stamps: list[float] = []
        t0 = time.perf_counter()
        logs = finetune(peft, tok, examples, cfg, progress=False, log=lambda _rec: stamps.append(time.perf_counter()))
        # step 1 pays first-call costs (allocations, kernel selection); steps 2.. are timed end to end
        secs = [b - a for a, b in zip(stamps, stamps[1:])] or [stamps[0] - t0]
        tok_s = args.batch * args.max_length / statistics.median(secs)
        out["variants"][variant] = {"step_seconds": [round(stamps[0] - t0, 2)] + [round(s, 2) for s in secs],
                                    "tokens_per_s": tok_s, "achieved_gflops": flops["total"] * tok_s / 1e9,
                                    "loss": [r["loss"] for r in logs]}
        print(f"  train autocast={variant}: {tok_s:.1f} tok/s, steps {out['variants'][variant]['step_seconds']} s, "
              f"loss {out['variants'][variant]['loss']}", flush=True)
    if {"none", "bf16"} <= set(out["variants"]):
        a, b = out["variants"]["none"]["loss"], out["variants"]["bf16"]["loss"]
        out["loss_abs_diff"] = [round(abs(x - y), 5) for x, y in zip(a, b)]
        out["loss_max_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        out["autocast_speedup"] = out["variants"]["bf16"]["tokens_per_s"] / out["variants"]["none"]["tokens_per_s"]
    peft.unload()  # plain LoRA left the base weights untouched
    return out


def decode_prompts(tok, n: int, prompt_tokens: int, quick: bool) -> list[str]:
    """Short prompts (the first ``prompt_tokens`` tokens of GSM8K test questions): the KV cache they leave is
    small next to the weights, so a step's traffic is the weights'."""
    if quick:
        texts = [f"Question {i}: what is {i} plus {i}?" for i in range(n)]
    else:
        from pkt.data.tasks import gsm8k_test

        texts = [r["question"] for r in gsm8k_test()[:n]]
    return [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:prompt_tokens]) for t in texts]


def _num(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def measure_decoding(model, tok, batch: int, args) -> dict:
    """Decoding steps per second × batch: t(N new tokens) − t(1) is N−1 steps (the prefill cancels)."""
    from pkt.evaluate.generate import GenStats, generate

    prompts = decode_prompts(tok, batch, args.prompt_tokens, args.quick)

    def run(new: int) -> float:
        stats = GenStats()
        generate(model, tok, prompts, max_new_tokens=new, min_new_tokens=new, batch_size=batch, progress=False,
                 stats=stats)
        assert stats.new_tokens == batch * new, (stats.new_tokens, batch, new)
        return stats.seconds

    run(2)  # warm-up
    t1, tn = [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit both
        t1.append(run(1))
        tn.append(run(args.new_tokens))
    step = (statistics.median(tn) - statistics.median(t1)) / (args.new_tokens - 1)
    # Other jobs on the two cores only ever add time, and a decoding step is hundreds of small parallel ops,
    # each waiting for both threads: a share of a core taken by another process can stall it several-fold.
    # The fastest repeat is then the better estimate of what the machine does; both are kept.
    best = (min(tn) - min(t1)) / (args.new_tokens - 1)
    # A step time <= 0 means the noise exceeded the N-1 steps (tiny models, loaded machine): no rate then.
    return {"batch": batch, "new_tokens": args.new_tokens, "t1_seconds": [round(t, 3) for t in t1],
            "tn_seconds": [round(t, 3) for t in tn], "step_seconds": step,
            "tokens_per_s": batch / step if step > 0 else None,
            "best_step_seconds": best, "tokens_per_s_best": batch / best if best > 0 else None}


# ---- driver -----------------------------------------------------------------------------------

def load(args, dtype: str):
    if args.quick:
        from pkt import testing

        tok = testing.tiny_tokenizer()
        model = testing.tiny_model("qwen2", "student", len(tok)).to(getattr(torch, dtype))
        return model, tok
    from pkt.models.load import load_model, load_tokenizer

    return load_model(args.model, dtype=dtype), load_tokenizer(args.model)


def summarise(res: dict) -> list[str]:
    """The table the docs quote."""
    lines = []
    m = res.get("machine_start")
    if m:
        pk = m["gemm"]["peak_gflops"]
        lines.append(f"GEMM peak: fp32 {pk['float32']:.1f} GFLOP/s, bf16 {pk['bfloat16']:.1f} GFLOP/s "
                     f"(fastest: {m['gemm']['fastest']}); copy bandwidth {m['copy']['gb_s']:.1f} GB/s")
    t = res.get("train")
    if t:
        f = t["flops_per_token"]
        lines.append(f"P6 LoRA FLOPs/token at seq {f['seq']}: {f['total'] / 1e9:.3f} GFLOP "
                     f"(fwd {f['forward'] / 1e9:.3f} + bwd-input {f['backward_input'] / 1e9:.3f} + lora "
                     f"{f['lora'] / 1e9:.4f} + attention {f['attention'] / 1e9:.4f})")
        lines.append("| variant | tok/s | achieved GFLOP/s | matmul dtype | its GEMM peak | achieved/peak | "
                     "/ fastest peak |")
        for v, r in t["variants"].items():
            lines.append(f"| {v} | {r['tokens_per_s']:.1f} | {r['achieved_gflops']:.1f} | {r['matmul_dtype']} | "
                         f"{r['peak_gflops']:.1f} | {r['of_peak']:.1%} | {r['of_fastest_peak']:.1%} |")
        if "autocast_speedup" in t:
            lines.append(f"autocast/fp32 speed: {t['autocast_speedup']:.2f}×; loss max rel diff "
                         f"{t['loss_max_rel_diff']:.2e}")
    if res.get("decode"):
        lines.append("| dtype | batch | tok/s median | tok/s best | weight bytes/step | bound tok/s | "
                     "median/bound | best/bound | compute bound tok/s | median/roofline |")
        for r in res["decode"]:
            bound = r.get("bound_tokens_per_s")
            lines.append(f"| {r['dtype']} | {r['batch']} | {_num(r['tokens_per_s'])} | "
                         f"{_num(r['tokens_per_s_best'])} | "
                         f"{r['weight_bytes'] / 1e9:.3f} GB | "
                         + (f"{bound:.2f} | {_num(r['of_bound'], '.1%')} | {_num(r['of_bound_best'], '.1%')} | "
                            f"{r['compute_bound_tokens_per_s']:.2f} | {_num(r['of_roofline'], '.1%')} |"
                            if bound else "| | | | |"))
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm-sizes", default="2048,4096")
    ap.add_argument("--gemm-repeats", type=int, default=3)
    ap.add_argument("--copy-gib", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=4, help="fine-tuning examples per step")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="fine-tuning steps per variant (the first is warm-up)")
    ap.add_argument("--autocast", default="none,bf16", help="FinetuneConfig.autocast values to run")
    ap.add_argument("--decode-dtypes", default="bfloat16,float32")
    ap.add_argument("--decode-batches", default="1,8", help="8 = the study's eval_batch_size")
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="decoding repeats (median)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: train, decode")
    ap.add_argument("--quick", action="store_true", help="tiny random model, small sizes (for the test)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.gemm_sizes, args.gemm_repeats, args.copy_gib = "tiny-qwen2", "64", 1, 1 / 64
        args.batch, args.max_length, args.steps, args.rank = 2, 24, 2, 4
        args.decode_batches, args.new_tokens, args.prompt_tokens, args.repeats = "1,2", 3, 6, 1
    args.autocast = [a for a in args.autocast.split(",") if a]
    skip = set(args.skip.split(","))
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.gemm_sizes.split(",")]
    nbytes = int(args.copy_gib * 2 ** 30)

    res: dict = {"model": args.model, "machine": machine(args.threads), "load_start": os.getloadavg(),
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    t_all = time.perf_counter()

    def save():
        if args.out:
            args.out.write_text(json.dumps(res, indent=1) + "\n")

    res["machine_start"] = {"gemm": gemm_peaks(sizes, args.gemm_repeats), "copy": copy_bandwidth(nbytes, 5)}
    print("\n".join(summarise(res)), flush=True)
    save()

    if "train" not in skip:
        model, tok = load(args, "float32")
        tok.padding_side = "right"  # as pkt's fine-tuning loads it
        res["train"] = measure_training(model, tok, args)
        save()
        del model
        gc.collect()

    if "decode" not in skip:
        res["decode"] = []
        for dtype in args.decode_dtypes.split(","):
            model, tok = load(args, dtype)
            wb = decode_weight_bytes(model)
            for b in (int(x) for x in args.decode_batches.split(",")):
                r = {"dtype": dtype, **measure_decoding(model, tok, b, args), "weight_bytes": wb["read"],
                     "weight_bytes_all_params": wb["all_params"], "tied": wb["tied"]}
                res["decode"].append(r)
                print(f"  decode {dtype} batch {b}: {_num(r['tokens_per_s'])} tok/s (best repeat "
                      f"{_num(r['tokens_per_s_best'])}), t1 {r['t1_seconds']} s, "
                      f"t{args.new_tokens} {r['tn_seconds']} s",
                      flush=True)
                save()
            del model
            gc.collect()

    # the yardsticks again: how much the machine's state drifted while the workloads ran
    res["machine_end"] = {"gemm": gemm_peaks(sizes[:1], args.gemm_repeats), "copy": copy_bandwidth(nbytes, 5)}
    # ratios against the start's peak and bandwidth, or the end's where it was higher (the conservative side)
    peak = {dt: max(res["machine_start"]["gemm"]["peak_gflops"][dt], res["machine_end"]["gemm"]["peak_gflops"][dt])
            for dt in ("float32", "bfloat16")}
    bw = max(res["machine_start"]["copy"]["gb_s"], res["machine_end"]["copy"]["gb_s"])
    res["peak_gflops"], res["copy_gb_s"] = peak, bw
    if "train" in res:
        for v, r in res["train"]["variants"].items():
            r["matmul_dtype"] = "bfloat16" if v == "bf16" else "float32"
            r["peak_gflops"] = peak[r["matmul_dtype"]]
            r["of_peak"] = r["achieved_gflops"] / r["peak_gflops"]
            r["of_fastest_peak"] = r["achieved_gflops"] / max(peak.values())
    for r in res.get("decode", []):
        r["bound_tokens_per_s"] = r["batch"] * bw * 1e9 / r["weight_bytes"]
        r["of_bound"] = r["tokens_per_s"] and r["tokens_per_s"] / r["bound_tokens_per_s"]
        r["of_bound_best"] = r["tokens_per_s_best"] and r["tokens_per_s_best"] / r["bound_tokens_per_s"]
        # the other roof: each token costs 2 FLOPs per weight it passes through (attention over <= 33 positions is
        # < 0.1% of that), at the dtype's GEMM peak; a step is bound by whichever roof is lower
        flops_per_token = 2 * r["weight_bytes"] / {"float32": 4, "bfloat16": 2}[r["dtype"]]
        r["compute_bound_tokens_per_s"] = peak[r["dtype"]] * 1e9 / flops_per_token
        r["roofline_tokens_per_s"] = min(r["bound_tokens_per_s"], r["compute_bound_tokens_per_s"])
        r["of_roofline"] = r["tokens_per_s"] and r["tokens_per_s"] / r["roofline_tokens_per_s"]
    res["load_end"] = os.getloadavg()
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    save()
    print("\n".join(summarise(res)))
    print(f"load average {res['load_start']} → {res['load_end']}; {res['seconds']} s", flush=True)
    return res


if __name__ == "__main__":
    main()
