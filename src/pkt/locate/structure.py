"""Which part of a teacher weight (X×Y) is taken to fit the student's matching weight (x×y).

Strategies (Seeking's "structure" ablation, docs/methods.md §4 and the analysis figure):

* ``submatrix`` (Seeking's choice): the contiguous x×y block with the largest summed sensitivity.
  The reference scans every corner in Python (≈1.6 h for 13B→7B, docs/methods.md §7.2 item 1); here all
  window sums come at once from a zero-padded float64 summed-area table, and ``torch.argmax`` returns the
  *first* maximum of the row-major flattened window grid, i.e. the same tie-break as the reference's
  row-major scan with a strict ``>``. float64 keeps sums of ~10⁸ fp32 terms exact enough that only true
  ties tie.
* ``rowcol``: the x rows and the y columns with the highest mean sensitivity (the reference's
  commented-out alternative), each kept in index order.
* ``neuron``: whole neurons of the weight's non-residual axis (rows of q/k/v/gate/up, columns of o/down)
  ranked by summed sensitivity; the residual axis then takes the best contiguous window over the chosen
  neurons.
* ``random``: random rows and columns (seeded), in index order.

A selection is a :class:`Block`: per axis either a contiguous range or a sorted index tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pkt.errors import PktError

STRATEGIES = ("submatrix", "rowcol", "neuron", "random")


@dataclass(frozen=True)
class Axis:
    """Selection along one axis: ``start`` for a contiguous range of ``size``, else ``index``."""

    size: int
    start: int | None = None
    index: torch.Tensor | None = None

    @property
    def contiguous(self) -> bool:
        return self.index is None

    def indexer(self):
        return slice(self.start, self.start + self.size) if self.contiguous else self.index

    def to_json(self) -> dict:
        if self.contiguous:
            return {"start": self.start, "stop": self.start + self.size}
        return {"indices": self.size}  # the index tensor itself is stored beside the factors


@dataclass(frozen=True)
class Block:
    rows: Axis
    cols: Axis

    def take(self, w: torch.Tensor) -> torch.Tensor:
        """The selected x×y sub-matrix of ``w`` (a copy when an axis is an index set)."""
        return w[self.rows.indexer()][:, self.cols.indexer()]

    def to_json(self) -> dict:
        return {"rows": self.rows.to_json(), "cols": self.cols.to_json()}


def _check_shapes(teacher: tuple[int, int], student: tuple[int, int], what: str) -> None:
    if len(teacher) != 2 or len(student) != 2:
        raise PktError(f"{what}: expected 2-D weights, got teacher {tuple(teacher)} and student {tuple(student)}")
    (X, Y), (x, y) = teacher, student
    if x < 1 or y < 1:
        raise PktError(f"{what}: student shape {tuple(student)} is empty")
    if x > X or y > Y:
        raise PktError(
            f"{what}: teacher weight {X}×{Y} is smaller than the student's {x}×{y} in "
            f"{'rows' if x > X else 'columns'}; only shrinking is supported (pick a larger teacher)"
        )


def prefix_sums(s: torch.Tensor) -> torch.Tensor:
    """Zero-padded float64 summed-area table P, P[i, j] = Σ s[:i, :j], built in place (one (X+1)(Y+1) buffer)."""
    X, Y = s.shape
    p = torch.zeros(X + 1, Y + 1, dtype=torch.float64, device=s.device)
    p[1:, 1:] = s
    p.cumsum_(0).cumsum_(1)
    return p


def window_sums(s: torch.Tensor, x: int, y: int) -> torch.Tensor:
    """Sum of every contiguous x×y window: tensor [(X−x+1), (Y−y+1)], entry (i, j) = window at corner (i, j)."""
    X, Y = s.shape
    p = prefix_sums(s)
    a, b = X - x + 1, Y - y + 1
    out = p[x:, y:].clone()
    out -= p[:a, y:]
    out -= p[x:, :b]
    out += p[:a, :b]
    return out


def max_sum_submatrix(s: torch.Tensor, x: int, y: int) -> tuple[int, int]:
    """Top-left corner (row, col) of the x×y contiguous window of ``s`` with the largest sum.

    Ties go to the first corner in row-major order (the reference scan's order).
    """
    _check_shapes(tuple(s.shape), (x, y), "sub-matrix search")
    w = window_sums(s, x, y)
    flat = int(torch.argmax(w.view(-1)).item())  # torch.argmax: index of the first maximal value
    return divmod(flat, w.shape[1])


def _best_window_1d(v: torch.Tensor, n: int) -> int:
    """Start of the length-n contiguous window of a 1-D score vector with the largest sum (first on ties)."""
    c = torch.zeros(v.numel() + 1, dtype=torch.float64, device=v.device)
    c[1:] = v.double().cumsum(0)
    return int(torch.argmax(c[n:] - c[: c.numel() - n]).item())


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the lower index, returned in increasing index order."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def select_block(
    s: torch.Tensor,
    student_shape: tuple[int, int],
    strategy: str = "submatrix",
    neuron_axis: int = 0,
    seed: int = 0,
    what: str = "weight",
) -> Block:
    """Choose the part of a teacher weight (with sensitivity map ``s``) that fills a ``student_shape`` weight.

    ``neuron_axis`` (0 = rows, 1 = columns) is the weight's non-residual axis; used by ``neuron``.
    ``what`` names the weight in error messages.
    """
    X, Y = s.shape
    x, y = student_shape
    _check_shapes((X, Y), (x, y), what)
    if strategy == "submatrix":
        r0, c0 = max_sum_submatrix(s, x, y)
        return Block(Axis(x, start=r0), Axis(y, start=c0))
    if strategy == "rowcol":
        return Block(Axis(x, index=_top(s.double().mean(1), x)), Axis(y, index=_top(s.double().mean(0), y)))
    if strategy == "neuron":
        if neuron_axis == 0:
            rows = _top(s.double().sum(1), x)
            c0 = _best_window_1d(s[rows].double().sum(0), y)
            return Block(Axis(x, index=rows), Axis(y, start=c0))
        cols = _top(s.double().sum(0), y)
        r0 = _best_window_1d(s[:, cols].double().sum(1), x)
        return Block(Axis(x, start=r0), Axis(y, index=cols))
    if strategy == "random":
        g = torch.Generator().manual_seed(seed)
        rows = torch.sort(torch.randperm(X, generator=g)[:x]).values
        cols = torch.sort(torch.randperm(Y, generator=g)[:y]).values
        return Block(Axis(x, index=rows), Axis(y, index=cols))
    raise PktError(f"structure strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")


def brute_force_submatrix(s: torch.Tensor, x: int, y: int) -> tuple[int, int]:
    """The reference's exhaustive row-major scan with strict ``>`` (tests only: O(X·Y·x·y))."""
    X, Y = s.shape
    best, corner = None, (0, 0)
    for i in range(X - x + 1):
        for j in range(Y - y + 1):
            v = s[i: i + x, j: j + y].double().sum().item()
            if best is None or v > best:
                best, corner = v, (i, j)
    return corner
