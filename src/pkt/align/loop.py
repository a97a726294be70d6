"""The optimisation loop that every LoRA training of pkt shares: SFT (lora/pissa/seeking, SeqKD) and GKD.

What differs between them is only how one optimiser step turns its examples into gradients (SFT: the
cross-entropy of the answers; GKD: sample continuations, then the divergence from the teacher). That part
is a *step function*; everything around it is here, once: seeding, AdamW, the warm-up + decay schedule,
the per-epoch shuffle (one ``random.Random(seed)``, which a step function may also draw from, in order),
the finite-loss guard, gradient clipping, the per-step log record, the tracker (:mod:`pkt.tracking`) and
the progress bar. An epoch is ``ceil(n / batch_size)`` steps; training stops after
``ceil(epochs × steps per epoch)`` steps (at least one).

A :class:`Probe` measures the model at chosen optimizer steps (step 0 = before any update), e.g. its loss on
held-out examples (:mod:`pkt.studies.steps_saved`), and records which examples every step trained on. It leaves
training exactly as it was: the measurement runs in eval mode (no dropout) without gradients, the global RNG
states are restored after it, and the loop's own ``random.Random`` is never handed to it, so the weights and
per-step losses are the same bit for bit with and without it (tests/test_steps_saved.py).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from pkt.align.guard import check_finite
from pkt.errors import PktError
from pkt.tracking import TrainingLog


@dataclass
class Step:
    """What a step function gets: the step's example indices and the loop's shared state."""

    index: int  # 0-based number of the step
    examples: list[int]  # indices of this step's examples, in shuffled order
    model: object  # the model as prepared by accelerate (DDP-wrapped under `accelerate launch`)
    acc: object  # the Accelerator
    rng: random.Random  # the loop's RNG (it also shuffles): draws here are part of the run's data order


@dataclass
class StepResult:
    """A step function's report: it has already run the backward pass(es) of the step."""

    loss: float  # the step's loss, over all processes
    tokens_in: int  # input tokens processed by the step (all processes), for tokens/s
    extra: dict = field(default_factory=dict)  # log fields placed after ``grad_norm`` (e.g. GKD's counts)


@dataclass
class Probe:
    """A measurement of the model at chosen optimizer steps that changes nothing of the training.

    ``measure(model)`` gets the unwrapped model in eval mode under ``torch.no_grad()`` and returns a JSON-able
    dict; the loop adds ``{"step": k, **measure(model), "seconds": ...}`` to ``records`` at every step k of ``at``
    (0 = before the first update, k = after k updates) and each step's example indices to ``batches``. A measured
    step's log record also carries the measurement's ``loss`` as ``heldout_loss``.
    """

    at: tuple[int, ...]
    measure: Callable[[object], dict]
    records: list[dict] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)

    def check(self, total: int) -> None:
        """Refuse steps the run will not reach (before any training, so a bad setting costs nothing)."""
        bad = [k for k in self.at if not 0 <= k <= total]
        if bad:
            raise PktError(f"heldout_at {bad[0]}: the run has {total} optimizer step{'s' * (total != 1)} "
                           f"(steps 0..{total} can be measured)")

    def __call__(self, model, step: int) -> dict | None:
        if step not in self.at:
            return None
        t0 = time.perf_counter()
        # the global RNG states as they were: nothing below may shift a later dropout mask or sample
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # dropout off: the measurement is deterministic and draws nothing
        try:
            with torch.no_grad():
                rec = {"step": step, **self.measure(model)}
        finally:
            for m, mode in modes:
                m.training = mode
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.records.append(rec)
        return rec


def plan(n: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps)."""
    per_epoch = math.ceil(n / batch_size)
    return per_epoch, max(1, math.ceil(per_epoch * epochs))


def train_loop(model, n: int, cfg, step_fn: Callable[[Step], StepResult], *, what: str, run_name: str,
               desc: str, tracker_config: dict, loss_digits: int = 5, prepare: Callable | None = None,
               progress: bool = True, log=None, log_dir=None, probe: Probe | None = None) -> list[dict]:
    """Train the trainable parameters of ``model`` in place over ``n`` examples; returns the per-step logs.

    ``cfg`` supplies the optimisation settings (a :class:`~pkt.align.finetune.FinetuneConfig`); ``what``
    names the loop in a divergence error, ``run_name`` its tracker run, ``desc`` its progress bar.
    ``prepare(model)`` runs after seeding and before the optimizer is built (e.g. to switch on gradient
    checkpointing). With ``log_dir`` the records also go to the tracker chosen by ``cfg.report_to``. A ``probe``
    (:class:`Probe`) measures the model at its steps without changing the training.
    """
    from accelerate import Accelerator
    from transformers import get_scheduler

    acc = Accelerator()
    torch.manual_seed(cfg.seed)
    if prepare is not None:
        prepare(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch, total = plan(n, cfg.batch_size, cfg.epochs)
    if probe is not None:
        probe.check(total)
    # floor: with a single step (tiny runs) a warm-up step would mean lr = 0 and no training at all
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * total),
                          num_training_steps=total)
    model, opt = acc.prepare(model, opt)
    model.train()
    rng = random.Random(cfg.seed)
    logs: list[dict] = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress or not acc.is_main_process)
    tracker = TrainingLog(cfg.report_to if log_dir else "none", log_dir or ".", run_name, config=tracker_config,
                          main_process=acc.is_main_process)
    step, t0 = 0, time.perf_counter()
    probe_s = 0.0  # time spent measuring, left out of the log's training seconds
    if probe is not None and probe(acc.unwrap_model(model), 0) is not None:
        probe_s += probe.records[-1]["seconds"]
    while step < total:
        order = list(range(n))
        rng.shuffle(order)  # same seed on every process: all agree on each step's examples
        for s in range(per_epoch):
            if step >= total:
                break
            t_step = time.perf_counter()
            examples = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            if probe is not None:
                probe.batches.append(list(examples))
            res = step_fn(Step(step, examples, model, acc, rng))
            # before the optimizer step: a diverged step must not be applied, logged or saved
            check_finite(res.loss, step + 1, what)
            # max_norm=inf clips nothing: the norm is still measured for the log
            grad_norm = float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            rec = {"step": step, "epoch": round(step / per_epoch, 3), "loss": round(res.loss, loss_digits),
                   "lr": lr, "grad_norm": round(grad_norm, 5), **res.extra,
                   "tokens_per_s": round(res.tokens_in / max(now - t_step, 1e-9), 1),
                   "seconds": round(now - t0 - probe_s, 1)}
            measured = probe(acc.unwrap_model(model), step) if probe is not None else None
            if measured is not None:
                probe_s += measured["seconds"]
                rec["heldout_loss"] = measured.get("loss")
            logs.append(rec)
            tracker.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.4f}")
            if log:
                log(rec)
    bar.close()
    tracker.close()
    model.eval()
    return logs
