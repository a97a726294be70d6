"""The SFT loss without the full-vocabulary logits: the head applied at answer positions only, in chunks.

The reference loss (:func:`full_logits_loss`) is what the fine-tuning loop computed first: the model's
logits at every position of the micro-batch, then cross-entropy over the labelled ones. For the 0.5B
student (151,936-token vocabulary) one micro-batch of 4 × 384 tokens makes a 0.93 GB float32 logits tensor,
and the loss keeps several of that size alive at once (the logits, their shifted copy, the saved
log-softmax, its gradient), although only the answer positions enter the loss (prompts and padding are
labelled -100).

:func:`answer_token_loss` computes the same sum: the model runs without its head (its last hidden states,
``output_hidden_states``), the positions whose next token is labelled are selected, and
:class:`LinearCrossEntropy` applies the head and the cross-entropy to them a chunk of rows at a time. It
computes the gradient with respect to the hidden states in the forward pass, chunk by chunk, so no logits
tensor outlives its chunk; the backward pass only scales it. The sum equals the reference to float
rounding (tests/test_finetune_fast_loss.py). The head's weights must be frozen (they are in every LoRA
arm except Seeking with ``lm_head`` among its targets; :func:`fast_path_applies` says when to fall back).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from pkt.data.chat import IGNORE

# bytes of float32 logits per chunk: large enough for full-speed GEMMs, small beside the model's weights
CHUNK_BYTES = 256 * 2**20


def full_logits_loss(model, batch: dict, amp=contextlib.nullcontext()) -> torch.Tensor:
    """Reference: the summed next-token cross-entropy over the labelled positions, from the full logits.

    ``amp`` (an autocast context) covers the model's forward; the loss is taken in fp32 from upcast logits.
    """
    with amp:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def output_head(model) -> torch.nn.Module:
    """The LM head (``get_output_embeddings``) of a model, through peft's and DDP's wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return inner.get_output_embeddings()


def fast_path_applies(model) -> bool:
    """Whether :func:`answer_token_loss` may replace the reference: a plain linear head with frozen weights
    (a LoRA-wrapped or otherwise transformed head, e.g. a logit soft-cap in the model's forward, is not)."""
    head = output_head(model)
    inner = getattr(model, "module", model)
    cfg = getattr(inner, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T + b, y_i), with dL/dh computed chunk by chunk in the forward pass.

    The gradient of the summed cross-entropy with respect to the logits is softmax - onehot; with respect
    to h it is that times W. Computing it here means the backward pass needs only the (rows × hidden)
    gradient, not the (rows × vocabulary) logits. W and b receive no gradient (the head is frozen).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight, bias).float()
            y = target[s:s + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' own memory
                probs[torch.arange(len(y), device=y.device), y] -= 1
                grad[s:s + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def answer_token_loss(model, batch: dict, amp=contextlib.nullcontext(), chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """The summed next-token cross-entropy over the labelled positions, as :func:`full_logits_loss`, with the
    head applied to those positions only, ``chunk_bytes`` of float32 logits at a time.

    The head's matmul runs inside ``amp`` as it does inside the model's forward in the reference; the
    softmax and the sum are fp32.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    head = output_head(model)
    chunk = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    with amp:
        # an empty index: the model computes no logits at all, only its (final-norm) hidden states
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
        hidden = out.hidden_states[-1][:, :-1][keep]  # position t predicts token t+1
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels[keep], chunk)


def plain_head(model) -> bool:
    """Whether a model's logits are its head applied to its last hidden states, nothing more (no logit soft-cap
    or scale in its forward), so that :func:`kept_logits` may apply the head itself."""
    inner = getattr(model, "module", model)
    cfg = getattr(inner, "config", None)
    return not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))


def kept_logits(model, batch: dict, keep: torch.Tensor) -> torch.Tensor:
    """The next-token logits at the positions ``keep`` selects (``keep[b, t]``: position t of row b, which
    predicts token t+1), as ``model(...).logits[:, :-1][keep]``, with the head applied to those rows only.

    Distillation scores a short continuation after a long prompt: the full logits of teacher and student
    (and their float32 softmaxes) at every prompt position were most of the GKD stage's memory. Falls back
    to the full logits where the model's forward does more than apply its head (:func:`plain_head`)."""
    if not plain_head(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return logits[:, :-1][keep]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
    return output_head(model)(out.hidden_states[-1][:, :-1][keep])
