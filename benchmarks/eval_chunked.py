"""Evaluate one model on one task in saved chunks, so a long evaluation on a CPU survives interruptions.

    .venv/bin/python -m benchmarks.eval_chunked RUN_DIR --model M --task mbpp --protocol qwen-coder \
        [--limit N --seed S] [--chunk 25] [--budget-min 60] [--mbpp-variant sanitized] \
        [--record docs/eval-records/M/mbpp.json]

Each chunk is the same library call ``pkt eval`` makes (``evaluate_model``) on a slice of the task's rows,
saved under ``RUN_DIR/chunks/NNN`` as it finishes; a rerun of the same command skips finished chunks and
stops starting new ones after ``--budget-min`` minutes. The subset is the one ``pkt eval --limit N --seed S``
picks (the same ``select`` on the same rows), and record ids are the ones ``pkt eval`` would write, so the
merged ``RUN_DIR/<task>/predictions.jsonl`` and ``RUN_DIR/metrics.json`` (``"complete": true`` once every chunk
is in) read like a ``pkt eval`` output directory. Greedy decoding only (one sample per problem), so the
headline score is the mean of the per-item verdicts.

``--record`` writes a small JSON (no prompts, no outputs): the model, task, protocol, dtype, score, per-item
verdicts and the time spent. Those records are what docs/evaluation.md's tables come from and are small
enough to commit.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

CHUNK_DIR = "chunks"


def task_rows(task: str, mbpp_variant: str = "full") -> tuple[list[dict], dict]:
    """(all test rows of ``task``, extra ``data`` entries evaluate_model needs beside them)."""
    from pkt.evaluate.tasks import gsm8k, humaneval, mbpp, mmlu

    if task == "gsm8k":
        return gsm8k.load_rows(), {}
    if task == "mmlu":
        test, dev = mmlu.load_rows()
        return test, {"mmlu_dev": dev}
    if task == "humaneval":
        return humaneval.load_rows(), {}
    if task == "mbpp":
        return mbpp.load_rows(mbpp_variant), {}
    raise SystemExit(f"--task: {task!r} is not one of gsm8k, mmlu, humaneval, mbpp")


def subset(rows: list[dict], limit: int | None, seed: int) -> list[tuple[int, dict]]:
    """(index in the full test set, row) of the subset ``pkt eval --limit --seed`` evaluates, in order."""
    from pkt.evaluate.tasks.common import select

    picked = select([dict(r, _global=i) for i, r in enumerate(rows)], limit, seed)
    return [(r.pop("_global"), r) for r in picked]


def _global_id(task: str, rec: dict, index: int, row: dict):
    if task == "gsm8k":
        return index
    if task == "mmlu":
        return f"{row['subject']}_{index}"
    return rec["id"]  # code tasks: the task id


def produce(run_dir: Path, model_name: str, task: str, protocol: str, dtype: str, chunk: int, budget_min: float,
            batch_size: int, max_new_tokens: int | None, limit: int | None = None, seed: int = 0,
            shots: int | None = None, decoding: str = "padded", mbpp_variant: str = "full") -> dict | None:
    """Evaluate the missing chunks (within the budget) and merge the finished ones. Returns the merged
    metrics of ``task`` (``complete`` says whether every chunk is in), or None when no chunk has finished."""
    from pkt.evaluate import evaluate_model
    from pkt.io import write_json, write_jsonl

    t0 = time.perf_counter()
    rows, extra = task_rows(task, mbpp_variant)
    picked = subset(rows, limit, seed)
    parts = [picked[i:i + chunk] for i in range(0, len(picked), chunk)]
    chunk_dir = run_dir / CHUNK_DIR
    todo = [k for k in range(len(parts)) if not (chunk_dir / f"{k:03d}" / "metrics.json").is_file()]
    if todo:
        from pkt.models.load import load_model, load_tokenizer

        tok, model = load_tokenizer(model_name), load_model(model_name, dtype=dtype)
        for n_done, k in enumerate(todo):
            if (time.perf_counter() - t0) / 60 > budget_min:
                print(f"budget spent: {len(todo) - n_done} of {len(parts)} chunks left; run again to continue")
                break
            evaluate_model(model, tok, [task], out_dir=chunk_dir / f"{k:03d}",
                           data={task: [r for _, r in parts[k]], **extra}, protocol=protocol,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, shots=shots, progress=False,
                           decoding=decoding, mbpp_variant=mbpp_variant,
                           meta={"model": model_name, "dtype": dtype}, log=None)
            print(f"chunk {k + 1}/{len(parts)} done ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    records, metrics = [], []
    for k, part in enumerate(parts):
        d = chunk_dir / f"{k:03d}"
        if not (d / "metrics.json").is_file():
            continue
        recs = [json.loads(x) for x in (d / task / "predictions.jsonl").read_text(encoding="utf-8").splitlines() if x]
        if len(recs) != len(part):
            raise SystemExit(f"{d}: {len(recs)} records for {len(part)} rows (was the chunk size changed? "
                             f"use the --chunk of the first run)")
        for rec, (index, row) in zip(recs, part):
            rec["id"] = _global_id(task, rec, index, row)
        records += recs
        metrics.append(json.loads((d / "metrics.json").read_text(encoding="utf-8")))
    if not records:
        return None
    n = len(records)
    first = metrics[0][task]
    merged = {"complete": len(metrics) == len(parts), "n": n, "of": len(picked),
              "accuracy": sum(bool(r["correct"]) for r in records) / n,
              "passed": sum(bool(r["correct"]) for r in records),
              "protocol": first.get("protocol"), "shots": first.get("shots"),
              "hit_max_new_tokens": sum(m[task].get("hit_max_new_tokens", 0) for m in metrics),
              "seconds": round(sum(m[task]["seconds"] for m in metrics), 1),
              "new_tokens": sum(m[task].get("generation", {}).get("new_tokens", 0) for m in metrics)}
    if task in ("humaneval", "mbpp"):
        merged["pass@1"] = merged["accuracy"]
        merged["sandbox"] = first.get("sandbox")
        merged["status"] = {s: sum(r.get("status") == s for r in records)
                            for s in sorted({r.get("status") for r in records})}
    if task == "gsm8k" and "correct_flexible" in records[0]:
        merged["flexible_accuracy"] = sum(bool(r["correct_flexible"]) for r in records) / n
    if task == "mmlu":
        from pkt.evaluate.tasks.mmlu import _summary

        merged["macro_accuracy"] = _summary(records, first.get("shots") or 0)["macro_accuracy"]
    write_jsonl(run_dir / task / "predictions.jsonl", records)
    # each chunk ran on its rows as given data (its config has no limit): the subset is recorded here
    write_json(run_dir / "metrics.json", {"model": model_name, "dtype": dtype, "config": metrics[0]["config"],
                                          "subset": {"limit": limit, "seed": seed,
                                                     **({"mbpp_variant": mbpp_variant} if task == "mbpp" else {})},
                                          "tasks": [task], task: merged})
    return merged


def record(run_dir: Path, task: str, out: Path) -> dict:
    """The small, committable summary of a merged run directory."""
    from pkt.io import write_json

    meta = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    m = meta[task]
    recs = [json.loads(x) for x in (run_dir / task / "predictions.jsonl").read_text(encoding="utf-8").splitlines() if x]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    import torch

    rec = {"model": meta["model"], "task": task, "dtype": meta["dtype"], "complete": m["complete"],
           "n": m["n"], "of": m["of"], "limit": meta["subset"]["limit"], "seed": meta["subset"]["seed"],
           **({"mbpp_variant": meta["subset"].get("mbpp_variant", "full")} if task == "mbpp" else {}),
           "score": m["accuracy"], **{k: m[k] for k in ("flexible_accuracy", "macro_accuracy", "status") if k in m},
           "hit_max_new_tokens": m["hit_max_new_tokens"], "seconds": m["seconds"], "new_tokens": m["new_tokens"],
           "protocol": m["protocol"], "batch_size": meta["config"].get("batch_size"),
           "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "commit": commit, "verdicts": {str(r["id"]): bool(r["correct"]) for r in recs}}
    write_json(out, rec)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", required=True, choices=["gsm8k", "mmlu", "humaneval", "mbpp"])
    ap.add_argument("--protocol", default="standard", help="pkt eval --protocol value (e.g. qwen-coder, lm-eval-cot)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit", type=int, default=None, help="seeded subset, as pkt eval --limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=25, help="rows per saved chunk (keep it across reruns)")
    ap.add_argument("--budget-min", type=float, default=60.0, help="stop starting chunks after this many minutes")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--decoding", choices=("padded", "continuous"), default="padded")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--mbpp-variant", choices=("full", "sanitized"), default="full",
                    help="MBPP test rows: full (500) or sanitized (257), as pkt eval --mbpp-variant")
    ap.add_argument("--record", type=Path, default=None, help="write the committable summary here when complete")
    args = ap.parse_args()
    protocol = args.protocol if "=" in args.protocol or args.protocol in ("pkt", "standard") \
        else f"{args.task}={args.protocol}"
    merged = produce(args.run_dir, args.model, args.task, protocol, args.dtype, args.chunk, args.budget_min,
                     args.batch_size, args.max_new_tokens, args.limit, args.seed, args.shots, args.decoding,
                     args.mbpp_variant)
    if merged is None:
        print("no chunk finished yet")
        return
    print(json.dumps({k: v for k, v in merged.items() if k not in ("protocol", "sandbox")}))
    if args.record and merged["complete"]:
        record(args.run_dir, args.task, args.record)
        print(f"record: {args.record}")


if __name__ == "__main__":
    main()
