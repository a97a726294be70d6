"""The optimisation loop that every LoRA training of pkt shares: SFT (lora/pissa/seeking, SeqKD) and GKD.

What differs between them is only how one optimiser step turns its examples into gradients (SFT: the
cross-entropy of the answers; GKD: sample continuations, then the divergence from the teacher). That part
is a *step function*; everything around it is here, once: seeding, AdamW, the warm-up + decay schedule,
the per-epoch shuffle (one ``random.Random(seed)``, which a step function may also draw from, in order),
the finite-loss guard, gradient clipping, the per-step log record, the tracker (:mod:`pkt.tracking`) and
the progress bar. An epoch is ``ceil(n / batch_size)`` steps; training stops after
``ceil(epochs × steps per epoch)`` steps (at least one).
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


def plan(n: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps)."""
    per_epoch = math.ceil(n / batch_size)
    return per_epoch, max(1, math.ceil(per_epoch * epochs))


def train_loop(model, n: int, cfg, step_fn: Callable[[Step], StepResult], *, what: str, run_name: str,
               desc: str, tracker_config: dict, loss_digits: int = 5, prepare: Callable | None = None,
               progress: bool = True, log=None, log_dir=None) -> list[dict]:
    """Train the trainable parameters of ``model`` in place over ``n`` examples; returns the per-step logs.

    ``cfg`` supplies the optimisation settings (a :class:`~pkt.align.finetune.FinetuneConfig`); ``what``
    names the loop in a divergence error, ``run_name`` its tracker run, ``desc`` its progress bar.
    ``prepare(model)`` runs after seeding and before the optimizer is built (e.g. to switch on gradient
    checkpointing). With ``log_dir`` the records also go to the tracker chosen by ``cfg.report_to``.
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
    while step < total:
        order = list(range(n))
        rng.shuffle(order)  # same seed on every process: all agree on each step's examples
        for s in range(per_epoch):
            if step >= total:
                break
            t_step = time.perf_counter()
            res = step_fn(Step(step, order[s * cfg.batch_size:(s + 1) * cfg.batch_size], model, acc, rng))
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
                   "tokens_per_s": round(res.tokens_in / max(now - t_step, 1e-9), 1), "seconds": round(now - t0, 1)}
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
