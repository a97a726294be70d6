"""Parameter sensitivity S = Σ_samples |θ ⊙ ∂L/∂θ| (Seeking, docs/methods.md §4.1), in bounded memory.

The reference implementation keeps weights, gradients, a per-sample |θ·g| map and a running map at once
(≈4× the model size, fp32, docs/methods.md §7.2 item 2). Here every parameter gets a
``register_post_accumulate_grad_hook`` that adds |θ·g| into a float32 accumulator and drops ``p.grad``
straight away, during the backward pass. Peak memory is therefore the weights + one fp32 accumulator
(optionally on another device, e.g. CPU) + activations + the few gradients alive at one moment.

Each sample is its own backward pass: S sums per-sample absolute values, and a batched loss would sum
gradients of different samples *before* taking |·|. The loss is the mean cross-entropy over the
response tokens (labels from :mod:`pkt.data.chat`), as in the reference's HF ``labels`` loss.

Sharded/offloaded models (a ``device_map`` from transformers/accelerate) give the same S as one device.
Inputs go to the embedding's execution device. A module whose weights accelerate offloaded (``"disk"``, or
``"cpu"`` next to a GPU) keeps ``meta`` parameters and gets a fresh copy of its weights for every forward
pass, so the gradient lands on that copy, never on the module's parameter: for those modules the
accumulating hook is registered on the copy, from a hook chained after accelerate's, and the accumulator
defaults to the CPU (the execution device is the one too small to hold those weights). Offloading also
splits a tied embedding/lm_head into two tensors; their gradients are summed before the |·| (one extra
gradient of that matrix is held during the backward pass).
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
from pkt.models.load import module_device

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


def _offloaded_grad_hook(grad_hooks: dict):
    """An accelerate ``ModelHook`` to chain after an offloaded module's AlignDevicesHook: by its
    ``pre_forward`` the weights of this pass are in place, and ``grad_hooks`` (local parameter name →
    post-accumulate-grad hook) are registered on them."""
    from accelerate.hooks import ModelHook

    class _Hook(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            for local, fn in grad_hooks.items():
                module._parameters[local].register_post_accumulate_grad_hook(fn)
            return args, kwargs

    return _Hook()


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
    own device, the CPU for weights accelerate offloaded; ``"cpu"`` keeps a GPU free of them). Keys are
    ``model.named_parameters()`` names; tied parameters appear once, under the name transformers ties them
    to (their gradient is the sum over both uses), also when offloading splits the tie. The model's
    ``requires_grad`` flags and ``.grad`` fields are restored/cleared afterwards; weights are never modified.
    """
    from accelerate.hooks import SequentialHook
    from accelerate.utils import has_offloaded_params

    # transformers' {alias: source} of tied weights (lm_head.weight -> model.embed_tokens.weight). An intact
    # tie is one tensor, listed once by named_parameters; under offloading accelerate swaps a fresh tensor
    # into each module for each pass, so the ends become two tensors, both listed, with one gradient each.
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    params = {n: p for n, p in model.named_parameters() if param_filter(n, p) and n not in tied}
    if not params:
        raise PktError("sensitivity: no parameters selected")
    every = list(model.named_parameters(remove_duplicate=False))  # aliases too, intact or not
    saved_flags = {n: p.requires_grad for n, p in every}
    acc: dict[str, torch.Tensor] = {}
    handles = []
    offloaded: dict[str, dict] = {}  # module name -> {local param name: hook}
    chained: dict[nn.Module, object] = {}  # module -> its own accelerate hook, restored at the end
    # A tie split into two tensors: S = |θ·(g₁+g₂)| needs both gradients before the |·|, so they are summed
    # in ``pending`` and accumulated once the backward pass is over (intact ties: autograd sums them).
    split: set[str] = set()
    pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(key: str):
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:  # one accelerate copy serving both ends of a tie: its 2nd hook
                return
            if key in split:
                prev = pending.get(key)
                pending[key] = (param.detach(), param.grad if prev is None else prev[1] + param.grad.to(prev[1]))
            else:
                _accumulate(acc[key], param, param.grad)
            param.grad = None  # the whole point: never hold a full set of gradients
        return hook

    try:
        for n, p in every:
            p.requires_grad_(n in params or tied.get(n) in params)
        uses = [(n, n) for n in params] + [(n, tied[n]) for n, _ in every if tied.get(n) in params]
        for n, key in uses:
            mod_name, _, local = n.rpartition(".")
            owner = model.get_submodule(mod_name)
            if n == key:
                home = "cpu" if has_offloaded_params(owner) else params[n].device
                acc[n] = _zeros_like(params[n], accum_device if accum_device is not None else home)
            elif model.get_parameter(n) is params[key] and not any(
                    has_offloaded_params(model.get_submodule(x.rpartition(".")[0])) for x in (n, key)):
                continue  # an intact tie: the source's hook sees the summed gradient
            else:
                split.add(key)
            if has_offloaded_params(owner):
                offloaded.setdefault(mod_name, {})[local] = make_hook(key)
            else:
                handles.append(model.get_parameter(n).register_post_accumulate_grad_hook(make_hook(key)))
        # inputs go where the embedding is (with a device_map the layers may be spread over devices);
        # read before the hooks below are chained (module_device looks for accelerate's own hook)
        device = module_device(model.get_input_embeddings())
        for mod_name, grad_hooks in offloaded.items():
            # Swapped in place rather than via add_hook_to_module(append=True): undoing that re-runs
            # accelerate's init/detach_hook, which may load the offloaded weights back; the wrapped
            # forward looks ``_hf_hook`` up on every call, so the swap is all that is needed.
            owner = model.get_submodule(mod_name)
            chained[owner] = owner._hf_hook
            owner._hf_hook = SequentialHook(owner._hf_hook, _offloaded_grad_hook(grad_hooks))
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
            for key, (theta, g) in pending.items():
                _accumulate(acc[key], theta, g)
            pending.clear()
            n_done += 1
        model.train(was_training)
        if n_done == 0:
            raise PktError("sensitivity: no samples")
    finally:
        for h in handles:
            h.remove()
        for owner, own_hook in chained.items():
            owner._hf_hook = own_hook
        pending.clear()
        for n, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(saved_flags.get(n, True))
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
