"""MBPP: the test split of mbpp.jsonl (task ids 11-510, 500) or of the sanitized file (257).

Prompt as in the PKT mbpp splits (= open-instruct): user ``"Complete the following python function.\n\n\n" +
text + "\n" + code.split(":")[0]`` (the reference's imports and signature); assistant prefix ``"Here is the
completed function:\n\n\n```python\n"``; the model writes the whole function; stop at ``"\n```"``. Correct when
(sanitized ``test_imports``) + code + ``test_setup_code`` + the ``test_list`` asserts exit 0 in the sandbox.
Deviation from open-instruct (MBPP+ is not available offline): base MBPP tests.
"""

from __future__ import annotations

from pkt.evaluate.generate import generate
from pkt.evaluate.tasks.code import ASSISTANT_PREFIX, INSTRUCTION, collect, execute, pass_metrics, strip_fences
from pkt.evaluate.tasks.common import prompt_text, select

STOP = ["\n```", "<|user|>"]


def load_rows(variant: str = "full") -> list[dict]:
    from pkt.data.tasks import mbpp_rows

    return mbpp_rows(variant)


def user_turn(row: dict) -> str:
    text = row.get("text") or row.get("prompt", "")
    return INSTRUCTION + text + "\n" + row["code"].split(":")[0]


def program(row: dict, code: str) -> str:
    setup = row.get("test_setup_code") or ""
    imports = "\n".join(row.get("test_imports") or [])
    return "\n".join(x for x in (imports, code, setup, "\n".join(row["test_list"])) if x) + "\n"


def extract_code(output: str) -> str:
    return strip_fences(output)


def run(model, tokenizer, cfg, rows=None, stats=None):
    rows = select(rows if rows is not None else load_rows(cfg.mbpp_variant), cfg.limit, cfg.seed)
    prompts = [prompt_text(user_turn(r), tokenizer, cfg.style, ASSISTANT_PREFIX) for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens or 512, stop=STOP,
                    batch_size=cfg.batch_size, temperature=cfg.temperature, top_p=cfg.top_p,
                    num_samples=cfg.n_samples, seed=cfg.seed, progress=cfg.progress, desc="mbpp", stats=stats)
    codes = [[extract_code(o) for o in os_] for os_ in outs]
    results, iso = execute([program(r, c) for r, cs in zip(rows, codes) for c in cs], cfg, "mbpp exec")
    records, correct = collect(rows, prompts, outs, codes, results)
    metrics = {"n": len(rows), "variant": cfg.mbpp_variant, "samples": cfg.n_samples,
               "temperature": cfg.temperature, "sandbox": iso,
               **pass_metrics(correct, cfg.pass_ks if cfg.n_samples > 1 else (1,))}
    return records, metrics
