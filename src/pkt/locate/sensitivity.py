"""Parameter sensitivity S = Σ_samples |θ ⊙ ∂L/∂θ| (Seeking, METHODS.md §4.1), in bounded memory.

The reference implementation keeps weights, gradients, a per-sample |θ·g| map and a running map at once
(≈4× the model size, fp32, METHODS.md §7.2 item 2). Here every parameter gets a
``register_post_accumulate_grad_hook`` that adds |θ·g| into a float32 accumulator and drops ``p.grad``
straight away, during the backward pass. Peak memory is therefore the weights + one fp32 accumulator
(optionally on another device, e.g. CPU) + activations + the few gradients alive at one moment.

Each sample is its own backward pass: S sums per-sample absolute values, and a batched loss would sum
gradients of different samples *before* taking |·|. The loss is the mean cross-entropy over the
response tokens (labels from :mod:`pkt.data.chat`), as in the reference's HF ``labels`` loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pkt.data.chat import tokenize_example
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.models.arch import ArchSpec

# |θ·g| is formed in chunks of this many elements so that the fp32 temporaries stay small even for a
# 150k-vocabulary embedding (a whole-tensor product would briefly double its size in fp32).
_CHUNK = 1 << 24


def _accumulate(acc: torch.Tensor, p: torch.Tensor, g: torch.Tensor) -> None:
    """acc += |p·g| in fp32, chunked along dim 0; p/g may be bf16/fp16 and on another device."""
    if p.dim() == 0 or p.numel() <= _CHUNK:
        acc.add_((p.detach().float() * g.float()).abs_().to(acc.device))
        return
    rows = max(1, _CHUNK // max(1, p[0].numel()))
    for i in range(0, p.shape[0], rows):
        prod = (p.detach()[i: i + rows].float() * g[i: i + rows].float()).abs_()
        acc[i: i + rows].add_(prod.to(acc.device))


def default_param_filter(name: str, p: torch.Tensor) -> bool:
    """Everything with a weight matrix (projections, embeddings, lm_head); norms and biases are skipped:
    they are never transferred, and skipping them keeps their gradients from being computed at all."""
    return p.dim() == 2


@torch.no_grad()
def _zeros_like(p: torch.Tensor, device) -> torch.Tensor:
    return torch.zeros(p.shape, dtype=torch.float32, device=device)


def compute_sensitivity(
    model: nn.Module,
    samples: Iterable[dict],
    accum_device: str | torch.device | None = None,
    param_filter: Callable[[str, torch.Tensor], bool] = default_param_filter,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, torch.Tensor]:
    """Σ over samples of |θ ⊙ ∂L/∂θ| for every parameter selected by ``param_filter`` (fp32 tensors).

    ``samples``: dicts with ``input_ids``/``labels`` (lists or 1-D tensors; -100 = not scored), one
    sample per backward pass. ``accum_device``: where the accumulators live (default: each parameter's
    own device; ``"cpu"`` keeps a GPU free of them). Keys are ``model.named_parameters()`` names; tied
    parameters appear once (their gradient is the sum over both uses). The model's ``requires_grad``
    flags and ``.grad`` fields are restored/cleared afterwards; weights are never modified.
    """
    params = {n: p for n, p in model.named_parameters() if param_filter(n, p)}
    if not params:
        raise PktError("sensitivity: no parameters selected")
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    acc: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in params)
        for n, p in params.items():
            acc[n] = _zeros_like(p, accum_device if accum_device is not None else p.device)

            def hook(param: torch.Tensor, _acc=acc[n]) -> None:
                _accumulate(_acc, param, param.grad)
                param.grad = None  # the whole point: never hold a full set of gradients

            handles.append(p.register_post_accumulate_grad_hook(hook))
        # inputs go where the embedding is (with a device_map the layers may be spread over devices)
        device = model.get_input_embeddings().weight.device
        was_training = model.training
        model.eval()  # no dropout: S is a property of the weights on these samples
        n_done = 0
        for s in tqdm(samples, total=total, desc="sensitivity", unit="sample", disable=not progress):
            ids = torch.as_tensor(s["input_ids"], dtype=torch.long, device=device).view(1, -1)
            labels = torch.as_tensor(s["labels"], dtype=torch.long, device=device).view(1, -1)
            if (labels[:, 1:] != -100).sum() == 0:
                raise PktError("sensitivity: a sample has no labelled (response) tokens; raise max_length")
            out = model(input_ids=ids, labels=labels, use_cache=False)
            out.loss.backward()
            del out
            n_done += 1
        model.train(was_training)
        if n_done == 0:
            raise PktError("sensitivity: no samples")
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
            p.grad = None
    return acc


def tokenize_samples(examples: list[ChatExample], tokenizer, style: str = "chat", max_length: int = 1024,
                     train_on_inputs: bool = False) -> list[dict]:
    """Seed examples → tokenised samples with response-only labels (pkt.data.chat)."""
    return [tokenize_example(e, tokenizer, style, max_length, train_on_inputs) for e in examples]


def layer_scores(sens: dict[str, torch.Tensor], spec: ArchSpec) -> torch.Tensor:
    """Summed sensitivity of every parameter under ``<layers>.<i>.`` → float64 tensor [num_layers]."""
    prefix = spec.paths["layers"] + "."
    scores = torch.zeros(spec.num_layers, dtype=torch.float64)
    for name, s in sens.items():
        if name.startswith(prefix):
            i = int(name[len(prefix):].split(".", 1)[0])
            scores[i] += s.double().sum().item()
    return scores


def per_example_sensitivity_oracle(model: nn.Module, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Slow reference: one ``torch.autograd.grad`` per example, |θ·g| summed. Tiny models / tests only."""
    params = {n: p for n, p in model.named_parameters() if default_param_filter(n, p)}
    out = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    model.eval()
    for s in samples:
        ids = torch.as_tensor(s["input_ids"]).view(1, -1)
        labels = torch.as_tensor(s["labels"]).view(1, -1)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            if g is not None:
                out[n] += (p.detach().float() * g.float()).abs()
    return out
