"""Log-probability-increase attribution (Yu & Ananiadou 2024), vectorised, on stock transformers models.

What: for one (prompt, answer) pair whose *target* w is the last meaningful answer token, score every
attention block, FFN block, FFN neuron and attention neuron of a decoder-only LM by how much its
contribution raises log p(w) at the position that predicts w::

    Imp(v) = log p(w | v + h) - log p(w | h),    p(. | u) = softmax(W_U (u * scale * g) + b)

``h`` is the residual the component writes into: the layer input for attention (and its neurons), the
post-attention residual for the FFN (and its neurons). ``g`` is the final-norm weight and ``scale`` is a
*fixed* scalar computed once from the final residual (the readout is linearised around the model's
actual output), so the score is the "logit lens" effect of one vector. Two conventions for ``scale``:

* ``norm="yu"`` (Yu & Ananiadou's notebook, the default): ``rsqrt(mean(h_L**2) + eps)``, i.e. the RMSNorm
  factor of the final residual h_L (eps = the model's ``rms_norm_eps``). With it, u = h_L reproduces the
  model's own logits exactly (tested).
* ``norm="laten"`` (the LaTen code, ``knowledge_neurons.py``): ``rsqrt(sqrt(Var(h_L) + 1e-5) + 1e-6)``
  with the population variance of the *centred* h_L, i.e. it divides by sqrt(std). A different softmax
  temperature, which can reorder neurons and layers (docs/methods.md §7.1 item 3); kept for parity.

Neurons:

* FFN neuron i of layer l: sub-value ``m_i * W_down[:, i]`` (m = act(gate x) * up x, the input of
  ``mlp.down_proj``), scored against the post-attention residual.
* Attention neuron (head h, dim j) of layer l: ``z[h*head_dim + j] * W_O[:, h*head_dim + j]`` (z = the
  input of ``self_attn.o_proj`` at the last position: per-head attention output, head-major), scored
  against the layer input. This is Yu & Ananiadou's neuron summed over source positions; LaTen keeps only
  the last *source* position's weighted value (§7.1 item 4), which is not what o_proj sees.

Why vectorised: the reference turns every activation into Python lists and loops over neurons with
``.item()`` (≈5 min and ≈60 GiB per example for 13B). Here activations come from hooks on stock modules
(last position only), the sub-values of a layer form one matrix, and they go through ``lm_head`` in
chunks (memory = chunk × vocab). There is no Python loop per neuron.

Cost and ``vocab_top``: the exact score needs the full softmax for each neuron, i.e. ``n_neurons × d ×
vocab`` multiply-adds per layer. For Qwen2.5-1.5B that is ≈180× a forward pass over a 250-token
sequence, whatever the hardware. ``vocab_top=K`` computes the same quantity with the normaliser split
into the K most likely tokens of the baseline distribution p(.|h) (∪ {w}, exact) and the remaining tail
of mass ε, whose exp-shift is replaced by the exp of its p-weighted mean shift (Jensen; one d-vector per
layer). The error is ≤ ε·(E_tail[e^{δ-μ}] - 1) in the normaliser (second order in the tail's logit
spread; zero when K covers the vocabulary). ``Attribution.tail_mass`` reports ε per layer so the
approximation is visible. Layer scores are always exact.

Cost and ``top``: pairing needs only each layer's top-n neurons. Every score is concave along
t ↦ h + t·v with value 0 at t = 0, so its tangent at 0 (one dot product per neuron) is an upper bound.
A coarser top-vocabulary score (32 tokens + Jensen tail) is a tighter upper bound of both the exact and
the finer score. ``top=n`` scores neurons in descending order of the bound and stops once the n-th best
score found beats the next bound: the top-n set and its scores are exactly those of the full computation, at a
fraction of the vocabulary matmuls (unscored neurons are -inf). Both savings together bring the 1.5B
teacher to ≈1.5–3× a forward pass on CPU (docs/laten.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import align_module_device
from tqdm.auto import tqdm

from pkt.data.chat import render_prompt
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.models.arch import ArchSpec, unwrap
from pkt.models.load import module_device

NORMS = ("yu", "laten")
# The reference strips these trailing characters so the target is the last *meaningful* answer token
# (e.g. the final GSM8K digit rather than the full stop).
_TRAILING = {".", '"', " ", ")", "\n", ",", "]"}


def strip_answer(text: str) -> str:
    while text and text[-1] in _TRAILING:
        text = text[:-1]
    return text


def attribution_inputs(example: ChatExample, tokenizer, style: str = "chat", max_length: int = 1024):
    """(input_ids [1, T], target id): prompt + stripped answer, minus its last token (the target).

    Prompt and answer are tokenised separately (as for training, see pkt.data.chat) so the answer's
    tokens are the ones the model is trained to produce. Over-long inputs are cut from the left.
    """
    answer = strip_answer(example.assistant)
    if not answer:
        raise PktError("attribution needs a non-empty answer (after stripping trailing punctuation)")
    p_ids = tokenizer(render_prompt(example.user, tokenizer, style), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = (p_ids + r_ids)[-(max_length + 1):]
    return torch.tensor([ids[:-1]], dtype=torch.long), int(ids[-1])


@dataclass
class Activations:
    """Last-position activations of one forward pass (per layer), all float32."""

    layer_in: torch.Tensor  # [L, d] residual entering the layer (h^{l-1})
    attn_out: torch.Tensor  # [L, d] o_proj output (a^l)
    attn_heads: torch.Tensor  # [L, q_dim] o_proj input (z), head-major
    mid: torch.Tensor  # [L, d] post-attention residual (r^l = h^{l-1} + a^l)
    coeff: torch.Tensor  # [L, f] FFN coefficients (down_proj input)
    ffn_out: torch.Tensor  # [L, d] down_proj output (f^l)
    final: torch.Tensor  # [d] final residual (input of the final norm)


@torch.no_grad()
def capture(model, input_ids: torch.Tensor, spec: ArchSpec | None = None, device=None) -> Activations:
    """One forward pass with hooks on stock modules; keeps only the last position (what is scored).

    The kept vectors are gathered on ``device`` (default: lm_head's execution device, where they are
    scored), so a model sharded over several devices by a device_map works unchanged.
    """
    model = unwrap(model)
    spec = spec or ArchSpec.from_model(model)
    device = device if device is not None else module_device(spec.lm_head(model))
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise PktError(f"attribution scores one sequence: input_ids must be [1, T], got {tuple(input_ids.shape)}")
    n = spec.num_layers
    store: dict[str, list] = {k: [None] * n for k in ("layer_in", "attn_out", "attn_heads", "mid", "coeff", "ffn_out")}
    final: list = [None]
    handles = []

    def last(t):
        return t[0, -1].detach().float().to(device)

    def pre(key, i):
        def hook(mod, args):
            store[key][i] = last(args[0])
        return hook

    def fwd(in_key, out_key, i):
        def hook(mod, args, out):
            store[in_key][i] = last(args[0])
            store[out_key][i] = last(out)
        return hook

    try:
        for i, layer in enumerate(spec.layers(model)):
            # The input norms see exactly the residual stream (their input is the residual, unmodified).
            handles.append(layer.get_submodule(spec.paths["input_norm"]).register_forward_pre_hook(pre("layer_in", i)))
            handles.append(layer.get_submodule(spec.paths["post_attn_norm"]).register_forward_pre_hook(pre("mid", i)))
            handles.append(layer.get_submodule(spec.paths["o"]).register_forward_hook(fwd("attn_heads", "attn_out", i)))
            handles.append(layer.get_submodule(spec.paths["down"]).register_forward_hook(fwd("coeff", "ffn_out", i)))
        handles.append(spec.final_norm(model).register_forward_pre_hook(lambda m, a: final.__setitem__(0, last(a[0]))))
        # logits_to_keep=1: the full-sequence lm_head is not needed (only hooks are read).
        # Inputs go where the embedding runs (model.device is ``meta`` when accelerate offloaded it).
        model(input_ids=input_ids.to(module_device(spec.embed(model))), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return Activations(**{k: torch.stack(v) for k, v in store.items()}, final=final[0])


class Readout:
    """p(.|u) = softmax(lm_head(u * scale * g)): the model's output head, linearised at the final residual."""

    def __init__(self, model, spec: ArchSpec, final: torch.Tensor, norm: str = "yu"):
        if norm not in NORMS:
            raise PktError(f"final-norm convention {norm!r}: expected one of {', '.join(NORMS)}")
        model = unwrap(model)
        head, norm_mod = spec.lm_head(model), spec.final_norm(model)
        # align_module_device: an offloaded module's weights are ``meta`` outside its forward pass; this
        # loads them as the forward would (the references kept here outlive the context).
        with align_module_device(head):
            self.weight = head.weight.detach()
            self.bias = None if head.bias is None else head.bias.detach()
        with align_module_device(norm_mod):
            g = norm_mod.weight.detach().float().to(self.weight.device)
        final = final.float().to(self.weight.device)
        if norm == "yu":
            scale = torch.rsqrt(final.pow(2).mean() + spec.rms_norm_eps)
        else:  # LaTen: sqrt of the centred std, as in knowledge_neurons.py
            scale = torch.rsqrt(torch.sqrt(final.var(unbiased=False) + 1e-5) + 1e-6)
        self.post = scale * g  # [d]: everything between the residual and lm_head's matmul

    def logits(self, u: torch.Tensor) -> torch.Tensor:
        x = (u.float() * self.post).to(self.weight.dtype)
        return F.linear(x, self.weight, self.bias).float()

    def logprob(self, u: torch.Tensor, target: int) -> torch.Tensor:
        z = self.logits(u)
        return z[..., target] - torch.logsumexp(z, -1)


class _Block:
    """Scores of the sub-values written into one residual ``base`` (one attention or FFN block).

    Holds the baseline distribution p(.|base) once; ``score(subs)`` is the exact score (full softmax) or the
    top-vocabulary one. Both are concave along t ↦ base + t·sub (log-sum-exp is convex) and 0 at t = 0, so
    the tangent ``bound(subs) = sub · (post ∘ (W_U[w] - p @ W_U))`` is an upper bound of the score; it is
    the same linear function for both modes because the tail term uses the exact tail mean.

    Build blocks with :func:`_blocks`, which computes the baselines of many residuals together.
    """

    def __init__(self, ro: Readout, base, target, vocab_top, logp0, grad_dir, tail_logmass=None, mean_dir=None):
        self.ro, self.base, self.target, self.vocab_top = ro, base, target, vocab_top
        self.logp0, self.grad_dir = logp0, grad_dir
        self.tail_mass = 0.0
        if vocab_top is not None:
            # The top set of _tail_mask, in descending probability with the target last if it is not among
            # the K. The order only changes rounding, but rounding decides the ranks of neurons whose
            # scores are at the noise floor (zero activations), so it is kept fixed.
            top = torch.topk(logp0, min(vocab_top, logp0.shape[0])).indices
            if not bool((top == target).any()):
                top = torch.cat([top, torch.tensor([target], device=top.device)])
            self.tail_logmass, self.mean_dir = tail_logmass, mean_dir
            self.w_top = ro.weight[top].float() * ro.post  # [K, d]; lm_head's bias cancels in δ
            self.lp_top = logp0[top]
            self.w_pos = int((top == target).nonzero()[0, 0])
            self.tail_mass = float(tail_logmass.exp())

    def score(self, subs: torch.Tensor) -> torch.Tensor:
        if self.vocab_top is None:  # log p(w | base + sub) - log p(w | base), full vocabulary
            return self.ro.logprob(self.base + subs, self.target) - self.logp0[self.target]
        # δ_w - log(Σ_{v∈S} p_v e^{δ_v} + ε e^{μ}),  δ = W_U (sub ∘ post),  μ = mean tail shift
        delta = subs @ self.w_top.T  # [c, K]
        mu = subs @ self.mean_dir  # [c]
        parts = torch.cat([self.lp_top + delta, (self.tail_logmass + mu)[:, None]], -1)
        return delta[:, self.w_pos] - torch.logsumexp(parts, -1)

    def bound(self, subs: torch.Tensor) -> torch.Tensor:
        return subs @ self.grad_dir


BOUND_VOCAB = 32  # tokens of the coarse upper bound used to order neurons for certified top-n


def _coarse_k(vocab_top: int | None) -> int | None:
    """Vocabulary of the coarse bound for certified top-n, if it is coarser than the scoring itself."""
    return BOUND_VOCAB if vocab_top is None or vocab_top > BOUND_VOCAB else None


def _tail_mask(logp0: torch.Tensor, target: int, k: int) -> torch.Tensor:
    """[B, V] True outside each row's top set: its k most likely tokens plus the target."""
    tail = torch.ones_like(logp0, dtype=torch.bool)
    tail.scatter_(1, torch.topk(logp0, min(k, logp0.shape[1]), -1).indices, False)
    tail[:, target] = False
    return tail


def _blocks(ro: Readout, bases: torch.Tensor, target: int, vocab_top: int | None, coarse_k: int | None,
            logp0: torch.Tensor | None = None) -> tuple[list[_Block], list]:
    """(blocks, coarse blocks) for every row of ``bases`` [B, d]; coarse ones (top-``coarse_k`` vocabulary,
    the bound for certified top-n) are None when ``coarse_k`` is None. ``logp0``: the rows' log-softmax, if
    the caller already has it.

    Why batched: each block needs full-vocabulary products with lm_head (its baseline logits, the mean
    direction p @ W_U of the tangent bound, the tail means of each top-vocabulary mode). One at a time,
    that streams the whole lm_head (≈0.9 GB for Qwen2.5-1.5B in fp32) from memory ~6 times per block,
    i.e. ~340 times per example, which cost more than the forward pass. Stacked over all blocks they are
    two matmuls: one for the logits, one for every p-weighted mixture.
    """
    w = ro.weight
    if logp0 is None:
        logp0 = torch.log_softmax(ro.logits(bases), -1)  # [B, V]
    ks = [k for k in (vocab_top, coarse_k) if k is not None]
    mixes, logmasses = [logp0.exp()], []
    for k in ks:
        tail = _tail_mask(logp0, target, k)
        # log ε per row; -inf when the top set covers the vocabulary (then the mixture row is all zeros)
        logmass = torch.logsumexp(logp0.masked_fill(~tail, float("-inf")), -1)  # [B]
        mixes.append(torch.exp(logp0 - logmass[:, None]).masked_fill(~tail, 0.0))
        logmasses.append(logmass)
    mixed = (torch.cat(mixes).to(w.dtype) @ w).float() * ro.post  # one pass over lm_head for all mixtures
    n = bases.shape[0]
    grad_dir = ro.post * w[target].float() - mixed[:n]

    def make(k, j):
        if k is None:
            return [_Block(ro, bases[i], target, None, logp0[i], grad_dir[i]) for i in range(n)]
        mean_dir, logmass = mixed[(j + 1) * n:(j + 2) * n], logmasses[j]
        return [_Block(ro, bases[i], target, k, logp0[i], grad_dir[i], logmass[i], mean_dir[i]) for i in range(n)]

    fine = make(vocab_top, 0)
    coarse = make(coarse_k, len(ks) - 1) if coarse_k is not None else [None] * n
    return fine, coarse


def score_block(ro: Readout, base: torch.Tensor, subs: torch.Tensor, target: int, *, vocab_top: int | None = None,
                chunk: int = 256, top: int | None = None, blocks: tuple | None = None) -> tuple[torch.Tensor, float, int]:
    """Scores of every row of ``subs`` added to ``base``; returns (scores [n], tail mass ε, rows evaluated).

    With ``top=k`` only as many rows are evaluated as needed to *certify* the top k: rows go in descending
    order of an upper bound (the same score over the top-32 tokens with a Jensen tail, which never falls
    below the finer or exact score; or the tangent, see :class:`_Block`) in chunks, and evaluation stops once the
    k-th best score found is at least the next bound. Unevaluated rows get -inf. The top-k set and its
    scores are then the same as with ``top=None``.

    ``blocks`` = (block, coarse block or None), prebuilt by :func:`_blocks` for ``base`` (what
    :func:`attribute` passes, so lm_head is streamed once per example rather than once per block).
    """
    coarse_k = _coarse_k(vocab_top)
    if blocks is None:
        fine, coarse = _blocks(ro, base[None], target, vocab_top, coarse_k)
        blocks = (fine[0], coarse[0])
    blk, coarse = blocks
    n = subs.shape[0]
    if top is None or top >= n:
        out = torch.empty(n, device=subs.device)
        for s in range(0, n, chunk):
            out[s: s + chunk] = blk.score(subs[s: s + chunk])
        return out.cpu(), blk.tail_mass, n
    if coarse_k is not None:
        # A coarser top-vocabulary score is a tighter bound than the tangent: Jensen on a larger tail only
        # lowers the normaliser, so score_{K'} >= score_K >= exact for K' < K (and it is cheap: K' columns).
        ub = torch.cat([coarse.score(subs[s: s + chunk * 4]) for s in range(0, n, chunk * 4)])
    else:
        ub = blk.bound(subs)
    order = torch.argsort(ub, descending=True)
    out = torch.full((n,), float("-inf"), device=subs.device)
    done = 0
    while done < n:
        idx = order[done: done + chunk]
        out[idx] = blk.score(subs[idx])
        done += idx.numel()
        # One scalar check per chunk (not per neuron): the k-th best so far vs the best bound left.
        if done >= top and done < n and bool(torch.topk(out, top).values[-1] >= ub[order[done]]):
            break
    return out.cpu(), blk.tail_mass, done


def _weight(module, device) -> torch.Tensor:
    """``module.weight`` on ``device``, also when accelerate offloaded it (see :class:`Readout`)."""
    with align_module_device(module):
        return module.weight.detach().to(device)


@dataclass
class Attribution:
    """Scores of one example. Neuron scores are per layer; index = neuron (FFN) or h*head_dim+j (attention)."""

    target: int
    logprob: float  # log p(w) under the readout at the final residual (= the model's, for norm="yu")
    attn_layers: torch.Tensor  # [L]
    ffn_layers: torch.Tensor  # [L]
    attn_neurons: torch.Tensor | None  # [L, num_heads*head_dim]
    ffn_neurons: torch.Tensor | None  # [L, intermediate_size]
    norm: str = "yu"
    vocab_top: int | None = None
    tail_mass: torch.Tensor | None = None  # [L, 2] (attention, FFN) ε of the vocab_top approximation
    seconds: dict = field(default_factory=dict)
    evaluated: tuple = (0, 0)  # (attention, FFN) neuron scores computed, over all layers


@torch.no_grad()
def attribute(model, input_ids: torch.Tensor, target: int, *, norm: str = "yu", vocab_top: int | None = None,
              chunk: int = 256, neurons: bool = True, top: int | tuple[int, int] | None = None,
              spec: ArchSpec | None = None, progress: bool = False) -> Attribution:
    """Score layers and (optionally) every FFN and attention neuron for predicting ``target`` after ``input_ids``.

    ``vocab_top=None`` is the exact score (full softmax per neuron); an integer uses the top-vocabulary
    normaliser described in the module docstring. ``chunk`` bounds memory at chunk × vocab floats.
    ``top`` (an int, or (attention, FFN)) certifies only each layer's top neurons (see :func:`score_block`);
    the others are -inf. That is all pairing needs, and it skips most of the vocabulary matmuls.
    """
    model = unwrap(model)
    spec = spec or ArchSpec.from_model(model)
    if not 0 <= target < spec.vocab_size:
        raise PktError(f"target token id {target} outside the vocabulary (size {spec.vocab_size})")
    if vocab_top is not None and vocab_top < 1:
        raise PktError(f"vocab_top must be a positive number of tokens or None (exact), got {vocab_top}")
    t0 = time.perf_counter()
    acts = capture(model, input_ids, spec)
    t1 = time.perf_counter()
    ro = Readout(model, spec, acts.final, norm)
    n = spec.num_layers
    # Every full-vocabulary readout of the example in one matmul: the bases of the 2n blocks, the same plus
    # the block's output (layer scores, always exact) and the final residual.
    us = torch.cat([acts.layer_in, acts.mid, acts.layer_in + acts.attn_out, acts.mid + acts.ffn_out, acts.final[None]])
    lp = torch.log_softmax(ro.logits(us), -1)
    attn_layers = lp[2 * n:3 * n, target] - lp[:n, target]
    ffn_layers = lp[3 * n:4 * n, target] - lp[n:2 * n, target]
    attn_n = ffn_n = tail = None
    evaluated = [0, 0]
    top_attn, top_ffn = (None, None) if top is None else (top if isinstance(top, tuple) else (top, top))
    # Top-vocabulary scoring is cheap per row, so larger chunks amortise the Python overhead; with ``top``
    # smaller ones stop closer to the certified minimum.
    step = chunk if vocab_top is None else chunk * (2 if top is not None else 8)
    if neurons:
        attn_n = torch.empty(n, spec.q_dim)
        ffn_n = torch.empty(n, spec.intermediate_size)
        tail = torch.zeros(n, 2)
        # Rows 0..n-1: attention blocks (base = layer input); n..2n-1: FFN blocks (base = post-attention).
        coarse_k = _coarse_k(vocab_top) if top is not None else None  # the bound is only needed for top-n
        fine, coarse = _blocks(ro, us[:2 * n], target, vocab_top, coarse_k, logp0=lp[:2 * n])
        for layer in tqdm(range(n), desc="attribution", disable=not progress, leave=False):
            w_o, w_down = (_weight(spec.linear(model, layer, k), ro.weight.device) for k in ("o", "down"))
            # Sub-value matrices: row i = activation_i × weight column i (the neuron's write to the residual).
            attn_subs = (w_o.float() * acts.attn_heads[layer]).T.contiguous()  # [q_dim, d]
            ffn_subs = (w_down.float() * acts.coeff[layer]).T.contiguous()  # [f, d]
            attn_n[layer], tail[layer, 0], ea = score_block(ro, acts.layer_in[layer], attn_subs, target,
                                                            vocab_top=vocab_top, chunk=step, top=top_attn,
                                                            blocks=(fine[layer], coarse[layer]))
            ffn_n[layer], tail[layer, 1], ef = score_block(ro, acts.mid[layer], ffn_subs, target,
                                                           vocab_top=vocab_top, chunk=step, top=top_ffn,
                                                           blocks=(fine[n + layer], coarse[n + layer]))
            evaluated[0] += ea
            evaluated[1] += ef
        if vocab_top is None:
            tail = None
    t2 = time.perf_counter()
    return Attribution(
        target=target, logprob=float(lp[-1, target]), attn_layers=attn_layers.cpu(),
        ffn_layers=ffn_layers.cpu(),
        attn_neurons=attn_n, ffn_neurons=ffn_n, norm=norm, vocab_top=vocab_top, tail_mass=tail,
        seconds={"forward": t1 - t0, "scoring": t2 - t1, "total": t2 - t0}, evaluated=tuple(evaluated),
    )


def attribute_example(model, tokenizer, example: ChatExample, *, style: str = "chat", max_length: int = 1024,
                      **kwargs) -> Attribution:
    """:func:`attribute` on a chat example (target = last meaningful answer token)."""
    ids, target = attribution_inputs(example, tokenizer, style, max_length)
    return attribute(model, ids, target, **kwargs)
