"""The benchmarks' faithful reference re-implementations agree with pkt's fast code (tiny inputs, fast).

benchmarks/reference_*.py are the slow baselines of docs/benchmarks.md; these tests make them oracles.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where benchmarks/ lives

from benchmarks.reference_seeking import max_sens_submatrix, reference_sensitivity
from pkt import testing
from pkt.locate.sensitivity import compute_sensitivity
from pkt.locate.structure import brute_force_submatrix, max_sum_submatrix


# ---------------------------------------------------------------- P1: sub-matrix search

@pytest.mark.parametrize("shape,block", [((9, 7), (5, 4)), ((12, 12), (12, 3)), ((6, 11), (1, 1)), ((8, 8), (8, 8))])
@pytest.mark.parametrize("seed", range(4))
def test_reference_loop_matches_pkt_random(shape, block, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(shape, generator=g, dtype=torch.float64)
    ref = max_sens_submatrix(s, *block)
    assert ref == max_sum_submatrix(s, *block) == brute_force_submatrix(s, *block)


@pytest.mark.parametrize("seed", range(6))
def test_reference_loop_matches_pkt_on_ties(seed):
    """Small integer values (exact in fp32 and fp64) make many windows tie: both take the first row-major."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (10, 9), generator=g).float()
    for block in [(3, 3), (7, 2), (1, 9), (10, 1)]:
        assert max_sens_submatrix(s, *block) == max_sum_submatrix(s, *block) == brute_force_submatrix(s, *block)


def test_all_equal_map_picks_origin():
    s = torch.ones(7, 6)
    assert max_sens_submatrix(s, 3, 2) == max_sum_submatrix(s, 3, 2) == (0, 0)


def test_reference_loop_row_subset():
    """The benchmark times a band of rows: the loop over a band finds the best corner within that band."""
    s = torch.rand(20, 15, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x, y = 8, 6
    band = range(4, 9)
    r, c = max_sens_submatrix(s, x, y, rows=band)
    assert r in band
    best = max(((i, j) for i in band for j in range(15 - y + 1)), key=lambda ij: (s[ij[0]:ij[0] + x, ij[1]:ij[1] + y].sum().item(), -ij[0], -ij[1]))
    assert (r, c) == best


# ---------------------------------------------------------------- P3: sensitivity accumulation

def _samples(vocab: int, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        T = 12 + 3 * k
        ids = torch.randint(0, vocab, (T,), generator=g)
        labels = ids.clone()
        labels[: T // 2] = -100  # prompt tokens are not scored
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_reference_sensitivity_matches_pkt(kind):
    vocab = 384  # tiny_tokenizer()'s size; ids are random, so no tokenizer is needed
    model = testing.tiny_model(kind, "teacher", vocab)
    samples = _samples(vocab)
    fast = compute_sensitivity(model, samples, progress=False)
    ref_model = copy.deepcopy(model)
    ref = reference_sensitivity(ref_model, samples)
    assert set(fast) <= set(ref)  # the reference also scores norms and biases; pkt only 2-D weights
    assert set(fast) == {n for n, p in model.named_parameters() if p.dim() == 2}
    for name, s in fast.items():
        torch.testing.assert_close(s, ref[name].float(), rtol=1e-4, atol=1e-6, msg=name)
    # pkt leaves no gradients behind and restores flags; the reference leaves neither .grad
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- P2: attribution

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_reference_attribution_matches_pkt(kind):
    from benchmarks.reference_laten import reference_attribute
    from pkt.locate.attribution import attribute

    vocab = 384
    model = testing.tiny_model(kind, "teacher", vocab)
    ids = torch.randint(0, vocab, (1, 14), generator=torch.Generator().manual_seed(1))
    target = 17
    fast = attribute(model, ids, target, norm="laten")  # exact: full softmax for every neuron
    ref = reference_attribute(model, ids, target, keep_logits=False)
    L = fast.ffn_neurons.shape[0]
    ref_ffn = torch.tensor([[ref["ffn"][(l, i)] for i in range(fast.ffn_neurons.shape[1])] for l in range(L)])
    ref_attn = torch.tensor([[ref["attn"][(l, k)] for k in range(fast.attn_neurons.shape[1])] for l in range(L)])
    # the reference rounds every neuron score to 4 decimals
    torch.testing.assert_close(fast.ffn_neurons, ref_ffn, rtol=0, atol=6e-5)
    torch.testing.assert_close(fast.attn_neurons, ref_attn, rtol=0, atol=6e-5)
    torch.testing.assert_close(fast.ffn_layers, torch.tensor([ref["ffn_layers"][l] for l in range(L)]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.attn_layers, torch.tensor([ref["attn_layers"][l] for l in range(L)]), rtol=1e-4, atol=1e-5)
    assert float(fast.ffn_neurons.abs().max()) > 1e-3  # non-trivial scores


def test_reference_attribution_subset_and_logit_copies():
    from benchmarks.reference_laten import reference_attribute

    model = testing.tiny_model("qwen2", "teacher", 384)
    ids = torch.arange(3, 13).view(1, -1)
    ref = reference_attribute(model, ids, 5, layers=[1, 3], max_neurons=7)
    assert ref["n"] == {"ffn": 14, "attn": 14, "layers": 2, "logit_copies": 28}
    assert ref["logit_copy_bytes"] == 28 * 384 * 2  # one fp16 full-vocabulary copy per neuron
    assert {l for l, _ in ref["ffn"]} == {1, 3}
    # the attention list is re-sorted as a whole: its order is by score across layers
    scores = [ref["attn"][k] for k in ref["attn_order"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("shape,block", [((9, 7), (5, 4)), ((12, 10), (12, 5)), ((6, 11), (4, 6)), ((8, 8), (8, 8))])
def test_margin_proposal_matches_reference_and_pkt(shape, block):
    from benchmarks.bench_submatrix import margin_max_sum_submatrix, margin_window_sums
    from pkt.locate.structure import window_sums

    for seed in range(3):
        s = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(margin_window_sums(s, *block), window_sums(s, *block), rtol=1e-12, atol=1e-9)
        assert margin_max_sum_submatrix(s, *block) == max_sum_submatrix(s, *block) == max_sens_submatrix(s.double(), *block)
