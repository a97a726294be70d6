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
