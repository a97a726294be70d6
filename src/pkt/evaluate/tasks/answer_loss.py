"""Answer loss: mean teacher-forced NLL of the gold responses of a held-out PKT split (default 'align').

Each example is rendered and tokenised exactly as for fine-tuning (``pkt.data.chat.tokenize_example``: prompt
in the chosen style, response = assistant text + end-of-turn token, labels only on the response). Reports the
token-weighted mean NLL (``nll``), its ``perplexity`` and the per-example mean (``nll_per_example``). Sensitive
where small models score near zero on the accuracy metrics. The 'train' split is for fine-tuning and 'extract'
for locating, so 'align' is the default held-out split (``loss_split``).
"""

from __future__ import annotations

import math

from pkt.data.chat import tokenize_example
from pkt.evaluate.generate import response_nll
from pkt.evaluate.tasks.common import select


def run(model, tokenizer, cfg, rows=None, stats=None, task: str = "gsm8k"):
    if rows is None:
        from pkt.data.tasks import load_split

        rows = load_split(task, cfg.loss_split)
    rows = select(list(rows), cfg.limit, cfg.seed)
    feats = [tokenize_example(ex, tokenizer, cfg.style, max_length=cfg.max_prompt_tokens) for ex in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    res = response_nll(model, feats, pad, batch_size=cfg.batch_size, progress=cfg.progress, desc=f"{task} loss")
    records = []
    for i, (ex, (s, n)) in enumerate(zip(rows, res)):
        records.append({"id": ex.meta.get("id", i), "prompt": ex.user, "gold": ex.assistant, "tokens": n,
                        "nll": s / n if n else None})
    tot_s, tot_n = sum(s for s, _ in res), sum(n for _, n in res)
    per_ex = [s / n for s, n in res if n]
    nll = tot_s / tot_n if tot_n else float("nan")
    return records, {"nll": nll, "perplexity": math.exp(nll) if tot_n else float("nan"),
                     "nll_per_example": sum(per_ex) / len(per_ex) if per_ex else float("nan"),
                     "tokens": tot_n, "n": len(rows), "split": cfg.loss_split}
