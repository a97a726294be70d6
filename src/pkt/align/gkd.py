"""On-policy knowledge distillation (GKD, Agarwal et al. 2024): the KD baseline of the LaTen paper's authors.

Their baseline is TRL's ``GKDTrainer`` with ``lmbda=1`` (every step trains on continuations the student
samples itself) and ``beta=0`` (the generalized Jensen-Shannon divergence at β=0 is the forward KL
KL(teacher ‖ student) per token), on a LoRA student (docs/methods.md §2.3). TRL 1.16's ``GKDTrainer`` does
run with this project's transformers and peft (``benchmarks/crosscheck_gkd_trl.py``: two steps on the
tiny pair, and its ``generalized_jsd_loss`` equals :func:`generalized_jsd_loss` to 2.4e-7), but it lives
in ``trl.experimental`` (TRL itself points users to another trainer) and is a ``Trainer`` with its own
schedule, accumulation and saving. The same loss in pkt's own loop gives GKD exactly the ``lora``
baseline's LoRA, data order, optimiser, schedule, finite-loss guard and outputs (:mod:`pkt.align.loop`,
:mod:`pkt.align.finetune`), without a dependency on an unstable API:

per optimiser step, for each prompt of the batch: with probability ``lmbda`` the student samples a
continuation (``temperature``, up to ``max_new_tokens``, cut after its first end token, which is kept),
otherwise the gold answer is used (supervised KD); teacher and student score the sequence and the loss is
:func:`generalized_jsd_loss` over the continuation's tokens, averaged over all of the step's tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from pkt.align.loop import Step, StepResult
from pkt.align.token_loss import kept_logits
from pkt.config import Settings
from pkt.data.chat import IGNORE, collate, render_prompt, tokenize_example
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.seeding import seed_everything


class GKDConfig(Settings):
    """GKD settings (defaults: the authors' baseline, lmbda 1 and beta 0; TRL's sampling temperature 0.9)."""

    lmbda: float = Field(1.0, ge=0, le=1)  # share of prompts answered by the student's own samples
    beta: float = Field(0.0, ge=0, le=1)  # 0 = forward KL(teacher||student), 1 = reverse KL
    temperature: float = Field(0.9, gt=0)  # sampling temperature of the student's continuations
    max_new_tokens: int = Field(128, ge=1)  # longest student continuation
    teacher_dtype: str = "float32"


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "sum") -> torch.Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``: per-token generalized JSD between the two next-token laws.

    β=0: KL(teacher ‖ student); β=1: KL(student ‖ teacher); otherwise β·KL(T ‖ M) + (1−β)·KL(S ‖ M) with
    M = β·T + (1−β)·S. Positions whose ``labels`` are -100 are left out. ``reduction``: ``sum`` over the
    kept tokens (pkt's loop divides by the step's token count), ``batchmean`` (TRL's: mean over them) or
    ``none`` (the kept per-token values).
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(mix, s, reduction="none",
                                                                                           log_target=True)
    jsd = jsd.sum(-1)  # over the vocabulary: one value per position
    if labels is not None:
        jsd = jsd[labels != IGNORE]
    if reduction == "sum":
        return jsd.sum()
    if reduction == "batchmean":
        return jsd.sum() / max(jsd.numel(), 1)
    if reduction == "none":
        return jsd
    raise PktError(f"reduction {reduction!r}: expected sum, batchmean or none")


def _eos(model, tokenizer) -> list[int]:
    from pkt.evaluate.generate import _eos_ids

    return _eos_ids(model, tokenizer)


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[list[int]], gcfg: GKDConfig, seed: int) -> list[list[int]]:
    """The student's sampled continuation of each prompt, cut after its first end token (kept)."""
    eos = _eos(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    dev = next(model.parameters()).device
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                         temperature=gcfg.temperature, top_p=1.0, top_k=0, max_new_tokens=gcfg.max_new_tokens,
                         pad_token_id=pad, eos_token_id=eos)
    conts = []
    for row in out[:, width:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        conts.append(row[:cut])
    return conts


def _features(prompt: list[int], continuation: list[int]) -> dict:
    return {"input_ids": prompt + continuation, "attention_mask": [1] * (len(prompt) + len(continuation)),
            "labels": [IGNORE] * len(prompt) + continuation}


def gkd_finetune(model, teacher, tokenizer, examples: list[ChatExample], ft, gcfg: GKDConfig, progress: bool = True,
                 log=None, log_dir: str | Path | None = None, probe=None) -> list[dict]:
    """Train the LoRA parameters of the peft ``model`` in place by GKD against ``teacher``; per-step logs.

    The loop is SFT's (:func:`pkt.align.loop.train_loop`); :func:`gkd_step` is what a step does. With
    ``log_dir`` the same records also go to the tracker chosen by ``ft.report_to`` (:mod:`pkt.tracking`). A
    ``probe`` (:func:`pkt.align.finetune.heldout_probe`) measures the model at its steps, training unchanged.
    """
    from pkt.align.loop import train_loop
    from pkt.dist import dist_state

    if dist_state().num_processes > 1:
        raise PktError("gkd runs in one process (its sampling is not split across processes); use seqkd for "
                       "`accelerate launch`")
    if not examples:
        raise PktError("gkd: no training prompts")
    if teacher.config.vocab_size != model.config.vocab_size:
        raise PktError(f"gkd needs one vocabulary: teacher {teacher.config.vocab_size}, student "
                       f"{model.config.vocab_size} tokens")
    # gold features for the off-policy share (lmbda < 1); prompts tokenised as SFT's prompt segment is
    gold = [tokenize_example(e, tokenizer, ft.style, ft.max_length) for e in examples]
    prompts = [tokenizer(render_prompt(e.messages()[:-1], tokenizer, ft.style), add_special_tokens=False)["input_ids"]
               for e in examples]
    teacher.eval()
    return train_loop(model, len(examples), ft, gkd_step(teacher, tokenizer, gold, prompts, ft, gcfg), what="gkd",
                      run_name="gkd", desc="gkd", loss_digits=6, progress=progress, log=log, log_dir=log_dir, probe=probe,
                      tracker_config={**ft.model_dump(), **{f"gkd_{k}": v for k, v in gcfg.model_dump().items()}})


def gkd_step(teacher, tokenizer, gold: list[dict], prompts: list[list[int]], ft, gcfg: GKDConfig):
    """The step function of GKD: per prompt, the student's sample (probability ``lmbda``) or the gold answer;
    then the generalized JSD to the teacher over the continuation tokens, averaged over the step's tokens."""

    def step(st: Step) -> StepResult:
        model, idx = st.model, st.examples
        dev = next(model.parameters()).device
        # on-policy or gold, decided per prompt like TRL's per-batch coin (lmbda 1: always on-policy)
        on_policy = [st.rng.random() < gcfg.lmbda for _ in idx]
        feats: list[dict] = []
        model.eval()  # sampling without LoRA dropout
        for m in range(0, len(idx), ft.micro_batch_size):
            part = idx[m:m + ft.micro_batch_size]
            pol = [i for i, on in zip(part, on_policy[m:m + ft.micro_batch_size]) if on]
            sampled = dict(zip(pol, sample_continuations(model, tokenizer, [prompts[i] for i in pol], gcfg,
                                                         seed=ft.seed * 100003 + st.index * 1009 + m))) if pol else {}
            for i in part:
                feats.append(_features(prompts[i], sampled[i]) if i in sampled else gold[i])
        model.train()
        n_tokens = sum(sum(1 for x in f["labels"][1:] if x != IGNORE) for f in feats)
        if n_tokens == 0:
            raise PktError(f"gkd step {st.index + 1}: no continuation token to score; raise max_new_tokens")
        loss_sum = 0.0
        for m in range(0, len(feats), ft.micro_batch_size):
            batch = {k: v.to(dev) for k, v in collate(feats[m:m + ft.micro_batch_size],
                                                      tokenizer.pad_token_id).items()}
            # only the continuation's positions, and the heads applied there only: the vocabulary-wide logits
            # and softmaxes of the prompt positions were the stage's memory
            keep = batch["labels"][:, 1:] != IGNORE
            with torch.no_grad():
                t_logits = kept_logits(teacher, batch, keep)
            s_logits = kept_logits(model, batch, keep)
            loss = generalized_jsd_loss(s_logits, t_logits.to(s_logits.device), None, beta=gcfg.beta) / n_tokens
            loss.backward()
            loss_sum += float(loss.detach())
        return StepResult(loss_sum, sum(len(f["input_ids"]) for f in feats),
                          {"on_policy": sum(on_policy), "tokens": n_tokens})

    return step


def gkd_distill(teacher_ref, student_ref, examples: list[ChatExample], ft, gcfg: GKDConfig, out: str | Path,
                extra: dict | None = None, progress: bool = True) -> dict:
    """GKD of a LoRA student (the ``lora`` baseline's init and budget); outputs as :func:`train_and_save`."""
    from pkt.align.finetune import save_initial_adapter, save_outputs
    from pkt.align.lora_init import make_lora_model
    from pkt.io import atomic_dir, write_json, write_jsonl
    from pkt.models.load import assert_same_tokenizer, load_model, load_tokenizer

    seed_everything(ft.seed)
    tok = load_tokenizer(student_ref, padding_side="right")
    assert_same_tokenizer(load_tokenizer(teacher_ref), tok)
    teacher = load_model(teacher_ref, dtype=gcfg.teacher_dtype)
    teacher.requires_grad_(False)
    model = make_lora_model(load_model(student_ref, dtype=ft.dtype), "lora", ft.targets, ft.r, ft.alpha, ft.dropout)
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_initial_adapter(model, tmp / "adapter_init")
        t0 = time.perf_counter()
        logs = gkd_finetune(model, teacher, tok, examples, ft, gcfg, progress=progress, log_dir=tmp)
        train_s = time.perf_counter() - t0
        del teacher
        write_jsonl(tmp / "train_log.jsonl", logs)
        t1 = time.perf_counter()
        info = save_outputs(model, tok, "lora", tmp, tmp / "adapter_init")
        summary = {"method": "gkd", "init": "lora", "student": str(student_ref), "teacher": str(teacher_ref),
                   "n_train": len(examples), "steps": len(logs),
                   "final_loss": logs[-1]["loss"] if logs else None, "processes": 1,
                   "train_seconds": round(train_s, 1), "save_seconds": round(time.perf_counter() - t1, 1),
                   "config": ft.model_dump(), "gkd": gcfg.model_dump(), "report_to": ft.report_to, "outputs": info,
                   **(extra or {})}
        write_json(tmp / "summary.json", summary)
        from pkt.cards import write_run_cards

        write_run_cards(tmp, summary)
    return summary
