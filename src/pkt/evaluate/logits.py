"""Last-position logits for greedy decoding, with the vocabulary projection done in slices.

A decoding step multiplies a few dozen hidden states by the 151,936 x 896 lm_head of the Qwen2.5 0.5B: a thin
matrix product with a very wide output. On the reference CPU, torch's one-call product runs at 60 GFLOP/s for
32 rows, but the same product over 2048-row slices of the head runs ~1.45x faster (the slice of the head and its
output stay in cache) and gives the same bits: each logit is the same dot product over the hidden size, only the
output columns are split (docs/benchmarks.md P11; tests/test_generate.py checks equality with the model's own
logits). The head is then a third of a decoding step instead of two fifths.

Only architectures whose logits are exactly ``lm_head(final hidden state)`` take this path (a whitelist of
``model_type``); any other model is run through its own forward.
"""

from __future__ import annotations

import torch

# model types whose causal-LM forward is: decoder -> final norm -> lm_head, nothing after it (no logit scale or
# soft-capping); others use model(...) as they are
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# rows of the head per slice: 1024-4096 measured alike on the 2-core CPU (P11), 8192 and the whole head slower
HEAD_SLICE = 2048


def plain_head(model) -> bool:
    """Whether the model's logits are exactly its head applied to its decoder's last hidden state, with nothing
    hooked on the head (a forward hook there, e.g. one that bans tokens, would be bypassed by the slices)."""
    from torch.nn.modules import module as nn_module

    head = model.get_output_embeddings()
    hooked = bool(head is not None and (head._forward_hooks or head._forward_pre_hooks)
                  or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
    return (getattr(model.config, "model_type", None) in PLAIN_HEAD and type(head) is torch.nn.Linear
            and hasattr(model, "get_decoder") and not hooked)


def sliced_head(hidden: torch.Tensor, head: torch.nn.Linear, rows: int | None = None) -> torch.Tensor:
    """``head(hidden)``, computed over ``rows``-row slices (default ``HEAD_SLICE``) of the head's weight."""
    weight, bias = head.weight, head.bias
    rows = rows or HEAD_SLICE
    out = hidden.new_empty(*hidden.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        stop = min(start + rows, weight.shape[0])
        out[..., start:stop] = torch.nn.functional.linear(hidden, weight[start:stop],
                                                          None if bias is None else bias[start:stop])
    return out


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``: the same indices (the first maximum on ties, NaN counted as the maximum; tested),
    through ``max(-1)``, whose CPU kernel is ~3x faster than ``argmax``'s for bfloat16 rows of the vocabulary
    (40 vs 13 ms for 64 x 151,936 on the 2-core CPU; argmax was 6% of a bf16 decoding step)."""
    return logits.max(-1).indices


def last_logits(model, **inputs) -> torch.Tensor:
    """Logits at the last position of ``model(**inputs)`` ([batch, vocab]); a cache passed in ``inputs`` is
    updated as by the model's own forward."""
    if not plain_head(model):
        return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
    hidden = model.get_decoder()(**inputs, use_cache=True).last_hidden_state[:, -1]
    return sliced_head(hidden, model.get_output_embeddings())
