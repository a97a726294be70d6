"""``semalign``: the student trained layer by layer towards the fine-tuned teacher's layer outputs, recomposed in
the student's space through the shared vocabulary (:mod:`pkt.transfer.semalign`, docs/methods.md §9.3; S3).

The teacher is ``teacher-lora``'s (same task and seed): the base teacher with its adapter merged, so the targets
carry what the split taught it, and the method is compared with ``function-transfer`` on the same source.
Training inputs: the first ``n_train`` examples of the task's train split (the fine-tuned arms' own examples);
held-out inputs, on which the record measures the alignment loss, the first ``budget.extract_samples`` of the
extract split; both tokenised once for both models (one tokenizer, checked), up to ``budget.max_length`` tokens.
The model is saved in float32 so that the trained change keeps its resolution until the evaluation casts it; the
record has ‖ΔW‖/‖W‖ per projection, per kind and in total, the share of the changed entries that survive the
evaluation dtype, and per trained layer the loss before and after. The null (``semalign-shuffled``) is this class
with the vocabulary correspondence deranged.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from pkt.methods.base import Method, save_with_deltas
from pkt.methods.registry import register
from pkt.stage import Cost, build as build_stage

TRAIN_SPLIT, HELDOUT_SPLIT = "train", "extract"


class SemAlign(Method):
    name = "semalign"
    reads = ("teacher-lora",)
    resource = "laten"  # teacher and student in memory together, as LaTen's build has them
    vocab = "aligned"  # "shuffled": the null, student rows matched to the wrong teacher rows

    def align_cfg(self, seed: int):
        from pkt.transfer.semalign import SemAlignConfig

        return SemAlignConfig(seed=seed, vocab_shuffle=self.vocab == "shuffled")

    def build(self, study, task, seed, inputs):
        c = study.cfg
        b = c.budget_for(task)
        tuned, _ = study.build("teacher-lora", task, seed, inputs)
        adapter = Path(tuned).parent / "adapter"  # survives the pruning of teacher-lora's merged weights
        io = {"train": [TRAIN_SPLIT, study.n_train[task]], "heldout": [HELDOUT_SPLIT, b.extract_samples],
                "max_length": b.max_length, "style": c.style}
        cfg = self.align_cfg(seed)
        payload = {"method": self.name, "task": task, "teacher": c.teacher, "student": c.student,
                   "adapter": str(adapter), "semalign": cfg.model_dump(), "inputs": io, "eval_dtype": c.eval_dtype}
        path, _ = study.run_stage(build_stage(self.name, task, seed), payload,
                                  lambda d: self.run(study, task, adapter, cfg, io, d),
                                  reads={"models": [c.teacher, c.student, tuned],
                                         "data": {task: [TRAIN_SPLIT, HELDOUT_SPLIT]}})
        return str(path / "model"), c.eval_dtype

    def run(self, study, task: str, adapter: Path, cfg, io: dict, d: Path) -> dict:
        """The build stage's work: load both models in float32, train the student, save, record."""
        import torch

        from pkt.transfer.semalign import semalign, tuned_teacher
        from pkt.data.chat import tokenize_example
        from pkt.data.tasks import load_split
        from pkt.models.load import assert_same_tokenizer, load_model, load_tokenizer
        from pkt.postpkt import peak_rss_bytes

        c = study.cfg
        t0 = time.perf_counter()
        tok = load_tokenizer(c.student)
        assert_same_tokenizer(load_tokenizer(c.teacher), tok)

        def sequences(split: str, n: int) -> list:
            return [torch.tensor(tokenize_example(e, tok, io["style"], io["max_length"])["input_ids"])
                    for e in load_split(task, split)[:n]]

        train, heldout = sequences(*io["train"]), sequences(*io["heldout"])
        teacher = tuned_teacher(load_model(c.teacher, dtype="float32"), adapter)
        student = load_model(c.student, dtype="float32")
        t_load = time.perf_counter() - t0
        deltas, info = semalign(teacher, student, train, heldout, cfg, n_vocab=len(tok), log=study.echo)
        del teacher
        gc.collect()
        norms, survival = save_with_deltas(student, tok, deltas, d / "model", study)
        info["seconds"]["load"] = round(t_load, 1)
        return {"vocab": self.vocab, "adapter": str(adapter), "inputs": io, **info, **norms,
                "surviving": survival, "peak_rss_bytes": peak_rss_bytes()}

    def estimate(self, plan, task: str) -> Cost:
        """Both models' load, one forward of each on the training and held-out tokens, the vocabulary statistics
        and, per trained layer, its steps (forward and backward of one layer, ~3 forwards) plus a loss pass and
        the propagation, at the student's forward rate scaled to one layer's share of its weights."""
        from pkt.data.tasks import load_split
        from pkt.models.arch import LINEAR_KINDS

        c = plan.cfg
        b = c.budget_for(task)
        cfg = self.align_cfg(0)
        n_train = plan.n_train(task)
        n_held = min(b.extract_samples, len(load_split(task, HELDOUT_SPLIT)))
        per_seq = min(plan.toks.mean(task, TRAIN_SPLIT), b.max_length)
        tokens = (n_train + n_held) * per_seq
        s_spec, t_spec = plan.student.spec, plan.teacher.spec
        forwards = plan.secs("forward", plan.tp, "float32", tokens) + plan.secs("forward", plan.sp, "float32", tokens)
        train_s, n_layers = 0.0, 1
        if s_spec is not None and t_spec is not None and plan.sp:
            n_layers = len(cfg.layers) if cfg.layers is not None else s_spec.num_layers
            share = sum(s_spec.weight_shape(k)[0] * s_spec.weight_shape(k)[1] for k in LINEAR_KINDS) / plan.sp
            step_tokens = cfg.steps * min(cfg.batch_size, n_train) * per_seq
            layer_fwd = plan.secs("forward", plan.sp, "float32", 3 * step_tokens + 3 * tokens) * share
            vocab = s_spec.vocab_size * s_spec.hidden_size * (s_spec.hidden_size + t_spec.hidden_size)
            vocab_s = plan.secs("forward", plan.sp, "float32", vocab / plan.sp / 2)
            train_s = n_layers * layer_fwd + vocab_s
        seconds = forwards + train_s + plan.load(plan.tp, "float32") + plan.load(plan.sp, "float32")
        # on disk: the aligned student in float32 (what it holds in memory besides both models, the targets of every
        # trained layer, is not disk)
        return Cost(seconds, plan.model_bytes(plan.sp, "float32"),
                    f"align {n_layers} student layers to the recomposed teacher on {n_train} examples "
                    f"({cfg.steps} steps each)", checkpoint=True)


register(SemAlign())
