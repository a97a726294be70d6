"""MBPP: the test split of mbpp.jsonl (task ids 11-510, 500) or of the sanitized file (257).

Prompt as in the PKT mbpp splits (= open-instruct): user ``"Complete the following python function.\n\n\n" +
text + "\n" + code.split(":")[0]`` (the reference's imports and signature); assistant prefix ``"Here is the
completed function:\n\n\n```python\n"``; the model writes the whole function; stop at ``"\n```"``. Correct when
(sanitized ``test_imports``) + code + ``test_setup_code`` + the ``test_list`` asserts exit 0 in the sandbox.
Deviation from open-instruct (MBPP+ is not available offline): base MBPP tests.

Protocol ``qwen-coder`` (the model maker's instruct evaluation through EvalPlus, see ``humaneval``): the prompt
is EvalPlus's MBPP prompt, a triple-quoted string holding the task text and then the first test assert, one
per line, in the same ChatML string; the entry point is the function that
first test calls. The sanitized solution runs with the row's imports, setup code and every assert.
"""

from __future__ import annotations

from pkt.evaluate.generate import generate
from pkt.evaluate.tasks.code import ASSISTANT_PREFIX, INSTRUCTION, collect, execute, pass_metrics, strip_fences
from pkt.evaluate.tasks.common import hit_cap, parse_protocol, prompt_text, protocol_record, select
from pkt.evaluate.tasks.humaneval import EVALPLUS_STOP, qwen_prompt, qwen_solution

STOP = ["\n```", "<|user|>"]


def load_rows(variant: str = "full") -> list[dict]:
    from pkt.data.tasks import mbpp_rows

    return mbpp_rows(variant)


def user_turn(row: dict) -> str:
    text = row.get("text") or row.get("prompt", "")
    return INSTRUCTION + text + "\n" + row["code"].split(":")[0]


def evalplus_prompt(row: dict) -> str:
    """EvalPlus's MBPP prompt shape: the task text and the first test inside a docstring."""
    text = (row.get("text") or row.get("prompt", "")).strip()
    return '"""\n' + text + "\n" + row["test_list"][0].strip() + '\n"""\n'


def entry_point(row: dict) -> str:
    """The function the first test calls: the first name defined by the reference code that appears called in
    the test (task 466 defines a helper ``find_peak_util`` before ``find_peak``, the one the tests call)."""
    import re

    test = row["test_list"][0]
    names = re.findall(r"^def\s+(\w+)\s*\(", row.get("code", ""), re.M)
    called = [n for n in names if re.search(rf"\b{re.escape(n)}\s*\(", test)]
    if called:
        return min(called, key=lambda n: re.search(rf"\b{re.escape(n)}\s*\(", test).start())
    import builtins

    calls = [c for c in re.findall(r"(?<![\w.])(\w+)\s*\(", test) if not hasattr(builtins, c)]
    return calls[0] if calls else (names[0] if names else "")


def program(row: dict, code: str) -> str:
    setup = row.get("test_setup_code") or ""
    imports = "\n".join(row.get("test_imports") or [])
    return "\n".join(x for x in (imports, code, setup, "\n".join(row["test_list"])) if x) + "\n"


def extract_code(output: str) -> str:
    return strip_fences(output)


def run(model, tokenizer, cfg, rows=None, stats=None):
    rows = select(rows if rows is not None else load_rows(cfg.mbpp_variant), cfg.limit, cfg.seed)
    proto = parse_protocol(getattr(cfg, "protocol", "pkt"))["mbpp"]
    qwen = proto == "qwen-coder"
    max_new = cfg.max_new_tokens or (2048 if qwen else 512)
    if qwen:
        prompts = [qwen_prompt(evalplus_prompt(r)) for r in rows]
    else:
        prompts = [prompt_text(user_turn(r), tokenizer, cfg.style, ASSISTANT_PREFIX) for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new, stop=EVALPLUS_STOP if qwen else STOP,
                    batch_size=cfg.batch_size, engine=cfg.decoding, temperature=cfg.temperature, top_p=cfg.top_p,
                    num_samples=cfg.n_samples, seed=cfg.seed, progress=cfg.progress, desc="mbpp", stats=stats)
    if qwen:
        codes = [[qwen_solution(o, entry_point(r)) for o in os_] for r, os_ in zip(rows, outs)]
    else:
        codes = [[extract_code(o) for o in os_] for os_ in outs]
    results, iso = execute([program(r, c) for r, cs in zip(rows, codes) for c in cs], cfg, "mbpp exec")
    records, correct = collect(rows, prompts, outs, codes, results)
    for rec in records:
        rec["protocol"] = proto
    metrics = {"n": len(rows), "variant": cfg.mbpp_variant, "samples": cfg.n_samples,
               "temperature": cfg.temperature, "sandbox": iso,
               "protocol": protocol_record("mbpp", cfg, model, max_new_tokens=max_new),
               "hit_max_new_tokens": hit_cap(tokenizer, outs, max_new),
               **pass_metrics(correct, cfg.pass_ks if cfg.n_samples > 1 else (1,))}
    return records, metrics
