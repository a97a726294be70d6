"""One module per evaluation task. Each exposes ``run(model, tokenizer, cfg, rows=None) -> (records, metrics)``.

``records`` are the per-example dicts written to ``<out>/<task>/predictions.jsonl``; ``metrics`` is a flat dict.
``rows`` overrides the test-set loader (tests pass fixture rows).
"""

GENERATION_TASKS = ("gsm8k", "mmlu", "humaneval", "mbpp")
LOSS_TASKS = tuple(f"{t}_loss" for t in GENERATION_TASKS)
ALL_TASKS = GENERATION_TASKS + LOSS_TASKS


def get(name: str):
    """The module implementing a task name."""
    import importlib

    if name.endswith("_loss"):
        return importlib.import_module("pkt.evaluate.tasks.answer_loss")
    return importlib.import_module(f"pkt.evaluate.tasks.{name}")
