"""Evaluation harness: GSM8K, MMLU, HumanEval, MBPP and answer loss, with a sandbox for generated code.

See docs/evaluation.md. Main entry point: :func:`evaluate_model` (in-memory model + tokenizer -> metrics).
"""

from pkt.evaluate.harness import EvalConfig, evaluate_model, parse_task_list, run_task

__all__ = ["EvalConfig", "evaluate_model", "parse_task_list", "run_task"]
