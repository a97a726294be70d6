"""The answer loss (teacher-forced NLL of gold responses) with vocabulary logits for every position, as pkt
computed it before, against :func:`pkt.evaluate.generate.response_nll`, which asks the model for logits from the
first labelled position on (``logits_to_keep``). Side by side in one process, interleaved (docs/benchmarks.md P10).

    flock /tmp/pkt-heavy.lock .venv/bin/python -m benchmarks.bench_answer_loss --examples 32 --repeats 2

Per task (the last ``--examples`` rows of its PKT train split, the study's held-out examples, chat format):
tokens, labelled tokens, seconds of each side per repeat, the ratio of the fastest repeats, and the largest
difference of per-example mean NLL between the two.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


@torch.no_grad()
def full_logits_nll(model, features: list[dict], pad_id: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """The reference: logits at every position, then the NLL of the labelled ones."""
    from pkt.data.chat import collate

    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    res: list = [None] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([features[i] for i in idx], pad_id, padding_side="right")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
        keep = labels != -100
        for k, i in enumerate(idx):
            res[i] = (float((nll[k] * keep[k]).sum()), int(keep[k].sum()))
    return res


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tasks", default="gsm8k,humaneval")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    from pkt.data.chat import tokenize_example
    from pkt.data.tasks import load_split
    from pkt.evaluate.generate import response_nll
    from pkt.models.load import load_model, load_tokenizer

    tok, model = load_tokenizer(args.model), load_model(args.model, dtype=args.dtype).eval()
    out = []
    for task in args.tasks.split(","):
        rows = load_split(task, "train")[-args.examples:]
        feats = [tokenize_example(ex, tok, "chat", max_length=1024) for ex in rows]
        times = {"full": [], "pkt": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref = full_logits_nll(model, feats, tok.pad_token_id)
            times["full"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            new = response_nll(model, feats, tok.pad_token_id, progress=False)
            times["pkt"].append(time.perf_counter() - t0)
        row = {"task": task, "examples": len(feats), "tokens": sum(len(f["input_ids"]) for f in feats),
               "labelled": sum(n for _, n in ref), "full_s": [round(t, 2) for t in times["full"]],
               "pkt_s": [round(t, 2) for t in times["pkt"]],
               "speedup_best": round(min(times["full"]) / min(times["pkt"]), 2),
               "max_mean_nll_diff": max(abs(a - b) / n for (a, n), (b, _) in zip(ref, new) if n),
               "same_counts": [n for _, n in ref] == [n for _, n in new]}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    main()
