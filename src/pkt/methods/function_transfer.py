"""``function-transfer``: the teacher's task vector (``teacher-lora``'s adapter, same task and seed) moved into the
student through what the layers compute, in closed form (:mod:`pkt.transfer.function_transfer`, docs/methods.md
§9.2), merged into the student's weights; no training.

Calibration: the first ``budget.transfer_examples`` examples of the task's extract split (by default
``budget.extract_samples``, Seeking's calibration examples), tokenised once for both models (they share a
tokenizer, checked), up to ``budget.max_length`` tokens. The transfer's settings are the budget's ``transfer_*``
fields (ridge, map, map ridge, monotone pairing, rank); the rest keep :class:`TransferConfig`'s defaults.
The model is saved in float32 so that the delta keeps its resolution until the evaluation casts it; the record
has ‖ΔW‖/‖W‖ per projection, per kind and in total, and the share of the changed entries that survive the
evaluation dtype. The nulls (``function-transfer-random``, ``function-transfer-shuffled``) are this class with
another task vector or layer pairing.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from pkt.methods.base import Method, save_with_deltas
from pkt.methods.registry import register
from pkt.stage import Cost, build as build_stage

CALIBRATION_SPLIT = "extract"


class FunctionTransfer(Method):
    name = "function-transfer"
    reads = ("teacher-lora",)
    resource = "laten"  # teacher and student in memory together, as LaTen's build has them
    task_vector = "teacher"  # "random": the null with the teacher delta's singular values, random directions
    pairing = "cka"  # "shuffled": the null with the CKA pairing deranged

    def transfer_cfg(self, budget, seed: int):
        """The transfer's settings: the budget's ``transfer_*`` fields, this method's pairing, the study's seed."""
        from pkt.transfer.function_transfer import TransferConfig

        return TransferConfig(pairing=self.pairing, seed=seed, ridge=budget.transfer_ridge,
                              output_map=budget.transfer_map, map_ridge=budget.transfer_map_ridge,
                              monotone=budget.transfer_monotone, rank=budget.transfer_rank)

    @staticmethod
    def calibration_examples(budget) -> int:
        return budget.extract_samples if budget.transfer_examples is None else budget.transfer_examples

    def build(self, study, task, seed, inputs):
        c = study.cfg
        b = c.budget_for(task)
        tuned, _ = study.build("teacher-lora", task, seed, inputs)
        adapter = Path(tuned).parent / "adapter"  # survives the pruning of teacher-lora's merged weights
        calib = {"split": CALIBRATION_SPLIT, "examples": self.calibration_examples(b), "max_length": b.max_length,
                 "style": c.style}
        cfg = self.transfer_cfg(b, seed)
        payload = {"method": self.name, "task": task, "teacher": c.teacher, "student": c.student,
                   "adapter": str(adapter), "task_vector": self.task_vector, "transfer": cfg.model_dump(),
                   "calibration": calib, "eval_dtype": c.eval_dtype}
        path, _ = study.run_stage(build_stage(self.name, task, seed), payload,
                                  lambda d: self.run(study, task, seed, adapter, cfg, calib, d),
                                  reads={"models": [c.teacher, c.student, tuned],
                                         "data": {task: [CALIBRATION_SPLIT]}})
        return str(path / "model"), c.eval_dtype

    def run(self, study, task: str, seed: int, adapter: Path, cfg, calib: dict, d: Path) -> dict:
        """The build stage's work: load both models in float32, transfer, merge, save, record."""
        import torch

        from pkt.transfer import function_transfer as ft
        from pkt.data.chat import tokenize_example
        from pkt.data.tasks import load_split
        from pkt.models.load import assert_same_tokenizer, load_model, load_tokenizer
        from pkt.postpkt import peak_rss_bytes

        c = study.cfg
        t0 = time.perf_counter()
        tok = load_tokenizer(c.student)
        assert_same_tokenizer(load_tokenizer(c.teacher), tok)
        examples = load_split(task, calib["split"])[: calib["examples"]]
        sequences = [torch.tensor(tokenize_example(e, tok, calib["style"], calib["max_length"])["input_ids"])
                     for e in examples]
        teacher, tv = self.task_vector_of(load_model(c.teacher, dtype="float32"), adapter, seed)
        student = load_model(c.student, dtype="float32")
        t_load = time.perf_counter() - t0
        teacher_norms = ft.rel_norms(teacher, tv)
        deltas, info = ft.transfer(teacher, student, tv, sequences, cfg, log=study.echo)
        del teacher, tv
        gc.collect()
        norms, survival = save_with_deltas(student, tok, deltas, d / "model", study)
        info["seconds"]["load"] = round(t_load, 1)
        return {"task_vector": self.task_vector, "adapter": str(adapter), "calibration": calib, **info, **norms,
                "teacher_rel_norm": teacher_norms["rel_norm"],
                "teacher_rel_norm_per_kind": teacher_norms["rel_norm_per_kind"],
                "surviving": survival, "peak_rss_bytes": peak_rss_bytes()}

    def task_vector_of(self, teacher, adapter: Path, seed: int):
        """(the teacher without its adapter, the delta to transfer: the adapter's, or the random null's)."""
        from pkt.transfer.function_transfer import random_task_vector, task_vector_from_adapter

        tv, teacher = task_vector_from_adapter(teacher, adapter)
        return teacher, (random_task_vector(tv, seed) if self.task_vector == "random" else tv)

    def estimate(self, plan, task: str) -> Cost:
        """Both models' load, one forward of each on the calibration tokens per pass (plus the pairing's), and
        the statistics' products (when they are kept rather than the tokens' activations) and the solves counted
        at the student's forward rate (2 flops per parameter and token)."""
        from pkt.transfer.function_transfer import (layer_passes, layer_solve_flops, layer_stat_bytes,
                                                 layer_token_bytes, solve_in_tokens)
        from pkt.data.tasks import load_split
        from pkt.models.arch import LINEAR_KINDS

        c = plan.cfg
        b = c.budget_for(task)
        n = min(self.calibration_examples(b), len(load_split(task, CALIBRATION_SPLIT)))
        tokens = n * min(plan.toks.mean(task, CALIBRATION_SPLIT), b.max_length)
        s_spec, t_spec = plan.student.spec, plan.teacher.spec
        cfg = self.transfer_cfg(b, 0)
        ridge_map = cfg.output_map == "ridge"
        passes, stat_elems, solve_flops = 1, 0, 0
        if s_spec is not None and t_spec is not None:
            n_tok = max(1, round(tokens))
            if solve_in_tokens(s_spec, t_spec, LINEAR_KINDS, ridge_map, n_tok):
                per_layer = layer_token_bytes(s_spec, t_spec, LINEAR_KINDS, n_tok)
                solve_flops = layer_solve_flops(s_spec, t_spec, LINEAR_KINDS, n_tok) * s_spec.num_layers
            else:
                per_layer = layer_stat_bytes(s_spec, t_spec, LINEAR_KINDS, ridge_map)
                stat_elems = per_layer // 8 * s_spec.num_layers
                solve_flops = layer_solve_flops(s_spec, t_spec, LINEAR_KINDS) * s_spec.num_layers
            passes = len(layer_passes(list(range(s_spec.num_layers)), per_layer, cfg.max_stat_gib * 2**30))
        forwards = (1 + passes) * (plan.secs("forward", plan.tp, "float32", tokens) +
                                   plan.secs("forward", plan.sp, "float32", tokens))
        flops_per_s = 2 * plan.sp / plan.secs("forward", plan.sp, "float32", 1.0) if plan.sp else 0
        stats = (2 * stat_elems * tokens + solve_flops) / flops_per_s if flops_per_s else 0.0
        seconds = forwards + stats + plan.load(plan.tp, "float32") + plan.load(plan.sp, "float32")
        return Cost(seconds, plan.model_bytes(plan.sp, "float32"),
                    f"transfer the teacher's task vector on {n} calibration examples ({passes} passes)",
                    checkpoint=True)


register(FunctionTransfer())
