"""Post-alignment fine-tuning: LoRA SFT of the student, identical for the ``lora``/``pissa``/``seeking`` inits.

PostPKT "injects then trains" (METHODS.md §1): the init is the only thing that differs between the three
arms, so the loop, data order and hyperparameters here are shared. A compact accelerate loop rather than
``Trainer``: gradient accumulation to the paper's batch size, AdamW, warm-up + schedule, clipping, one
tqdm bar, optional bf16 autocast over fp32 master weights (``autocast``), and nothing else to configure.
Tokenisation is :mod:`pkt.data.chat` (response-only labels unless ``train_on_inputs``).

Outputs (written atomically, :func:`save_outputs`):
  ``adapter_init/``  the initial adapter (peft's reference point for conversion);
  ``adapter/``       a plain LoRA relative to the *original* student (for ``pissa``/``seeking`` peft's
                     mutated-init conversion, rank 2r), loadable with ``PeftModel.from_pretrained``;
  ``merged/``        the merged Hugging Face checkpoint + tokenizer, loadable with plain transformers;
  ``adapter*/README.md``, ``merged/README.md``  model cards (:mod:`pkt.cards`);
  ``logs/finetune/`` the per-step log in the tracker chosen with ``report_to`` (TensorBoard by default,
                     :mod:`pkt.tracking`), besides ``train_log.jsonl``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from pkt.config import Settings
from pkt.align.guard import check_finite
from pkt.data.chat import IGNORE, STYLES, collate, tokenize_example
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.io import atomic_dir, write_json, write_jsonl
from pkt.tracking import TrainingLog, check_report_to


class FinetuneConfig(Settings):
    """LoRA SFT settings. Defaults follow Seeking's ``train.sh``/adapter config (METHODS.md §4.4-4.5):
    r=16, α=16, dropout 0.05, lr 3e-4, batch 64, 3 epochs, warm-up 3%, cutoff 2048, seed 1. ``dropout`` None
    = the init's own (0.05; 0 for PiSSA, whose adapter holds the student's principal part: pkt.align.lora_init)."""

    r: int = 16
    alpha: float = 16
    dropout: float | None = Field(None, ge=0, lt=1)
    targets: list[str] = ["q", "k", "v", "o", "gate", "up", "down"]
    lr: float = 3e-4
    epochs: float = 3
    batch_size: int = 64  # examples per optimizer step (gradient accumulation over micro-batches)
    micro_batch_size: int = 4
    max_length: int = 2048
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    n_train: int | None = None  # first N examples of the train split (None = all)
    seed: int = 1
    style: str = "chat"
    train_on_inputs: bool = False
    dtype: str = "float32"
    pissa_niter: int | None = None  # None = exact SVD for PiSSA; K = peft's pissa_niter_K
    gradient_checkpointing: bool = False
    assistant_turns: Literal["all", "last"] = "all"  # which answers of a multi-turn conversation carry the loss
    # "bf16": forward and backward under torch.autocast(bfloat16) with the weights (and so the LoRA master
    # weights, gradients and AdamW state) kept in ``dtype``; "none": plain ``dtype`` arithmetic. A speed-up
    # candidate only where bf16 matmuls beat fp32 ones (docs/benchmarks.md, P6, measures both on the 2-core CPU).
    autocast: Literal["none", "bf16"] = "none"
    # where the per-step log goes besides train_log.jsonl (pkt.tracking); it changes no result, so it is not
    # part of the dumped settings (nor of a stage's cache key)
    report_to: str = Field("tensorboard", exclude=True)

    def model_post_init(self, _ctx) -> None:
        check_report_to(self.report_to)
        if self.style not in STYLES:
            raise PktError(f"style {self.style!r}: expected one of {', '.join(STYLES)}")
        if self.micro_batch_size < 1 or self.batch_size < self.micro_batch_size:
            raise PktError("need 1 <= micro_batch_size <= batch_size")


def dist_state():
    """accelerate's per-process state (rank, world size, device), shared by everything in the process.

    Honours ``ACCELERATE_USE_CPU`` as ``Accelerator()`` does. A bare ``PartialState()`` ignores it, and the
    first state created is the one every later call gets: on a machine without GPUs each worker of
    ``accelerate launch`` would then run alone (world 1) and all of them would write the outputs.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _n_labels(feat: dict) -> int:
    """Labelled tokens of an example that enter the loss (the first position predicts nothing)."""
    return sum(1 for x in feat["labels"][1:] if x != IGNORE)


def _plan(n: int, cfg: FinetuneConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps)."""
    per_epoch = math.ceil(n / cfg.batch_size)
    return per_epoch, max(1, math.ceil(per_epoch * cfg.epochs))


def finetune(model, tokenizer, examples: list[ChatExample], cfg: FinetuneConfig, progress: bool = True,
             log=None, log_dir=None) -> list[dict]:
    """Train the LoRA parameters of a peft ``model`` in place; returns per-step logs (loss, lr, grad norm,
    tokens/s, seconds), also sent to ``cfg.report_to`` under ``log_dir`` when one is given."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    if not examples:
        raise PktError("fine-tuning: no training examples")
    feats = [tokenize_example(e, tokenizer, cfg.style, cfg.max_length, cfg.train_on_inputs, cfg.assistant_turns)
             for e in examples]
    feats = [f for f in feats if _n_labels(f)]
    if not feats:
        raise PktError("fine-tuning: no example has labelled tokens; raise max_length")
    acc = Accelerator()
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch, total = _plan(len(feats), cfg)
    # floor: with a single step (tiny runs) a warm-up step would mean lr = 0 and no training at all
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * total),
                          num_training_steps=total)
    model, opt = acc.prepare(model, opt)
    model.train()
    # Only the forward runs inside autocast: autograd replays each op's backward in the dtype its forward
    # used, and the loss below is taken in fp32 from upcast logits either way (PyTorch's recommended AMP use).
    amp = (torch.autocast(acc.device.type, dtype=torch.bfloat16) if cfg.autocast == "bf16"
           else contextlib.nullcontext())
    rng = random.Random(cfg.seed)
    logs: list[dict] = []
    world, rank = acc.num_processes, acc.process_index
    bar = tqdm(total=total, desc="fine-tune", unit="step", disable=not progress or not acc.is_main_process)
    tracker = TrainingLog(cfg.report_to if log_dir else "none", log_dir or ".", "finetune", config=cfg.model_dump(),
                          main_process=acc.is_main_process)
    step, t0 = 0, time.perf_counter()
    while step < total:
        order = list(range(len(feats)))
        rng.shuffle(order)  # same seed on every process: all agree on each step's examples
        for s in range(per_epoch):
            if step >= total:
                break
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            t_step = time.perf_counter()
            # Data parallel (accelerate launch): process r takes every world-th example of the step. Every
            # process runs the same number of micro-batches (an empty one is a zero-weighted dummy) so the
            # collective calls line up; gradients are synchronised once, on the last micro-batch.
            mine = idx[rank::world]
            n_micro = max(1, math.ceil(math.ceil(len(idx) / world) / cfg.micro_batch_size))
            # The loss is the mean over all labelled tokens of the step, so it does not depend on how the
            # step is split into micro-batches or processes (a per-micro-batch mean would).
            n_tokens = sum(_n_labels(feats[i]) for i in idx)
            loss_sum = torch.zeros((), device=acc.device)
            for m in range(n_micro):
                mb = [feats[i] for i in mine[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]]
                batch = {k: v.to(acc.device) for k, v in collate(mb or [feats[idx[0]]], tokenizer.pad_token_id).items()}
                sync = contextlib.nullcontext() if m == n_micro - 1 else acc.no_sync(model)
                with sync:
                    with amp:
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       use_cache=False).logits
                    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE, reduction="sum") * (1.0 if mb else 0.0)
                    # DDP averages gradients over processes, hence × world to get the step's sum
                    acc.backward(token_loss * (world / n_tokens))
                loss_sum += token_loss.detach() / n_tokens
            loss_sum = float(acc.reduce(loss_sum, reduction="sum")) if world > 1 else float(loss_sum)
            # before the optimizer step: a diverged step must not be applied, logged or saved
            check_finite(loss_sum, step + 1, "fine-tuning")
            # max_norm=inf clips nothing: the norm is still measured for the log
            grad_norm = float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            n_in = sum(len(feats[i]["input_ids"]) for i in idx)  # the step's tokens, all processes
            rec = {"step": step, "epoch": round(step / per_epoch, 3), "loss": round(loss_sum, 5), "lr": lr,
                   "grad_norm": round(grad_norm, 5), "tokens_per_s": round(n_in / max(now - t_step, 1e-9), 1),
                   "seconds": round(now - t0, 1)}
            logs.append(rec)
            tracker.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            if log:
                log(rec)
    bar.close()
    tracker.close()
    model.eval()
    return logs


def save_initial_adapter(model, path: str | Path) -> None:
    """Save the adapter as initialised (peft's reference point for converting a mutated init to LoRA).

    The saved config says ``init_lora_weights=True``: loading it must not re-run PiSSA/Seeking on top of
    an already mutated base (peft's rule for ``path_initial_model_for_weight_conversion``).
    """
    cfg = model.peft_config["default"]
    how = cfg.init_lora_weights
    cfg.init_lora_weights = True
    try:
        model.save_pretrained(str(path))
    finally:
        cfg.init_lora_weights = how


def save_outputs(model, tokenizer, init: str, tmp_dir: Path, init_adapter: Path) -> dict:
    """Write ``adapter/`` (plain LoRA w.r.t. the original student) and ``merged/`` into ``tmp_dir``."""
    from pkt.align.lora_init import VOCAB_KINDS

    info: dict = {}
    mutated = init in ("pissa", "seeking")
    embed_lora = any(getattr(m, "lora_embedding_A", None) for m in model.modules())
    if mutated and embed_lora:
        # peft's conversion only handles lora_A/lora_B (Linear) tensors; embedding LoRAs would be left
        # unconverted and wrong. The merged checkpoint is still exact.
        info["adapter"] = f"not written: peft cannot convert a mutated-init embedding LoRA ({'/'.join(VOCAB_KINDS)})"
    elif mutated:
        # the init is history now; peft warns on conversion unless the config says plain LoRA
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(tmp_dir / "adapter"),
                              path_initial_model_for_weight_conversion=str(init_adapter))
        info["adapter"] = "adapter/: plain LoRA (rank 2r) relative to the original student (peft conversion)"
    else:
        model.save_pretrained(str(tmp_dir / "adapter"))
        info["adapter"] = "adapter/: plain LoRA relative to the original student"
    merged = model.merge_and_unload()
    merged.save_pretrained(str(tmp_dir / "merged"))
    tokenizer.save_pretrained(str(tmp_dir / "merged"))
    info["merged"] = "merged/: Hugging Face checkpoint (student with the trained update merged)"
    return info


def train_and_save(model, tokenizer, examples: list[ChatExample], cfg: FinetuneConfig, init: str,
                   out: str | Path, extra: dict | None = None, progress: bool = True) -> dict:
    """Save the initial adapter, fine-tune, and write adapter/merged/logs atomically into ``out``."""
    out = Path(out)
    state = dist_state()
    if not state.is_main_process:
        # other data-parallel workers train (their gradients are needed) but write nothing
        logs = finetune(model, tokenizer, examples, cfg, progress=False)
        return {"init": init, "n_train": len(examples), "steps": len(logs),
                "final_loss": logs[-1]["loss"] if logs else None}
    with atomic_dir(out) as tmp:
        init_dir = tmp / "adapter_init"
        save_initial_adapter(model, init_dir)
        t0 = time.perf_counter()
        logs = finetune(model, tokenizer, examples, cfg, progress=progress, log_dir=tmp)
        train_s = time.perf_counter() - t0
        write_jsonl(tmp / "train_log.jsonl", logs)
        t1 = time.perf_counter()
        info = save_outputs(model, tokenizer, init, tmp, init_dir)
        summary = {"init": init, "n_train": len(examples), "steps": len(logs),
                   "lora_dropout": model.peft_config["default"].lora_dropout,
                   "final_loss": logs[-1]["loss"] if logs else None, "processes": state.num_processes,
                   "train_seconds": round(train_s, 1),
                   "save_seconds": round(time.perf_counter() - t1, 1), "config": cfg.model_dump(),
                   "report_to": cfg.report_to, "outputs": info, **(extra or {})}
        write_json(tmp / "summary.json", summary)
        from pkt.cards import write_run_cards

        write_run_cards(tmp, summary)
    return summary
