"""Attention to a shared prefix kept as one copy (pkt.evaluate.prefix_attention) equals SDPA over each row's copy
of it, in the function alone and in the continuous engine's answers."""

from __future__ import annotations

import pytest
import torch

from pkt.evaluate.generate import GenStats, generate


class _Layer(torch.nn.Module):  # what the attention function reads of the module: its layer index
    layer_idx = 0
    training = False
    num_key_value_groups = 3


def _sdpa_over_copies(query, key, value, pk, pv, mask):
    """The oracle: the prefix's keys and values copied into every row and prepended, then transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = query.shape[0]
    k = torch.cat([pk.expand(rows, -1, -1, -1), key], dim=2)
    v = torch.cat([pv.expand(rows, -1, -1, -1), value], dim=2)
    if mask is not None:
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], pk.shape[2]), mask], dim=-1)
    elif query.shape[2] > 1:  # causal over the own positions, every prefix position visible
        q, own = query.shape[2], key.shape[2]
        i = torch.arange(q)[:, None] + (own - q)
        own_mask = torch.arange(own)[None, :] <= i
        mask = torch.cat([torch.ones(q, pk.shape[2], dtype=torch.bool), own_mask], dim=1)[None, None]
    return sdpa_attention_forward(_Layer(), query, k, v, mask, scaling=0.3)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q", [1, 5])
@pytest.mark.parametrize("masked", [True, False])
def test_the_function_equals_sdpa_over_copies(dtype, q, masked):
    from pkt.evaluate import prefix_attention as P

    g = torch.Generator().manual_seed(q)
    rows, heads, kv, d, width, own = 4, 6, 2, 8, 11, 7

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    query, key, value = rand(rows, heads, q, d), rand(rows, kv, own, d), rand(rows, kv, own, d)
    pk, pv = rand(1, kv, width, d), rand(1, kv, width, d)
    mask = None
    if masked:  # left padding of different widths, and causal among the q new positions
        mask = torch.ones(rows, 1, q, own, dtype=torch.bool)
        for r in range(rows):
            mask[r, :, :, :r] = False
        mask &= (torch.arange(own)[None, :] <= torch.arange(q)[:, None] + (own - q))[None, None]
    want = _sdpa_over_copies(query, key, value, pk, pv, mask)
    if masked and q > 1:  # the same mask in its additive form
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    token = P._PREFIX.set([(pk, pv)])
    try:
        got, weights = P.attention(_Layer(), query, key, value, mask, scaling=0.3)
    finally:
        P._PREFIX.reset(token)
    assert weights is None and got.shape == want.shape == (rows, q, heads, d) and got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)


def test_without_a_prefix_it_is_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pkt.evaluate import prefix_attention as P

    query, key, value = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    got = P.attention(_Layer(), query, key, value, None, scaling=0.3)[0]
    assert torch.equal(got, sdpa_attention_forward(_Layer(), query, key, value, None, scaling=0.3)[0])


def test_attending_restores_the_model_attention_even_on_error(tiny_tok):
    from transformers import DynamicCache

    from pkt import testing
    from pkt.evaluate import prefix_attention as P

    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    before = model.config._attn_implementation
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="inside"):
        with P.attending(model, cache):
            assert model.config._attn_implementation == P.NAME and P._PREFIX.get() is not None
            raise RuntimeError("inside")
    assert model.config._attn_implementation == before and P._PREFIX.get() is None


@pytest.mark.parametrize("batch", [2, 8])
def test_the_engine_behind_a_separate_prefix_answers_as_the_padded_path(tiny_tok, monkeypatch, batch):
    """Few-shot prompts behind one long prefix: with the prefix attended as one copy, the continuous engine
    gives the padded path's greedy answers (rows join and leave at batch 2), counts the prefix once, and leaves
    the model's attention as it was."""
    from pkt import testing
    from pkt.evaluate import generate as G
    from pkt.evaluate import kv_cache

    shots = "Q: There are 15 trees in the grove. How many trees are planted? A: The answer is 6.\n\n" * 2
    prompts = [shots + "Q: " + p + " A:" for p in ("Natalia sold 48 clips", "def add(a, b):", "The answer is",
                                                   "A. B. C. D.", "for i in range(10):")]
    ids = [tiny_tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = kv_cache._shared_prefix(ids)
    assert shared < G.SEPARATE_PREFIX  # the default copies a prefix this short into each row
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    copied = generate(model, tiny_tok, prompts, max_new_tokens=10, batch_size=batch, progress=False,
                      engine="continuous")
    padded = generate(model, tiny_tok, prompts, max_new_tokens=10, batch_size=batch, progress=False)
    used = []
    real = G.attending

    def spy(m, prefix):
        used.append(prefix.layers[0].keys.shape[2])
        return real(m, prefix)

    monkeypatch.setattr(G, "SEPARATE_PREFIX", 16)
    monkeypatch.setattr(G, "attending", spy)
    st = GenStats()
    separate = generate(model, tiny_tok, prompts, max_new_tokens=10, batch_size=batch, progress=False, stats=st,
                        engine="continuous")
    assert used == [shared]  # the separate path ran, behind the whole shared prefix
    assert separate == padded == copied
    assert st.prefill_tokens == shared + sum(len(i) - shared for i in ids)
    assert model.config._attn_implementation == "sdpa"
