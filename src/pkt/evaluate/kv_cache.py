"""KV-cache plumbing of pkt's greedy decoding (:mod:`pkt.evaluate.generate`): the running batch of the continuous
engine (rows with one left-padded cache that finished rows leave and new prompts join) and the prefill of a prompt
prefix shared by many prompts (computed once, its cache copied to each). Built on transformers' DynamicCache and
the model's own forward.
"""

from __future__ import annotations

import functools

import torch

from pkt.evaluate.logits import last_logits


def left_padded(enc: list[list[int]], pad: int, device) -> dict[str, torch.Tensor]:
    """Token-id lists as one left-padded batch with its attention mask."""
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        if e:
            ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


# columns of room a cache layer's buffer gets whenever it is (re)allocated: a decoding step then writes its one new
# column in place instead of copying the whole cache (torch.cat), a quarter of a bf16 step at 64 rows (P11)
_ROOM = 64


@functools.cache
def _growing_layer():
    """transformers' DynamicLayer whose ``keys``/``values`` are views of a buffer with room to grow. Anything that
    replaces them (the running batch's rows joining or leaving) makes the next update copy them into a new buffer.
    The values attended to are the same as DynamicLayer's, so are the logits (tests/test_generate.py)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        _buf = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized or not self.keys.numel():
                return super().update(key_states, value_states, *args, **kwargs)
            n, q = self.keys.shape[-2], key_states.shape[-2]
            buf = self._buf
            if (buf is None or n + q > buf[0].shape[-2] or self.keys.data_ptr() != buf[0].data_ptr()
                    or self.keys.shape[:2] != buf[0].shape[:2] or self.keys.stride() != buf[0].stride()):
                shape = (*self.keys.shape[:2], n + q + _ROOM, self.keys.shape[-1])
                buf = (self.keys.new_empty(shape), self.values.new_empty(shape))
                buf[0][:, :, :n] = self.keys
                buf[1][:, :, :n] = self.values
                self._buf = buf
            buf[0][:, :, n:n + q] = key_states
            buf[1][:, :, n:n + q] = value_states
            self.keys, self.values = buf[0][:, :, :n + q], buf[1][:, :, :n + q]
            return self.keys, self.values

    return GrowingLayer


class _Rows:
    """The sequences being decoded together: one left-padded KV cache, attention mask and next position per
    row. Rows leave when they finish and new prompts join (their prefill cache is left-padded to the batch's
    length), so the batch stays full instead of waiting for its longest answer."""

    def __init__(self):
        self.cache = None
        self.mask = None  # [rows, length] 1 = real token
        self.ids: list[int] = []  # prompt index of each row
        self.pos = None  # [rows] position of the next input token
        self.last = None  # [rows] next input token

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, cache, mask, ids, pos, last) -> None:
        if self.cache is None:
            for layer in cache.layers:  # plain dynamic layers (_supports_refill): decoding grows them in place
                layer.__class__ = _growing_layer()
            self.cache, self.mask, self.ids, self.pos, self.last = cache, mask, list(ids), pos, last
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def left(t, dim):  # zero columns on the left up to ``width`` (masked out, so never attended)
            n = width - t.shape[dim]
            if not n:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left(mine.keys, 2), left(theirs.keys, 2)])
            mine.values = torch.cat([left(mine.values, 2), left(theirs.values, 2)])
        self.mask = torch.cat([left(self.mask, 1), left(mask, 1)])
        self.ids += list(ids)
        self.pos = torch.cat([self.pos, pos])
        self.last = torch.cat([self.last, last])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` and drop the leading columns no remaining row attends to."""
        if len(rows) == len(self.ids):
            return
        if not rows:
            self.__init__()
            return
        index = torch.tensor(rows)
        self.mask = self.mask[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0])  # columns before it are padding in every row
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.ids = [self.ids[r] for r in rows]
        self.pos, self.last = self.pos[index], self.last[index]


# A prompt prefix shared by every prompt is prefilled once when it is at least this long (shorter ones, e.g.
# a chat template's system turn, are not worth the copies).
_MIN_SHARED_PREFIX = 16


def _common(a: list[int], b: list[int]) -> int:
    k, n = 0, min(len(a), len(b))
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _shared_prefix(ids: list[list[int]]) -> int:
    """Length of the token prefix common to every prompt, leaving each at least one token of its own (its
    first answer token comes from that token's logits); 0 when shorter than ``_MIN_SHARED_PREFIX``."""
    n = min(len(x) for x in ids) - 1
    for x in ids[1:]:
        n = min(n, _common(ids[0], x))
    return n if n >= _MIN_SHARED_PREFIX else 0


def _prefix_groups(ids: list[list[int]]) -> list[list[int]]:
    """Prompt indices in runs that share at least ``_MIN_SHARED_PREFIX`` leading tokens (prompts sorted by their
    tokens), e.g. the questions of one MMLU subject behind its few-shot header."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    groups = [[order[0]]]
    for a, b in zip(order, order[1:]):
        if _common(ids[a], ids[b]) >= _MIN_SHARED_PREFIX:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _prefill_prefix(model, tokens: list[int], device):
    """The KV cache of ``tokens``, a prefix several prompts share; None when the model's cache cannot be copied
    between rows (sliding-window layers)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([tokens], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache if _supports_refill(cache) else None


def _prefill(model, suffixes: list[list[int]], prefix, shared: int, pad: int, device, separate: bool = False):
    """Last-position logits of the prompts ``prefix + suffix``, with the cache and attention mask to go on from.
    The suffixes' left padding sits between prefix and suffix: masked, and the positions skip it. ``separate``:
    the prefix stays one copy that the rows attend to (:mod:`pkt.evaluate.prefix_attention`: call this and go
    on decoding inside its ``attending`` block), and cache and mask hold the suffixes' columns only; otherwise the
    prefix's cache is copied into each row."""
    import copy

    from transformers import DynamicCache

    batch = left_padded(suffixes, pad, device)
    mask = batch["attention_mask"]
    position = shared + (mask.cumsum(-1) - 1).clamp_min(0)
    if prefix is None or separate:
        cache = DynamicCache(config=model.config)
    else:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(suffixes))
        mask = torch.cat([mask.new_ones(len(suffixes), shared), mask], dim=1)
    logits = last_logits(model, input_ids=batch["input_ids"], attention_mask=mask, position_ids=position,
                         past_key_values=cache)
    return logits, cache, mask


def _supports_refill(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)
