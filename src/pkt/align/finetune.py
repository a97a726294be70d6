"""Post-alignment fine-tuning: LoRA SFT of the student, identical for the ``lora``/``pissa``/``seeking`` inits.

PostPKT "injects then trains" (docs/methods.md §1): the init is the only thing that differs between the three
arms, so the loop, data order and hyperparameters here are shared. A compact accelerate loop rather than
``Trainer`` (:mod:`pkt.align.loop`, shared with GKD): gradient accumulation to the paper's batch size,
AdamW, warm-up + schedule, clipping, one tqdm bar, optional bf16 autocast over fp32 master weights
(``autocast``). The loss never builds the full-vocabulary logits (:mod:`pkt.align.token_loss`);
``group_by_length`` cuts a step's micro-batches from length-sorted examples. Tokenisation is
:mod:`pkt.data.chat` (response-only labels unless ``train_on_inputs``).

Outputs (written atomically, :func:`save_outputs`):
  ``adapter_init/``  the initial adapter (peft's reference point for conversion);
  ``adapter/``       a plain LoRA relative to the *original* student (for ``pissa``/``seeking`` peft's
                     mutated-init conversion, rank 2r), loadable with ``PeftModel.from_pretrained``;
  ``merged/``        the merged Hugging Face checkpoint + tokenizer, loadable with plain transformers;
  ``adapter*/README.md``, ``merged/README.md``  model cards (:mod:`pkt.cards`);
  ``logs/finetune/`` the per-step log in the tracker chosen with ``report_to`` (TensorBoard by default,
                     :mod:`pkt.tracking`), besides ``train_log.jsonl``;
  ``heldout.json``   only with a :class:`Heldout`: the held-out answer loss at its optimizer steps (per example:
                     summed NLL and token count) and the examples each step trained on.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from pkt.config import Settings
from pkt.data.chat import IGNORE, STYLES, collate, tokenize_example
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.io import atomic_dir, write_json, write_jsonl
from pkt.align.loop import Probe, Step, StepResult, train_loop
from pkt.align.token_loss import answer_token_loss, fast_path_applies, full_logits_loss
from pkt.dist import dist_state
from pkt.tracking import check_report_to


class FinetuneConfig(Settings):
    """LoRA SFT settings. Defaults follow Seeking's ``train.sh``/adapter config (docs/methods.md §4.4-4.5):
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
    # Sort each optimizer step's examples by length before cutting micro-batches, so that each is padded
    # to a near neighbour's length, not to the longest of a random four. The step's examples, and so its
    # loss (a mean over the step's tokens), stay the same; with LoRA dropout on, the masks are drawn for
    # other micro-batch shapes, so a run differs by the dropout's randomness (hence a setting, off by default).
    group_by_length: bool = False
    # "answer": the LM head only at the labelled positions, in chunks (pkt.align.token_loss); "full": the
    # full-vocabulary logits of every position (the reference). Equal losses to float rounding: like
    # report_to it is not part of the dumped settings.
    logits: Literal["answer", "full"] = Field("answer", exclude=True)
    # where the per-step log goes besides train_log.jsonl (pkt.tracking); it changes no result, so it is not
    # part of the dumped settings (nor of a stage's cache key)
    report_to: str = Field("tensorboard", exclude=True)

    def model_post_init(self, _ctx) -> None:
        check_report_to(self.report_to)
        if self.style not in STYLES:
            raise PktError(f"style {self.style!r}: expected one of {', '.join(STYLES)}")
        if self.micro_batch_size < 1 or self.batch_size < self.micro_batch_size:
            raise PktError("need 1 <= micro_batch_size <= batch_size")


def finetune_config(config: str | None, *, targets: str | None = None, **flags) -> FinetuneConfig:
    """FinetuneConfig from defaults < the ``finetune`` section of ``config`` < the non-None flags (the settings of
    ``pkt postpkt`` and ``pkt kd``; ``targets`` comma-separated)."""
    from pkt.config import load_config

    return load_config(FinetuneConfig, config, section="finetune", targets=targets.split(",") if targets else None,
                       **flags)


@dataclass
class Heldout:
    """Held-out examples whose answer loss fine-tuning measures at the optimizer steps ``at`` (0 = before any
    update): :func:`heldout_probe`. ``max_length`` cuts them as ``pkt eval``'s answer loss does (its
    ``max_prompt_tokens``: the fine-tuning length, at least 1024)."""

    examples: list[ChatExample]
    at: tuple[int, ...]
    batch_size: int = 8
    max_length: int = 1024


def heldout_probe(heldout: Heldout, tokenizer, style: str) -> Probe:
    """A :class:`~pkt.align.loop.Probe` measuring the teacher-forced answer loss of the held-out examples with
    :func:`pkt.evaluate.generate.response_nll`, tokenised as ``pkt eval``'s answer loss tokenises them
    (:mod:`pkt.evaluate.tasks.answer_loss`). Its record: ``loss`` (token-weighted mean NLL, the ``nll`` of
    ``pkt eval``), ``loss_per_example`` (mean of the examples' mean NLLs) and ``per_example`` ([summed NLL,
    tokens] per example, in the given order)."""
    from pkt.evaluate.generate import response_nll

    feats = [tokenize_example(e, tokenizer, style, max_length=heldout.max_length) for e in heldout.examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def measure(model) -> dict:
        res = response_nll(model, feats, pad, batch_size=heldout.batch_size, progress=False, desc="held-out loss")
        tokens = sum(n for _, n in res)
        means = [s / n for s, n in res if n]
        return {"loss": sum(s for s, _ in res) / tokens if tokens else None,
                "loss_per_example": sum(means) / len(means) if means else None, "tokens": tokens,
                "per_example": [[s, n] for s, n in res]}

    return Probe(tuple(sorted(set(heldout.at))), measure)


def _n_labels(feat: dict) -> int:
    """Labelled tokens of an example that enter the loss (the first position predicts nothing)."""
    return sum(1 for x in feat["labels"][1:] if x != IGNORE)


def finetune(model, tokenizer, examples: list[ChatExample], cfg: FinetuneConfig, progress: bool = True,
             log=None, log_dir=None, probe: Probe | None = None) -> list[dict]:
    """Train the LoRA parameters of a peft ``model`` in place; returns per-step logs (loss, lr, grad norm,
    tokens/s, seconds), also sent to ``cfg.report_to`` under ``log_dir`` when one is given. A ``probe``
    (:func:`heldout_probe`) measures the model at its steps without changing the training; its ``batches`` are
    then indices into ``examples``."""
    if not examples:
        raise PktError("fine-tuning: no training examples")
    feats = [tokenize_example(e, tokenizer, cfg.style, cfg.max_length, cfg.train_on_inputs, cfg.assistant_turns)
             for e in examples]
    kept = [i for i, f in enumerate(feats) if _n_labels(f)]  # the loop's example i is examples[kept[i]]
    feats = [feats[i] for i in kept]
    if not feats:
        raise PktError("fine-tuning: no example has labelled tokens; raise max_length")

    def prepare(m) -> None:
        if cfg.gradient_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()

    logs = train_loop(model, len(feats), cfg, sft_step(feats, tokenizer.pad_token_id, cfg), what="fine-tuning",
                      run_name="finetune", desc="fine-tune", tracker_config=cfg.model_dump(), prepare=prepare,
                      progress=progress, log=log, log_dir=log_dir, probe=probe)
    if probe is not None:
        probe.batches[:] = [[kept[i] for i in b] for b in probe.batches]
    return logs


def micro_batches(idx: list[int], lengths: list[int], size: int, world: int = 1, rank: int = 0,
                  group_by_length: bool = False) -> list[list[int]]:
    """This process's micro-batches (example indices) of an optimizer step over the examples ``idx``.

    Data parallel (accelerate launch): process r takes every world-th example of the step. Every process
    gets the same number of micro-batches (the last ones may be empty: zero-weighted dummies) so that the
    collective calls line up. With ``group_by_length`` the step's examples are sorted by length first, so
    that neighbours in length share a micro-batch and each is padded to a near neighbour's length.
    """
    if group_by_length:
        idx = sorted(idx, key=lambda i: lengths[i])  # stable: ties keep the shuffled order
    mine = idx[rank::world]
    n_micro = max(1, math.ceil(math.ceil(len(idx) / world) / size))
    return [mine[m * size:(m + 1) * size] for m in range(n_micro)]


def sft_step(feats: list[dict], pad_id: int, cfg: FinetuneConfig):
    """The step function of SFT (:func:`pkt.align.loop.train_loop`): the summed cross-entropy of the step's
    answer tokens, divided by their count, through micro-batches (and processes under ``accelerate launch``)."""
    loss_fn = None
    lengths = [len(f["input_ids"]) for f in feats]

    def step(st: Step) -> StepResult:
        nonlocal loss_fn
        acc, model = st.acc, st.model
        world, rank = acc.num_processes, acc.process_index
        if loss_fn is None:  # the head is known once the model is prepared
            loss_fn = answer_token_loss if cfg.logits == "answer" and fast_path_applies(model) else full_logits_loss
        # Only the forward runs inside autocast (the loss functions say how): autograd replays each op's
        # backward in the dtype its forward used (PyTorch's recommended AMP use).
        amp = (torch.autocast(acc.device.type, dtype=torch.bfloat16) if cfg.autocast == "bf16"
               else contextlib.nullcontext())
        idx = st.examples
        micro = micro_batches(idx, lengths, cfg.micro_batch_size, world, rank, cfg.group_by_length)
        n_micro = len(micro)
        # The loss is the mean over all labelled tokens of the step, so it does not depend on how the
        # step is split into micro-batches or processes (a per-micro-batch mean would).
        n_tokens = sum(_n_labels(feats[i]) for i in idx)
        loss_sum = torch.zeros((), device=acc.device)
        for m in range(n_micro):
            mb = [feats[i] for i in micro[m]]
            batch = {k: v.to(acc.device) for k, v in collate(mb or [feats[idx[0]]], pad_id).items()}
            # gradients are synchronised once, on the last micro-batch
            sync = contextlib.nullcontext() if m == n_micro - 1 else acc.no_sync(model)
            with sync:
                token_loss = loss_fn(model, batch, amp)
                token_loss = token_loss * (1.0 if mb else 0.0)
                # DDP averages gradients over processes, hence × world to get the step's sum
                acc.backward(token_loss * (world / n_tokens))
            loss_sum += token_loss.detach() / n_tokens
        loss = float(acc.reduce(loss_sum, reduction="sum")) if world > 1 else float(loss_sum)
        return StepResult(loss, sum(lengths[i] for i in idx))

    return step


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
                   out: str | Path, extra: dict | None = None, progress: bool = True,
                   heldout: Heldout | None = None) -> dict:
    """Save the initial adapter, fine-tune, and write adapter/merged/logs atomically into ``out``; with
    ``heldout`` also ``heldout.json`` (the held-out answer loss at its steps, :func:`heldout_probe`)."""
    out = Path(out)
    state = dist_state()
    probe = heldout_probe(heldout, tokenizer, cfg.style) if heldout is not None else None
    if not state.is_main_process:
        # other data-parallel workers train (their gradients are needed) but write nothing
        logs = finetune(model, tokenizer, examples, cfg, progress=False, probe=probe)
        return {"init": init, "n_train": len(examples), "steps": len(logs),
                "final_loss": logs[-1]["loss"] if logs else None}
    with atomic_dir(out) as tmp:
        init_dir = tmp / "adapter_init"
        save_initial_adapter(model, init_dir)
        t0 = time.perf_counter()
        logs = finetune(model, tokenizer, examples, cfg, progress=progress, log_dir=tmp, probe=probe)
        train_s = time.perf_counter() - t0
        write_jsonl(tmp / "train_log.jsonl", logs)
        if probe is not None:
            write_json(tmp / "heldout.json", {"at": list(probe.at), "n": len(heldout.examples),
                                              "records": probe.records, "batches": probe.batches})
        t1 = time.perf_counter()
        info = save_outputs(model, tokenizer, init, tmp, init_dir)
        summary = {"init": init, "n_train": len(examples), "steps": len(logs),
                   "lora_dropout": model.peft_config["default"].lora_dropout,
                   "final_loss": logs[-1]["loss"] if logs else None, "processes": state.num_processes,
                   **({"heldout_loss": {str(r["step"]): r["loss"] for r in probe.records}} if probe else {}),
                   "train_seconds": round(train_s, 1),
                   "save_seconds": round(time.perf_counter() - t1, 1), "config": cfg.model_dump(),
                   "report_to": cfg.report_to, "outputs": info, **(extra or {})}
        write_json(tmp / "summary.json", summary)
        from pkt.cards import write_run_cards

        write_run_cards(tmp, summary)
    return summary
