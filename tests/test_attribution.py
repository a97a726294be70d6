"""Attribution: hooks capture the right activations; vectorised scores equal a per-neuron Python loop."""

from __future__ import annotations

import pytest
import torch

from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.locate.attribution import attribute, attribution_inputs, capture, strip_answer
from pkt.models.arch import ArchSpec

EX = ChatExample("Natalia sold 48 clips in April and half as many in May. How many in total?",
                 "She sold 48 + 24 = 72 clips. So the answer is 72.\n")


def _inputs(tok):
    return attribution_inputs(EX, tok, style="chat")


def _oracle_lp(model, u, target, final, norm, eps):
    """log p(w | u) written out by hand, one vector at a time (no shared code with the library)."""
    if norm == "yu":
        s = 1.0 / torch.sqrt((final ** 2).mean() + eps)
    else:
        s = 1.0 / torch.sqrt(torch.sqrt(final.var(unbiased=False) + 1e-5) + 1e-6)
    logits = model.lm_head((u * s * model.model.norm.weight).unsqueeze(0))[0]
    return torch.log_softmax(logits, -1)[target]


def test_strip_and_target(tiny_tok):
    assert strip_answer('answer is 72.)"\n ') == "answer is 72"
    ids, target = _inputs(tiny_tok)
    full = tiny_tok(strip_answer(EX.assistant), add_special_tokens=False)["input_ids"]
    assert target == full[-1] and ids[0, -len(full) + 1:].tolist() == full[:-1]
    with pytest.raises(PktError):
        attribution_inputs(ChatExample("q", ". \n"), tiny_tok)


@torch.no_grad()
def test_hooks_capture_the_residual_stream(tiny_pair):
    _, model, tok = tiny_pair
    spec = ArchSpec.from_model(model)
    ids, _ = _inputs(tok)
    acts = capture(model, ids, spec)
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for l, layer in enumerate(model.model.layers):
        torch.testing.assert_close(acts.layer_in[l], hs[l][0, -1])
        torch.testing.assert_close(acts.mid[l], acts.layer_in[l] + acts.attn_out[l])
        torch.testing.assert_close(acts.attn_out[l], layer.self_attn.o_proj(acts.attn_heads[l]))
        x = layer.post_attention_layernorm(acts.mid[l])
        mlp = layer.mlp
        torch.testing.assert_close(acts.coeff[l], mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(acts.ffn_out[l], mlp.down_proj(acts.coeff[l]))
        if l + 1 < spec.num_layers:
            torch.testing.assert_close(hs[l + 1][0, -1], acts.mid[l] + acts.ffn_out[l])
    torch.testing.assert_close(acts.final, acts.mid[-1] + acts.ffn_out[-1])


@torch.no_grad()
def test_yu_readout_reproduces_model_logprob(tiny_pair):
    _, model, tok = tiny_pair
    ids, target = _inputs(tok)
    att = attribute(model, ids, target, neurons=False)
    want = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)[target]
    assert abs(att.logprob - float(want)) < 1e-4


@pytest.mark.parametrize("norm", ["yu", "laten"])
@torch.no_grad()
def test_vectorised_equals_per_neuron_loop(tiny_pair, norm):
    _, model, tok = tiny_pair
    spec = ArchSpec.from_model(model)
    ids, target = _inputs(tok)
    att = attribute(model, ids, target, norm=norm, chunk=7)  # odd chunk: exercises chunk boundaries
    acts = capture(model, ids, spec)
    eps = spec.rms_norm_eps
    for l, layer in enumerate(model.model.layers):
        lp = lambda u: _oracle_lp(model, u, target, acts.final, norm, eps)  # noqa: E731
        base_a, base_f = lp(acts.layer_in[l]), lp(acts.mid[l])
        assert abs(float(att.attn_layers[l] - (lp(acts.layer_in[l] + acts.attn_out[l]) - base_a))) < 1e-4
        assert abs(float(att.ffn_layers[l] - (lp(acts.mid[l] + acts.ffn_out[l]) - base_f))) < 1e-4
        w_down, w_o = layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight
        ffn = torch.stack([lp(acts.mid[l] + acts.coeff[l][i] * w_down[:, i]) - base_f
                           for i in range(spec.intermediate_size)])
        attn = torch.stack([lp(acts.layer_in[l] + acts.attn_heads[l][h * spec.head_dim + j] *
                               w_o[:, h * spec.head_dim + j]) - base_a
                            for h in range(spec.num_heads) for j in range(spec.head_dim)])
        torch.testing.assert_close(att.ffn_neurons[l], ffn, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(att.attn_neurons[l], attn, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_top_vocab_is_exact_when_it_covers_the_vocabulary_and_close_otherwise(qwen_pair):
    teacher, _, tok = qwen_pair
    ids, target = _inputs(tok)
    exact = attribute(teacher, ids, target)
    full = attribute(teacher, ids, target, vocab_top=10_000)
    torch.testing.assert_close(full.ffn_neurons, exact.ffn_neurons, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full.attn_neurons, exact.attn_neurons, atol=1e-5, rtol=1e-4)
    assert float(full.tail_mass.max()) == 0.0
    approx = attribute(teacher, ids, target, vocab_top=64)
    # Jensen on the tail: the approximate normaliser is never larger, so scores are never smaller.
    assert bool((approx.ffn_neurons >= exact.ffn_neurons - 1e-5).all())
    k = 16
    for l in range(exact.ffn_neurons.shape[0]):
        a = set(torch.topk(approx.ffn_neurons[l], k).indices.tolist())
        e = set(torch.topk(exact.ffn_neurons[l], k).indices.tolist())
        assert len(a & e) >= k - 3
    torch.testing.assert_close(approx.attn_layers, exact.attn_layers)  # layer scores stay exact


@pytest.mark.parametrize("vocab_top", [None, 64, 16])  # 16: tangent bound; others: coarse-vocab bound
@torch.no_grad()
def test_certified_top_equals_full_scoring(tiny_pair, vocab_top):
    teacher, _, tok = tiny_pair
    ids, target = _inputs(tok)
    full = attribute(teacher, ids, target, vocab_top=vocab_top)
    k_attn, k_ffn = 9, 17
    pruned = attribute(teacher, ids, target, vocab_top=vocab_top, top=(k_attn, k_ffn), chunk=2)
    for got, want, k in ((pruned.ffn_neurons, full.ffn_neurons, k_ffn), (pruned.attn_neurons, full.attn_neurons, k_attn)):
        g, w = torch.topk(got, k, dim=-1), torch.topk(want, k, dim=-1)
        assert torch.equal(g.indices, w.indices)
        torch.testing.assert_close(g.values, w.values)
        hit = torch.isfinite(got)
        torch.testing.assert_close(got[hit], want[hit])
        assert bool((want[~hit] <= w.values[:, -1:].expand_as(want)[~hit] + 1e-6).all())
    assert pruned.evaluated[1] < full.evaluated[1]


def test_bad_inputs(qwen_pair):
    _, model, tok = qwen_pair
    ids, target = _inputs(tok)
    with pytest.raises(PktError):
        attribute(model, ids, target, norm="nope")
    with pytest.raises(PktError):
        attribute(model, ids, 10**9)
    with pytest.raises(PktError):
        attribute(model, torch.cat([ids, ids]), target)
