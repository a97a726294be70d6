"""P12: LoRA fine-tuning's peak memory and seconds per step, the reference loss path against the lean one.

Each variant is one short run of pkt's own loop (:func:`pkt.align.finetune.finetune`) on the real student in
its own child process, one after the other (each under the real-model lock ``flock /tmp/pkt-real.lock``), so
that a variant's memory cannot contaminate another's. A child reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``), its RSS after loading the model, the per-step losses, seconds per
step, and the padding of its micro-batches (tokens computed / tokens in the examples).

Variants (``VARIANTS``), all with the same LoRA init (seeded), examples, steps and settings:

* ``reference``  — the loss from the full-vocabulary logits of every position (``logits: full``), micro-batches
  in shuffled order: what pkt computed before;
* ``answer``     — the head at the labelled (answer) positions only, in chunks (``logits: answer``,
  :mod:`pkt.align.token_loss`);
* ``grouped``    — ``answer`` plus length-grouped micro-batches (``group_by_length``);
* ``checkpointed`` — ``grouped`` plus gradient checkpointing (activations recomputed in the backward pass).

The run: the first ``--n`` examples of the task's train split, ``--batch`` examples per optimizer step in
micro-batches of ``--micro``, cut at ``--max-length`` tokens, ``--steps`` optimizer steps, float32, LoRA
r=16, α=16 on pkt's default targets, dropout 0 (so that every variant computes the same function and the
losses can be compared step by step; dropout changes no memory beyond its masks). The machine's CPU flags
(AMX, AVX-512 bf16) and torch's thread count are printed with the table.

Run (real student: export PKT_HOME and PKT_DATA_DIR first)::

    python -m benchmarks.bench_finetune_memory --out p12.json

``--interleaved`` times the two loss paths alone instead: one micro-batch's forward + backward, reference and
answer alternated in one process (``--repeats`` times), so that both see the same load on a shared machine.

``--padding`` only tokenises: the tokens the micro-batches compute per example token over the first epoch of
``--n`` examples in steps of ``--batch``, shuffled vs length-grouped (e.g. the 256-example run: ``--n 256
--batch 64``).

``--model`` takes any pkt model reference (a tiny saved model runs the script end to end in seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LOCK = "/tmp/pkt-real.lock"
MODEL = "qwen2.5-coder-0.5b-instruct"
VARIANTS = {
    "reference": {"logits": "full"},
    "answer": {"logits": "answer"},
    "grouped": {"logits": "answer", "group_by_length": True},
    "checkpointed": {"logits": "answer", "group_by_length": True, "gradient_checkpointing": True},
}


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def cpu_flags() -> dict:
    """The CPU's matrix-unit flags (bf16 and AMX speed depend on them) and its model name."""
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    return {"cpu": name, "amx": sorted(f for f in flags if f.startswith("amx")),
            "avx512_bf16": "avx512_bf16" in flags, "cores": os.cpu_count()}


def child(args) -> dict:
    import torch

    from pkt.align.finetune import FinetuneConfig, finetune
    from pkt.align.lora_init import make_lora_model
    from pkt.data.chat import tokenize_example
    from pkt.data.tasks import load_split
    from pkt.models.load import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model, padding_side="right")
    torch.manual_seed(0)
    model = make_lora_model(load_model(args.model, dtype="float32"), "lora", r=16, alpha=16, dropout=0.0)
    rss_loaded = _rss_gib()
    examples = load_split(args.task, "train")[: args.n]
    cfg = FinetuneConfig(r=16, alpha=16, dropout=0.0, lr=3e-4, batch_size=args.batch, micro_batch_size=args.micro,
                         max_length=args.max_length, epochs=args.steps * args.batch / len(examples),
                         warmup_ratio=0.0, seed=1, report_to="none", **VARIANTS[args.variant])
    # the padding each micro-batch carries: the loop's own grouping, applied to the loop's own order
    import math
    import random

    from pkt.align.finetune import micro_batches

    lengths = [len(tokenize_example(e, tok, cfg.style, cfg.max_length)["input_ids"]) for e in examples]
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    computed = 0
    for s in range(math.ceil(len(order) / cfg.batch_size)):
        step = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        for mb in micro_batches(step, lengths, cfg.micro_batch_size, group_by_length=cfg.group_by_length):
            computed += len(mb) * max(lengths[i] for i in mb)
    t0 = time.perf_counter()
    logs = finetune(model, tok, examples, cfg, progress=False)
    wall = time.perf_counter() - t0
    steps = [r["seconds"] for r in logs]
    return {"variant": args.variant, "settings": VARIANTS[args.variant], "threads": torch.get_num_threads(),
            "rss_after_load_gib": round(rss_loaded, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "losses": [r["loss"] for r in logs],
            "seconds_per_step": [round(b - a, 1) for a, b in zip([0.0] + steps, steps)],
            "train_seconds": round(wall, 1), "tokens": sum(lengths), "tokens_computed": computed,
            "max_length_seen": max(lengths)}


def interleaved(args) -> dict:
    """Seconds of one micro-batch's forward + backward, the loss paths alternated in one process.

    Separate processes see different loads on a shared machine; alternating the two paths (A, B, A, B, ...)
    on the same micro-batch lets both see the same. Medians over ``--repeats``."""
    import statistics

    import torch

    from pkt.align.lora_init import make_lora_model
    from pkt.align.token_loss import answer_token_loss, full_logits_loss
    from pkt.data.chat import collate, tokenize_example
    from pkt.data.tasks import load_split
    from pkt.models.load import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model, padding_side="right")
    torch.manual_seed(0)
    model = make_lora_model(load_model(args.model, dtype="float32"), "lora", r=16, alpha=16, dropout=0.0)
    model.train()
    feats = [tokenize_example(e, tok, "chat", args.max_length) for e in load_split(args.task, "train")[: args.micro]]
    batch = collate(feats, tok.pad_token_id)
    times: dict = {"reference": [], "answer": []}
    for _ in range(args.repeats):
        for name, fn in (("reference", full_logits_loss), ("answer", answer_token_loss)):
            t0 = time.perf_counter()
            fn(model, batch).backward()
            times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": list(batch["input_ids"].shape), "labelled": int((batch["labels"][:, 1:] != -100).sum()),
            "seconds": times, "median": med, "speedup": med["reference"] / med["answer"]}


def padding(args) -> dict:
    """Tokens the micro-batches compute (padded) per token of the examples, over the first epoch of a run of
    ``--n`` examples in steps of ``--batch``: shuffled order vs length-grouped. Tokenizer only, no model."""
    import math
    import random

    from pkt.align.finetune import micro_batches
    from pkt.data.chat import tokenize_example
    from pkt.data.tasks import load_split
    from pkt.models.load import load_tokenizer

    tok = load_tokenizer(args.model, padding_side="right")
    lengths = [len(tokenize_example(e, tok, "chat", args.max_length)["input_ids"])
               for e in load_split(args.task, "train")[: args.n]]
    order = list(range(len(lengths)))
    random.Random(1).shuffle(order)
    out = {"examples": len(lengths), "tokens": sum(lengths), "longest": max(lengths)}
    for grouped in (False, True):
        computed = 0
        for s in range(math.ceil(len(order) / args.batch)):
            for mb in micro_batches(order[s * args.batch:(s + 1) * args.batch], lengths, args.micro,
                                    group_by_length=grouped):
                computed += len(mb) * max(lengths[i] for i in mb)
        out["grouped" if grouped else "shuffled"] = round(computed / sum(lengths), 3)
    return out


def run_child(variant: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_finetune_memory", "--child", "--variant", variant,
           "--model", args.model, "--task", args.task, "--n", str(args.n), "--batch", str(args.batch),
           "--micro", str(args.micro), "--max-length", str(args.max_length), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    if not args.no_lock:
        cmd = ["flock", LOCK] + cmd
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if p.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    ref = rows[0]
    lines = ["| variant | peak RSS GiB | s/step | tokens computed / in examples | losses per step | max rel. Δ loss "
             "vs first |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
        lines.append(f"| {r['variant']} | {r['peak_rss_gib']:.2f} | "
                     f"{sum(r['seconds_per_step']) / len(r['seconds_per_step']):.1f} | "
                     f"{r['tokens_computed'] / r['tokens']:.2f} | {', '.join(f'{x:.5f}' for x in r['losses'])} | "
                     f"{d:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="reference", choices=list(VARIANTS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, run in this order")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--n", type=int, default=8, help="training examples (the first N of the train split)")
    ap.add_argument("--batch", type=int, default=4, help="examples per optimizer step")
    ap.add_argument("--micro", type=int, default=4, help="examples per micro-batch")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--interleaved", action="store_true",
                    help="time one micro-batch's forward + backward, both loss paths alternated in one process")
    ap.add_argument("--padding", action="store_true",
                    help="only count the padded tokens of --n examples in steps of --batch, shuffled vs grouped")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of --interleaved")
    ap.add_argument("--no-lock", action="store_true", help="do not wrap children in flock (tiny models only)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.padding:
        print(json.dumps(padding(args)))
        return
    if args.interleaved:
        res = {"machine": cpu_flags(), **interleaved(args)}
        print(json.dumps(res, indent=1))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(res, f, indent=1)
        return
    names = args.variants.split(",")
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {', '.join(bad)}; expected some of {', '.join(VARIANTS)}")
    rows = []
    for v in names:
        rows.append(run_child(v, args))
        print(f"{v}: peak {rows[-1]['peak_rss_gib']:.2f} GiB, s/step {rows[-1]['seconds_per_step']}, "
              f"losses {rows[-1]['losses']}", file=sys.stderr, flush=True)
    result = {"machine": cpu_flags(), "settings": {k: getattr(args, k) for k in
                                                   ("model", "task", "n", "batch", "micro", "max_length", "steps",
                                                    "threads")}, "variants": rows}
    print(json.dumps(result["machine"]))
    print(table(rows))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
