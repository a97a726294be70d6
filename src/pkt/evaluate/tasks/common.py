"""Helpers shared by the task modules: seeded subsets and prompt rendering."""

from __future__ import annotations

import random

from pkt.data.chat import render_prompt


def select(rows: list, limit: int | None, seed: int) -> list:
    """A fixed seeded subset of ``limit`` rows (in original order); all rows when limit is None or too big."""
    if limit is None or limit >= len(rows):
        return list(rows)
    if limit < 0:
        raise ValueError("limit must be >= 0")
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def prompt_text(user: str, tokenizer, style: str, assistant_prefix: str = "") -> str:
    """Rendered prompt (chat template or tulu) followed by the assistant prefix."""
    return render_prompt(user, tokenizer, style, assistant_prefix)


# ---- protocols -------------------------------------------------------------------------------------------
# A protocol fixes how a task is prompted, decoded and scored. ``pkt`` is the PKT papers' format (the study
# default); the others reproduce a public harness exactly, so scores can be compared with published ones.
PROTOCOLS: dict[str, dict[str, dict]] = {
    "gsm8k": {
        "pkt": {"source": "PKT gsm split format (open-instruct wording)", "shots": 0,
                "prompt_version": "pkt-gsm-v1", "extraction": "last number", "max_new_tokens": 256,
                "chat_template": True},
        "lm-eval-cot": {"source": "lm-evaluation-harness 0.4.13 task gsm8k_cot (gsm8k-cot.yaml, version 3.0)",
                        "shots": 8, "prompt_version": "gsm8k_cot-v3.0",
                        "extraction": "strict-match 'The answer is (\\-?[0-9\\.\\,]+).' (first match); "
                                      "flexible-extract '(-?[$0-9.,]{2,})|(-?[0-9]+)' (last match)",
                        "max_new_tokens": 256, "chat_template": False},
    },
    "mmlu": {
        "pkt": {"source": "PKT mmlu split format (open-instruct wording)", "shots": 0,
                "prompt_version": "pkt-mmlu-v1", "extraction": "argmax next-token logprob over ' X'/'X'",
                "max_new_tokens": 0, "chat_template": True},
        "lm-eval": {"source": "lm-evaluation-harness 0.4.13 task mmlu (default/_default_template_yaml, v1.0)",
                    "shots": 5, "prompt_version": "mmlu-default-v1.0",
                    "extraction": "argmax loglikelihood of ' A'..' D' after 'Answer:' (first_n dev shots)",
                    "max_new_tokens": 0, "chat_template": False},
    },
    "humaneval": {
        "pkt": {"source": "open-instruct codex_humaneval chat fallback", "shots": 0,
                "prompt_version": "pkt-humaneval-v1", "extraction": "body after the prompt, fences stripped",
                "max_new_tokens": 512, "chat_template": True},
        "qwen-coder": {"source": "QwenLM/Qwen2.5-Coder qwencoder-eval/instruct/eval_plus (ChatML, greedy) "
                                 "@dc5af295", "shots": 0, "prompt_version": "qwen2.5-coder-evalplus-chatml",
                       "extraction": "cut at ``` then EvalPlus sanitize(entry point)", "max_new_tokens": 2048,
                       "chat_template": False},
    },
    "mbpp": {
        "pkt": {"source": "PKT mbpp split format (open-instruct wording)", "shots": 0,
                "prompt_version": "pkt-mbpp-v1", "extraction": "fenced code", "max_new_tokens": 512,
                "chat_template": True},
        "qwen-coder": {"source": "QwenLM/Qwen2.5-Coder qwencoder-eval/instruct/eval_plus (ChatML, greedy) "
                                 "@dc5af295; prompt as EvalPlus MBPP: docstring with the text and the first test",
                       "shots": 0, "prompt_version": "qwen2.5-coder-evalplus-chatml",
                       "extraction": "cut at ``` then EvalPlus sanitize(entry point)", "max_new_tokens": 2048,
                       "chat_template": False},
    },
}
STANDARD = {"gsm8k": "lm-eval-cot", "mmlu": "lm-eval", "humaneval": "qwen-coder", "mbpp": "qwen-coder"}


def is_fewshot(task: str, protocol: str, shots: int | None) -> bool:
    """Whether ``task``'s prompts carry worked examples under ``protocol`` (a :func:`parse_protocol` spec) and
    ``shots`` (None: the protocol's default, 8 for GSM8K's lm-eval chain of thought, 0 otherwise)."""
    if shots is not None:
        return shots > 0
    return task == "gsm8k" and parse_protocol(protocol).get(task) == "lm-eval-cot"


def parse_protocol(spec: str) -> dict[str, str]:
    """``pkt`` | ``standard`` | comma list mixing a default with ``task=name`` overrides -> {task: name}.

    Raises ValueError naming the bad part (the caller turns it into a settings error)."""
    chosen = {t: "pkt" for t in PROTOCOLS}
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        task, _, name = part.rpartition("=")
        tasks = [task.strip()] if task else list(PROTOCOLS)
        for t in tasks:
            if t not in PROTOCOLS:
                raise ValueError(f"protocol {part!r}: unknown task {t!r}; known: {', '.join(PROTOCOLS)}")
            n = STANDARD[t] if name.strip() == "standard" else name.strip()
            if n not in PROTOCOLS[t]:
                raise ValueError(f"protocol {part!r}: {t} has no protocol {n!r}; known: "
                                 f"{', '.join([*PROTOCOLS[t], 'standard'])}")
            chosen[t] = n
    return chosen


def protocol_record(task: str, cfg, model, **actual) -> dict:
    """What metrics.json and each record store about the protocol a task ran under (``actual`` overrides the
    protocol's defaults with the values in effect, e.g. shots or max_new_tokens set by the user)."""
    name = parse_protocol(getattr(cfg, "protocol", "pkt"))[task]
    rec = {"name": name, **PROTOCOLS[task][name]}
    rec.update({k: v for k, v in actual.items() if v is not None})
    rec["decoding"] = getattr(cfg, "decoding", "padded")
    try:
        rec["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    except (StopIteration, AttributeError):
        rec["dtype"] = None
    return rec


def hit_cap(tokenizer, outs: list[list[str]], max_new: int) -> int:
    """How many outputs are as long as the new-token cap (the cap, not the model or a stop, ended them)."""
    return sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) >= max_new for os_ in outs for o in os_)
