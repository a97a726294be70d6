"""The sliced vocabulary projection of greedy decoding gives the model's own logits, bit for bit."""

from __future__ import annotations

import pytest
import torch

from pkt.evaluate import logits as L


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_last_logits_equal_the_models_own(kind, tiny_tok, monkeypatch):
    """Slices smaller than the vocabulary (and not dividing it) so the slicing is exercised; with a KV cache
    the decoder's cache is updated as by the model's forward, so the next step agrees too. The reference keeps
    the last position's logits only, as the engine's prefill always did (a product over every position is a
    different matrix shape, whose rounding may differ in the last bit)."""
    from transformers import DynamicCache

    from pkt import testing

    monkeypatch.setattr(L, "HEAD_SLICE", 100)
    model = testing.tiny_model(kind, "student", len(tiny_tok))
    assert L.plain_head(model) and model.get_output_embeddings().weight.shape[0] % 100
    ids = torch.randint(0, len(tiny_tok), (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    with torch.no_grad():
        ours_cache, their_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
        ours = L.last_logits(model, input_ids=ids, attention_mask=mask, past_key_values=ours_cache)
        theirs = model(input_ids=ids, attention_mask=mask, past_key_values=their_cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        assert torch.equal(ours, theirs)
        nxt = ours.argmax(-1)[:, None]
        mask2 = torch.cat([mask, mask.new_ones(3, 1)], 1)
        ours2 = L.last_logits(model, input_ids=nxt, attention_mask=mask2, past_key_values=ours_cache)
        theirs2 = model(input_ids=nxt, attention_mask=mask2, past_key_values=their_cache, use_cache=True).logits[:, -1]
        assert torch.equal(ours2, theirs2)


def test_sliced_head_with_bias_equals_linear():
    head = torch.nn.Linear(16, 1000, bias=True)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(L.sliced_head(x, head, rows=128), head(x))
        assert L.sliced_head(x, head, rows=128).shape == (5, 1000)


def test_other_architectures_use_their_own_forward(tiny_tok, monkeypatch):
    """A model type outside the whitelist (whose forward may scale or cap the logits) is not sliced."""
    from pkt import testing

    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    monkeypatch.setattr(model.config, "model_type", "gemma2")
    assert not L.plain_head(model)
    called = []
    monkeypatch.setattr(L, "sliced_head", lambda *a, **k: called.append(1))
    ids = torch.randint(0, len(tiny_tok), (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = L.last_logits(model, input_ids=ids)
        assert torch.equal(out, model(input_ids=ids, logits_to_keep=1).logits[:, -1]) and not called


def test_a_hook_on_the_head_is_honoured(tiny_tok):
    """A forward hook on the head (benchmarks/decode_banned.py bans tokens this way) sends decoding through the
    model's own forward, so the hook still applies."""
    from pkt import testing

    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    assert L.plain_head(model)
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([3]),
                                                                                                 float("-inf")))
    try:
        assert not L.plain_head(model)
        ids = torch.randint(0, len(tiny_tok), (2, 5), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.isinf(L.last_logits(model, input_ids=ids)[:, 3]).all()
    finally:
        handle.remove()
    assert L.plain_head(model)
