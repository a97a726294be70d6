"""Block structures: vectorised max-sum sub-matrix vs brute force (incl. ties), rows/cols, neurons, random."""

from __future__ import annotations

import pytest
import torch

from pkt.errors import PktError
from pkt.locate.structure import (brute_force_submatrix, max_sum_submatrix, select_block, window_sums)


@pytest.mark.parametrize("seed", range(12))
def test_submatrix_matches_brute_force_random(seed):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randint(3, 13, (2,), generator=g).tolist()
    x, y = torch.randint(1, X + 1, (1,), generator=g).item(), torch.randint(1, Y + 1, (1,), generator=g).item()
    s = torch.rand(X, Y, generator=g)
    assert max_sum_submatrix(s, x, y) == brute_force_submatrix(s, x, y)


@pytest.mark.parametrize("seed", range(12))
def test_submatrix_ties_break_row_major_first(seed):
    # small integers make many exact ties (exact in float64 both ways)
    g = torch.Generator().manual_seed(100 + seed)
    X, Y = torch.randint(3, 10, (2,), generator=g).tolist()
    x, y = torch.randint(1, X + 1, (1,), generator=g).item(), torch.randint(1, Y + 1, (1,), generator=g).item()
    s = torch.randint(0, 2, (X, Y), generator=g).float()
    assert max_sum_submatrix(s, x, y) == brute_force_submatrix(s, x, y)


def test_all_equal_picks_top_left():
    assert max_sum_submatrix(torch.ones(7, 5), 3, 2) == (0, 0)


def test_window_sums_values():
    s = torch.arange(12.0).view(3, 4)
    for x, y in [(2, 2), (1, 4), (3, 1), (3, 4)]:
        w = window_sums(s, x, y)
        want = [[s[i:i + x, j:j + y].sum().item() for j in range(4 - y + 1)] for i in range(3 - x + 1)]
        assert w.tolist() == want, (x, y)


def test_teacher_smaller_is_a_clear_error():
    with pytest.raises(PktError, match="smaller than the student"):
        select_block(torch.rand(4, 6), (5, 3), what="layer 0 q_proj")
    with pytest.raises(PktError, match="columns"):
        select_block(torch.rand(6, 4), (5, 5))
    with pytest.raises(PktError, match="expected one of"):
        select_block(torch.rand(6, 6), (5, 5), "diagonal")


def test_rowcol_picks_top_mean_rows_and_columns():
    s = torch.zeros(6, 5)
    s[4] += 10
    s[1] += 5
    s[:, 3] += 7
    b = select_block(s, (2, 1), "rowcol")
    assert b.rows.index.tolist() == [1, 4] and b.cols.index.tolist() == [3]
    w = torch.arange(30.0).view(6, 5)
    assert torch.equal(b.take(w), w[[1, 4]][:, [3]])


def test_neuron_keeps_whole_neurons_on_the_right_axis():
    s = torch.rand(8, 6)
    s[[2, 5]] += 100  # two hot rows (output neurons)
    b = select_block(s, (2, 3), "neuron", neuron_axis=0)
    assert b.rows.index.tolist() == [2, 5] and b.cols.contiguous
    s2 = torch.rand(6, 8)
    s2[:, [1, 7]] += 100  # hot input neurons (columns, e.g. down_proj)
    b2 = select_block(s2, (3, 2), "neuron", neuron_axis=1)
    assert b2.cols.index.tolist() == [1, 7] and b2.rows.contiguous
    w = torch.rand(6, 8)
    r0 = b2.rows.start
    assert torch.equal(b2.take(w), w[r0:r0 + 3][:, [1, 7]])


def test_random_is_seeded_and_sorted():
    s = torch.rand(10, 9)
    a, b = select_block(s, (4, 3), "random", seed=1), select_block(s, (4, 3), "random", seed=1)
    assert torch.equal(a.rows.index, b.rows.index) and torch.equal(a.cols.index, b.cols.index)
    assert a.rows.index.tolist() == sorted(a.rows.index.tolist())


def test_submatrix_block_take_and_json():
    s = torch.zeros(9, 7)
    s[3:6, 2:6] = 1
    b = select_block(s, (3, 4), "submatrix")
    assert b.to_json() == {"rows": {"start": 3, "stop": 6}, "cols": {"start": 2, "stop": 6}}
    assert torch.equal(b.take(torch.arange(63.0).view(9, 7)), torch.arange(63.0).view(9, 7)[3:6, 2:6])


@pytest.mark.parametrize("hot", [(3000, 1100), (10, 5), (3455, 0)])
def test_submatrix_search_at_scale_has_the_known_answer(hot):
    # 1/4 of the Llama-2 13B→7B FFN shape per axis. A map of ones with one hot entry: every window sums to
    # x·y except those that contain the hot entry, and of those the first in row-major order is the answer.
    # (3455, 0): the last row a block can start at, and the first column.
    X, Y, x, y = 3456, 1280, 2752, 1024
    s = torch.ones(X, Y)
    r, c = hot
    s[r, c] = 1000.0
    assert max_sum_submatrix(s, x, y) == (max(0, r - x + 1), max(0, c - y + 1))
