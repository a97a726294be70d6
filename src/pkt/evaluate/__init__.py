"""Evaluation harness: GSM8K, MMLU, HumanEval, MBPP and answer loss (see docs/evaluation.md)."""
