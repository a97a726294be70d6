"""PrePKT / LaTen orchestration: locate → pair → translate (hypernetwork) → inject, train and apply.

Flow of one training step t (docs/methods.md §2.2, "as implemented"):

1. **Locate** with extract example e_t: attribution (pkt.locate.attribution) on the teacher and on the
   student; target = the last meaningful answer token.
2. **Pair**: teacher layers = the top-L_student by layer score, sorted by index, the i-th feeding student
   layer i (separately for attention and FFN; pkt.locate.layers.select_layers). In each pair of layers the
   top-n neurons of both models are rank-matched (teacher's j-th best → student's j-th best) with
   n = int(rate × the student's FFN width) for FFN and int(rate × the student's attention width
   num_heads·head_dim) for attention; the teacher ranks neurons per layer whatever its head_dim.
3. **Extract** the teacher's raw vectors: up/gate rows, down columns (FFN neurons); o columns and v rows
   (attention neurons); all of length d_T. **GQA:** attention neuron (head h, dim j) reads value row
   ``(h // gqa_group) * head_dim + j`` of v_proj, so under grouped-query attention several neurons share
   one v row. Teacher side: the neuron's own row (duplicates allowed). Student side: each v row is
   injected once, paired with the best-ranked located neuron that reads it (later duplicates dropped).
4. **Translate** with the per-module hypernetwork (pkt.align.hypernet), **inject** differentiably
   (pkt.inject.Injector) and train: batch of P = P−1 align samples (``random.Random(seed + t)``) + e_t;
   loss = mean per-sample LM loss (response tokens) + λ·Σ_m mean(H_m(K_m)²); AdamW + OneCycle; a
   checkpoint after every step (``checkpoints/step-KKKK/hypernet.pt``, K = optimiser steps taken, step 0 =
   the initialisation; the reference's ``checkpoint_t`` is our step t+1); loss per step in ``log.jsonl``.
   The OneCycle schedule spans the steps actually trained (``schedule: trained``, the default) or, as the
   reference ran it, the whole extract split (``schedule: extract``). The latter is a no-op at small
   budgets: a run stopped after one step of a 20-step cycle trained at lr/25 only.
   The hypernetwork runs once per step: micro-batches back-propagate into detached copies of its outputs
   and the accumulated gradient is pushed through it once (the reference recomputed it per sample).

**Apply**: load a step, re-locate with one seed example (``random.Random(seed)`` choice from the train
split, like the reference's inference script), translate, fuse into the student's weights and save an HF
checkpoint that really contains the injection (plus the deltas and a manifest). The manifest records how
large the injection is: ‖Δ‖/‖W‖ over the located rows/columns, and the share of located weights that Δ
changes once rounded to bf16 (a delta below bf16's resolution leaves a bf16-evaluated student as it was).

**Which step and rate**: the paper's per-task checkpoint (:data:`PAPER_STEPS`), or :func:`select_point`,
which scores every (step, rate) of a grid by the LM loss on align examples, like the reference's
inference script sweeps steps × rates.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from pkt.align.guard import check_finite
from pkt.align.hypernet import DEFAULT_KINDS, HyperNet, one_cycle, optimizer, penalty
from pkt.config import Settings
from pkt.data.chat import IGNORE, collate, tokenize_example
from pkt.data.jsonl import ChatExample, read_chat_jsonl
from pkt.errors import PktError
from pkt.inject import Deltas, Injector, delta_stats, save_fused
from pkt.io import write_json, write_jsonl
from pkt.tracking import TrainingLog, check_report_to
from pkt.locate.attribution import attribute_example
from pkt.locate.pairing import Pairing, counts, extract, pair, to_deltas
from pkt.models.arch import ArchSpec

# Alignment steps (optimiser steps) per task of the paper's runs (docs/methods.md §2.4: S3 Table 4, whose
# "Align Size" is steps × 16 samples).
PAPER_STEPS = {"mmlu": 2, "gsm8k": 4, "humaneval": 3, "mbpp": 8}
# The reference inference script's transfer rates (docs/methods.md §2.2 step 5).
REFERENCE_RATES = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


class LatenConfig(Settings):
    """Training settings (defaults = the reference's, docs/methods.md §2.4; see configs/laten.yaml)."""

    teacher: str = "qwen2.5-coder-1.5b-instruct"
    student: str = "qwen2.5-coder-0.5b-instruct"
    task: str = "gsm8k"
    extract_file: str | None = None  # chat JSONL overriding the task's extract split
    align_file: str | None = None  # ... align split
    seed_file: str | None = None  # ... train split (apply's seed example)
    style: Literal["chat", "tulu"] = "chat"
    modules: list[Literal["gate", "up", "down", "v", "o"]] = Field(default_factory=lambda: list(DEFAULT_KINDS))
    transfer_rate: float = Field(0.1, gt=0, le=1)
    layer_strategy: Literal["score", "random", "first", "last"] = "score"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    pct_start: float = Field(0.1, gt=0, lt=1)
    batch_size: int = Field(16, ge=1)  # P: P-1 align samples + the extract example
    micro_batch: int = Field(4, ge=1)
    penalty: float = Field(1000.0, ge=0)  # λ
    init: Literal["normal", "kaiming", "zeros"] = "normal"
    init_std: float = Field(1e-5, gt=0)
    seed: int = 42
    cutoff_len: int = Field(768, ge=8)
    max_steps: int | None = Field(None, ge=1)  # default: one step per extract example
    # "trained": the OneCycle schedule spans the steps trained (min(max_steps, #extract)); "extract": it
    # spans the whole extract split whatever max_steps is (the reference's; stopping early then means low lr)
    schedule: Literal["trained", "extract"] = "trained"
    # "real": the teacher's located vectors; "random": the random-teacher null (pkt.locate.pairing.null_vectors,
    # seeded by ``seed``): the same sites and norms, random directions. What LaTen's training does without the
    # teacher's content, in training and at the apply alike
    teacher_vectors: Literal["real", "random"] = "real"
    norm: Literal["yu", "laten"] = "yu"
    vocab_top: int | None = Field(1024, ge=0)  # None or 0 = exact attribution (slow: see attribution.py)
    chunk: int = Field(256, ge=1)
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    student_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # where the per-step log goes besides log.jsonl (pkt.tracking); it changes no result, so it is not dumped
    # (a run resumes whatever tracker it logs to)
    report_to: str = Field("tensorboard", exclude=True)

    def model_post_init(self, _ctx) -> None:
        check_report_to(self.report_to)


class ApplyConfig(Settings):
    step: int = Field(..., ge=0)
    transfer_rate: float = Field(0.1, gt=0, le=1)
    out: str
    seed: int = 42


# ---- data -----------------------------------------------------------------------------------------

def split_examples(cfg: LatenConfig, split: str) -> list[ChatExample]:
    """The task's extract / align / train split, or the chat JSONL file that replaces it in ``cfg``."""
    override = {"extract": cfg.extract_file, "align": cfg.align_file, "train": cfg.seed_file}[split]
    if override:
        return read_chat_jsonl(override)
    from pkt.data.tasks import load_split

    return load_split(cfg.task, split)


# ---- models ---------------------------------------------------------------------------------------

@dataclass
class Models:
    teacher: object
    student: object
    tokenizer: object
    t_spec: ArchSpec
    s_spec: ArchSpec


def load_models(cfg: LatenConfig, log=print) -> Models:
    from pkt.models.load import assert_same_tokenizer, load_model, load_tokenizer

    log(f"loading teacher {cfg.teacher} ({cfg.teacher_dtype}) and student {cfg.student} ({cfg.student_dtype})")
    tok = load_tokenizer(cfg.student, padding_side="right")
    assert_same_tokenizer(load_tokenizer(cfg.teacher), tok)
    return wrap_models(load_model(cfg.teacher, dtype=cfg.teacher_dtype), load_model(cfg.student, dtype=cfg.student_dtype),
                       tok)


def wrap_models(teacher, student, tokenizer) -> Models:
    t_spec, s_spec = ArchSpec.from_model(teacher), ArchSpec.from_model(student)
    if t_spec.vocab_size != s_spec.vocab_size:
        raise PktError(f"teacher and student vocabularies differ ({t_spec.vocab_size} vs {s_spec.vocab_size})")
    if t_spec.num_layers < s_spec.num_layers:
        raise PktError(f"teacher has {t_spec.num_layers} layers, fewer than the student's {s_spec.num_layers}")
    student.requires_grad_(False)  # only the hypernetwork trains (the reference let fp16 grads pile up)
    teacher.requires_grad_(False)
    return Models(teacher, student, tokenizer, t_spec, s_spec)


def locate(m: Models, example: ChatExample, cfg: LatenConfig, rate: float, progress: bool = False) -> Pairing:
    kw = dict(style=cfg.style, max_length=cfg.cutoff_len, norm=cfg.norm, vocab_top=cfg.vocab_top or None,
              chunk=cfg.chunk, top=tuple(reversed(counts(m.s_spec, m.t_spec, rate))), progress=progress)
    t_att = attribute_example(m.teacher, m.tokenizer, example, spec=m.t_spec, **kw)
    s_att = attribute_example(m.student, m.tokenizer, example, spec=m.s_spec, **kw)
    return pair(t_att, s_att, m.t_spec, m.s_spec, rate, cfg.layer_strategy, cfg.seed)


def teacher_sources(m: Models, pairing: Pairing, kinds, cfg: LatenConfig) -> tuple[dict, dict]:
    """The vectors a pairing feeds the hypernetwork (the teacher's, or ``cfg.teacher_vectors``' null) and their
    student sites: what training, selection and apply all translate."""
    return extract(m.teacher, m.t_spec, m.s_spec, pairing, kinds, cfg.teacher_vectors, cfg.seed)


# ---- training -------------------------------------------------------------------------------------

def ckpt_path(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:04d}" / "hypernet.pt"


def available_steps(run: Path) -> list[int]:
    root = Path(run) / "checkpoints"
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob("step-*/hypernet.pt")) if root.is_dir() else []


def lm_loss_sum(student, batch: dict) -> torch.Tensor:
    """Σ over samples of the per-sample mean token loss on labelled (response) tokens."""
    dev = student.device
    logits = student(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    labels = batch["labels"].to(dev)[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    n = (labels != IGNORE).sum(-1).clamp(min=1)
    return (ce.sum(-1) / n).sum()


def train(cfg: LatenConfig, run_dir: str | Path, *, models: Models | None = None, resume: bool = True,
          progress: bool = True, log=print) -> list[dict]:
    """Train the hypernetwork; returns the per-step log rows. Resumes from ``run_dir/state.pt`` if present."""
    run = Path(run_dir)
    extract_set, align_set = split_examples(cfg, "extract"), split_examples(cfg, "align")
    # schedule "extract": the cycle spans the whole extract split (the reference's), max_steps only stops early
    # and a later call with a larger one continues the run. "trained": it spans the steps trained, so the
    # peak lr is reached whatever the budget; a different max_steps is then a different run.
    steps = len(extract_set) if cfg.max_steps is None else min(cfg.max_steps, len(extract_set))
    total = len(extract_set) if cfg.schedule == "extract" else steps
    if cfg.batch_size - 1 > len(align_set):
        raise PktError(f"batch_size {cfg.batch_size} needs {cfg.batch_size - 1} align examples, have {len(align_set)}")
    cfg_dump = cfg.model_dump(mode="json")
    state_file = run / "state.pt"
    resuming = resume and state_file.is_file()
    if resuming:
        saved_cfg = json.loads((run / "config.json").read_text())
        saved_cfg.setdefault("schedule", "extract")  # runs written before the settings existed
        saved_cfg.setdefault("teacher_vectors", "real")
        if cfg.schedule == "extract":
            saved_cfg["max_steps"] = cfg_dump["max_steps"]
        if saved_cfg != cfg_dump:
            diff = sorted(k for k in cfg_dump if saved_cfg.get(k) != cfg_dump[k])
            raise PktError(f"{run}: existing run has different settings ({', '.join(diff)}); use a new --out or --no-resume")
    m = models or load_models(cfg, log)
    net = HyperNet(m.t_spec.hidden_size, m.s_spec.hidden_size, cfg.modules, cfg.init, cfg.init_std, seed=cfg.seed)
    opt = optimizer(net, cfg.lr, cfg.weight_decay, cfg.betas)
    sched = one_cycle(opt, cfg.lr, total, cfg.pct_start)
    start, rows = 0, []
    if resuming:
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        start, rows = state["step"], state["log"]
        net = HyperNet.load(ckpt_path(run, start))
        opt = optimizer(net, cfg.lr, cfg.weight_decay, cfg.betas)
        # Scheduler first: a new OneCycleLR writes its step-0 lr and beta1 (it cycles momentum too) into the
        # optimiser, which the optimiser's saved param groups then overwrite.
        sched = one_cycle(opt, cfg.lr, total, cfg.pct_start)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        log(f"resuming {run} after step {start}")
    else:  # a fresh run: drop what an earlier run left in this directory
        import shutil

        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        for name in ("state.pt", "log.jsonl"):
            (run / name).unlink(missing_ok=True)
        net.save(ckpt_path(run, 0), extra={"step": 0})
    write_json(run / "config.json", cfg_dump)
    injector = Injector(m.student, m.s_spec)
    pad = m.tokenizer.pad_token_id
    bar = tqdm(range(start, steps), desc="laten train", disable=not progress, initial=start, total=steps)
    tracker = TrainingLog(cfg.report_to, run, "laten", config=cfg_dump)
    for t in bar:
        t0 = time.perf_counter()
        example = extract_set[t]
        pairing = locate(m, example, cfg, cfg.transfer_rate, progress)
        t_loc = time.perf_counter() - t0
        sources, sites = teacher_sources(m, pairing, cfg.modules, cfg)
        samples = random.Random(cfg.seed + t).sample(align_set, cfg.batch_size - 1) + [example]
        feats = [tokenize_example(e, m.tokenizer, cfg.style, cfg.cutoff_len) for e in samples]
        translated = net.translate(sources)
        # Micro-batches back-propagate into detached copies; the sum of their grads goes through H once.
        leaves = {k: v.detach().requires_grad_() for k, v in translated.items()}
        lm_total = 0.0
        with injector.set(to_deltas(leaves, sites)):
            for s in range(0, len(feats), cfg.micro_batch):
                loss = lm_loss_sum(m.student, collate(feats[s: s + cfg.micro_batch], pad, "right")) / len(feats)
                loss.backward()
                lm_total += float(loss.detach())
        pen = cfg.penalty * penalty(translated)
        check_finite(lm_total + float(pen.detach()), t + 1, "laten train")
        surrogate = sum((translated[k] * leaves[k].grad).sum() for k in translated) + pen
        opt.zero_grad(set_to_none=True)
        surrogate.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        row = {"step": t + 1, "loss": lm_total + float(pen.detach()), "lm_loss": lm_total, "penalty": float(pen.detach()),
               "lr": lr, "grad_norm": grad_norm, "example": example.meta.get("id", t), **pairing.summary(),
               "seconds": round(time.perf_counter() - t0, 2), "locate_seconds": round(t_loc, 2)}
        row["tokens_per_s"] = round(sum(len(f["input_ids"]) for f in feats) / max(time.perf_counter() - t0, 1e-9), 1)
        rows.append(row)
        tracker.log(row)
        net.save(ckpt_path(run, t + 1), extra={"step": t + 1, "log": row})
        # Optimiser state only for the latest step (resume); per-step checkpoints hold the hypernetwork.
        tmp = run / ".state.pt.tmp"
        torch.save({"step": t + 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "log": rows}, tmp)
        tmp.replace(state_file)
        write_jsonl(run / "log.jsonl", rows)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lm=f"{lm_total:.4f}")
        log(json.dumps(row))
    tracker.close()
    return rows


def align_loss(m: Models, deltas: Deltas, examples: list[ChatExample], cfg: LatenConfig) -> float:
    """Mean per-sample LM loss (response tokens) of the student with ``deltas`` injected by hooks."""
    feats = [tokenize_example(e, m.tokenizer, cfg.style, cfg.cutoff_len) for e in examples]
    total = 0.0
    with torch.no_grad(), Injector(m.student, m.s_spec).set(deltas):
        for s in range(0, len(feats), cfg.micro_batch):
            total += float(lm_loss_sum(m.student, collate(feats[s: s + cfg.micro_batch], m.tokenizer.pad_token_id,
                                                          "right")))
    return total / len(feats)


def select_point(run_dir: str | Path, steps, rates, examples: list[ChatExample], *, seed: int = 42,
                 models: Models | None = None, log=print) -> tuple[dict, list[dict]]:
    """The (step, rate) whose injected student has the lowest LM loss on ``examples``, and the whole grid.

    Each rate is located once with apply's seed example (the pairing depends on the rate, not on the
    step); each step's hypernetwork then translates the same teacher vectors. Ties go to the earlier step
    and the lower rate.
    """
    run = Path(run_dir)
    if not examples:
        raise PktError("LaTen step selection needs at least one align example")
    cfg = LatenConfig(**json.loads((run / "config.json").read_text()))
    m = models or load_models(cfg, log)
    have = set(available_steps(run))
    missing = [s for s in steps if s not in have]
    if missing:
        raise PktError(f"{run}: no checkpoint for step(s) {missing}; available steps: {sorted(have) or 'none'}")
    example = seed_example(cfg, seed)
    nets = {s: HyperNet.load(ckpt_path(run, s)) for s in steps}
    grid = []
    for rate in rates:
        pairing = locate(m, example, cfg, rate)
        sources, sites = teacher_sources(m, pairing, nets[steps[0]].kinds, cfg)
        for s in steps:
            deltas = translate(nets[s], sources, sites)
            loss = align_loss(m, deltas, examples, cfg)
            grid.append({"step": s, "rate": rate, "align_loss": loss})
            log(f"laten select: step {s} rate {rate}: align loss {loss:.4f}")
    best = min(grid, key=lambda r: (r["align_loss"], r["step"], r["rate"]))
    return best, grid


# ---- apply ----------------------------------------------------------------------------------------

def seed_example(cfg: LatenConfig, seed: int) -> ChatExample:
    """The example apply locates with: ``random.Random(seed)``'s choice from the train split (the reference
    inference script's), whatever the step and rate."""
    return random.Random(seed).choice(split_examples(cfg, "train"))


def translate(net: HyperNet, sources: dict, sites) -> Deltas:
    """The deltas a hypernetwork checkpoint makes of the teacher vectors ``sources`` extracted for ``sites``."""
    with torch.no_grad():
        return to_deltas(net.translate(sources), sites)


def apply(run_dir: str | Path, step: int, transfer_rate: float, out: str | Path, *, seed: int = 42,
          models: Models | None = None, progress: bool = False, log=print) -> tuple[dict, Deltas]:
    """Re-locate with a seed example, translate with checkpoint ``step``, fuse and save to ``out``."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise PktError(f"{run}: not a laten run directory (no config.json); run `pkt laten train` first")
    cfg = LatenConfig(**json.loads((run / "config.json").read_text()))
    ApplyConfig(step=step, transfer_rate=transfer_rate, out=str(out), seed=seed)  # validates
    path = ckpt_path(run, step)
    if not path.is_file():
        raise PktError(f"{run}: no checkpoint for step {step}; available steps: {available_steps(run) or 'none'}")
    net = HyperNet.load(path)
    m = models or load_models(cfg, log)
    if m.s_spec.weight_shape("o")[0] != net.meta["d_student"] or m.t_spec.hidden_size != net.meta["d_teacher"]:
        raise PktError("the run's hypernetwork does not match these teacher/student hidden sizes")
    example = seed_example(cfg, seed)
    t0 = time.perf_counter()
    pairing = locate(m, example, cfg, transfer_rate, progress)
    sources, sites = teacher_sources(m, pairing, net.kinds, cfg)
    deltas = translate(net, sources, sites)
    size = delta_stats(m.student, deltas, m.s_spec)  # before fusing: relative to the student's own weights
    manifest = {
        "method": "laten", "teacher": cfg.teacher, "student": cfg.student, "run": str(run), "step": step,
        "transfer_rate": transfer_rate, "seed": seed, "seed_example": example.meta.get("id"),
        "modules": net.kinds, "teacher_vectors": cfg.teacher_vectors, "norm": cfg.norm, "vocab_top": cfg.vocab_top, **pairing.summary(),
        "delta_rms": {k: float(torch.cat([v for (_, kk), (_, v) in deltas.items() if kk == k]).pow(2).mean().sqrt())
                      for k in net.kinds},
        "delta_rel_norm": size["rel_norm"], "delta_bf16_ratio": size["bf16_ratio"],
        "delta_bf16_changed": size["bf16_changed"],
        "delta_size": size["per_kind"],
        "seconds_locate": round(time.perf_counter() - t0, 2),
    }
    save_fused(m.student, m.tokenizer, deltas, out, manifest, m.s_spec)
    from pkt.cards import write_fused_card

    write_fused_card(out, {**manifest, "task": cfg.task})
    log(f"wrote fused student to {out} (step {step}, rate {transfer_rate})")
    return manifest, deltas
