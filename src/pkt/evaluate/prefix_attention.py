"""Attention to a prompt prefix that every row shares, kept as one copy (pkt's continuous decoding engine).

Few-shot prompts begin with the same exemplars (GSM8K's 8-shot prompts share ~740 tokens). The engine prefills
that prefix once, but transformers' attention takes every row's keys and values as one tensor, so the prefix's
cache was copied into each row, and each row read its copy again at every decoding step: at 64 rows and ~800
positions that is most of what a step's attention reads, and 64 copies of the prefix's cache in memory.

Here each row's cache holds only its own tokens; the prefix's keys and values stay one copy. A layer's attention
runs torch's CPU flash-attention kernel twice: once for the queries of all rows against the prefix (the rows as
the positions of one sequence), once for each row against its own keys under its mask; each returns its output
and the log-sum-exp of its scores, from which the two outputs are weighed into one softmax over both (as
flash-decoding merges the blocks of a long cache). That is attention over the concatenated keys, the same
function; its sums are taken in another order (and in bf16 each part's output is rounded before the merge), so
results differ from SDPA's in the last bits (tests/test_prefix_attention.py compares the two on tiny models).
The kernel is torch's internal ``aten::_scaled_dot_product_flash_attention_for_cpu``, the one SDPA calls on CPU:
no public function returns the log-sum-exp the merge needs (torch 2.13 pinned; a torch without it fails the tests).

The function is registered with transformers' ``AttentionInterface`` (masks as SDPA's) under :data:`NAME`;
:func:`attending` switches a model to it, with its prefix, for the span of a ``with`` block. CPU only (the
engine copies the prefix into each row on an accelerator, as before).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

NAME = "pkt_shared_prefix"
_PREFIX: contextvars.ContextVar = contextvars.ContextVar("pkt_shared_prefix", default=None)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention-function signature: ``query`` [rows, heads, q, d]; ``key``/``value`` [rows,
    key heads, own positions, d] (the rows' own cache, the current tokens last); ``attention_mask`` SDPA's mask
    over the own positions (boolean, True = attend; additive float; or None = causal). Returns the output
    [rows, q, heads, d] and no weights. Without a prefix set by :func:`attending`, plain SDPA."""
    prefix = _PREFIX.get()
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("shared-prefix attention is for inference: dropout must be 0")
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    pk, pv = prefix[module.layer_idx]  # [1, key heads, P, d]
    rows, heads, q, d = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    n = heads // kv_heads * q  # queries per row and key head: query head h reads key head h // (heads / kv_heads)
    grouped = query.reshape(rows, kv_heads, n, d)
    # the prefix: every row's queries of a key head as the positions of one sequence, no mask
    out_p, lse_p = flash(grouped.transpose(0, 1).reshape(1, kv_heads, rows * n, d), pk, pv, scale=scaling)
    out_p = out_p.view(kv_heads, rows, n, d).transpose(0, 1)
    lse_p = lse_p.view(kv_heads, rows, n).transpose(0, 1)
    # each row's own positions, under its mask
    mask = _own_mask(attention_mask, n // q, q, own, query.device)
    if mask.dtype == torch.bool:
        allowed = mask
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, float("-inf"))
    else:  # additive: a column is blocked at the dtype's lowest values
        allowed = mask > torch.finfo(mask.dtype).min / 2
        mask = mask.to(query.dtype)
    out_o, lse_o = flash(grouped, key, value, attn_mask=mask, scale=scaling)
    # one softmax over both: each part's output weighed by its share of the exponentiated scores (log-sum-exp)
    # (a query with none of its own positions allowed, a left-padding position in a prefill, reads the prefix
    # alone: its own part, whatever the kernel returns for it, gets no weight)
    lse_o = lse_o.masked_fill(~allowed.any(-1), float("-inf"))
    top = torch.maximum(lse_p, lse_o)
    w_p, w_o = torch.exp(lse_p - top).unsqueeze(-1), torch.exp(lse_o - top).unsqueeze(-1)
    out = (out_p.float() * w_p + torch.nan_to_num(out_o.float()) * w_o) / (w_p + w_o)
    return out.to(query.dtype).reshape(rows, heads, q, d).transpose(1, 2).contiguous(), None


def _own_mask(mask, rep: int, q: int, own: int, device) -> torch.Tensor:
    """SDPA's mask over the rows' own positions as [rows or 1, 1, rep * q, own]: the same for every query head of
    a key head. None (SDPA's mask left out) is causal, the queries the last ``q`` positions."""
    if mask is None:
        i = torch.arange(q, device=device)[:, None] + (own - q)
        mask = (torch.arange(own, device=device)[None, :] <= i)[None, None]
    mask = mask[..., -own:]  # a mask wider than the cache (never here) would lead with columns no key has
    m = mask.shape[0]
    return mask[:, :1, None].expand(m, 1, rep, q, own).reshape(m, 1, rep * q, own)


@functools.cache
def register() -> None:
    """Make :data:`NAME` an attention implementation of transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def attending(model, prefix):
    """Within the block, ``model``'s layers attend to ``prefix`` (a DynamicCache of one row: the shared prefix's
    keys and values by layer) before each row's own cache; the model's attention implementation is restored
    after."""
    register()
    layers = [(layer.keys, layer.values) for layer in prefix.layers]
    before = model.config._attn_implementation
    token = _PREFIX.set(layers)
    model.config._attn_implementation = NAME
    try:
        yield
    finally:
        model.config._attn_implementation = before
        _PREFIX.reset(token)
