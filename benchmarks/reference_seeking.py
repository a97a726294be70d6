"""Faithful, slow re-implementations of Seeking's reference algorithms (docs/methods.md §4, §7.2).

Written from the description in docs/methods.md; used as benchmark baselines and as test oracles. Do not
"fix" them: their cost *is* the point.

* :func:`max_sens_submatrix` — the reference's sub-block search (§7.2 item 1): a summed-area table
  built with two ``torch.cumsum`` calls *in the sensitivity's own dtype* (fp32 in the reference), then a
  pure-Python row-major loop over every bottom-right corner. Each iteration indexes the table with 0-d
  tensor reads (``sat[i, j]``), combines them with tensor adds/subtracts (border terms are the Python
  int 0), and compares with a strict ``>`` (a tensor ``__bool__`` per iteration). Ties therefore go to
  the first corner in row-major order. ``rows`` restricts the outer loop to a sub-range of top-left rows
  so that benchmarks can time a measured subset and extrapolate linearly.
* :func:`reference_sensitivity` — the reference's sensitivity accumulation (§4.1, §7.2 item 2): per
  sample ``model.zero_grad()``, a full backward that leaves ``.grad`` on *every* parameter, a per-sample
  dict ``{name: |param·grad|}`` in the parameter dtype, then an in-place running sum into a second dict
  (whose first entries *are* the first sample's tensors), ``zero_grad`` and ``gc.collect()``. Peak host
  memory is weights + grads + per-sample dict + running dict ≈ 4× the weights from the second sample on.
"""

from __future__ import annotations

import gc

import torch


def summed_area_table(sens: torch.Tensor) -> torch.Tensor:
    """Inclusive 2-D prefix sums in ``sens``'s dtype (no zero padding), as the reference builds them."""
    return torch.cumsum(torch.cumsum(sens, dim=0), dim=1)


def _block_sum(sat: torch.Tensor, r0: int, c0: int, r1: int, c1: int):
    """Sum of the inclusive block [r0..r1]×[c0..c1] from 0-d table reads; border terms are the int 0."""
    total = sat[r1, c1]
    above = sat[r0 - 1, c1] if r0 > 0 else 0
    left = sat[r1, c0 - 1] if c0 > 0 else 0
    corner = sat[r0 - 1, c0 - 1] if r0 > 0 and c0 > 0 else 0
    return total - above - left + corner


def max_sens_submatrix(sens: torch.Tensor, x: int, y: int, rows: range | None = None,
                       sat: torch.Tensor | None = None) -> tuple[int, int]:
    """Top-left corner of the x×y contiguous block of ``sens`` with the largest sum (reference loop).

    ``rows``: top-left rows to scan (default: all, ``range(X - x + 1)``); every column offset of each
    row is scanned. ``sat``: a precomputed :func:`summed_area_table` (benchmarks time it separately).
    """
    X, Y = sens.shape
    if x > X or y > Y:
        raise ValueError("only dimensionality reduction is supported")
    if sat is None:
        sat = summed_area_table(sens)
    rows = range(X - x + 1) if rows is None else rows
    best = -float("inf")
    corner = (0, 0)
    for r1 in range(rows.start + x - 1, rows.stop + x - 1):  # bottom-right row, as the reference iterates
        for c1 in range(y - 1, Y):
            r0, c0 = r1 - x + 1, c1 - y + 1
            cur = _block_sum(sat, r0, c0, r1, c1)
            if cur > best:  # strict: the first maximum in row-major order wins
                best = cur
                corner = (r0, c0)
    return corner


def per_sample_sensitivity(model, sample: dict) -> dict[str, torch.Tensor]:
    """One sample: zero_grad, forward with labels, backward, |param·grad| for every parameter with a grad."""
    model.zero_grad()
    ids = torch.as_tensor(sample["input_ids"], dtype=torch.long).view(1, -1)
    labels = torch.as_tensor(sample["labels"], dtype=torch.long).view(1, -1)
    out = model(input_ids=ids, labels=labels)
    loss = out.loss
    loss.backward()
    cur: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            cur[name] = torch.abs(param * param.grad).detach()  # parameter dtype, a full-size copy
    del out, loss
    model.zero_grad()
    gc.collect()
    return cur


def reference_sensitivity(model, samples) -> dict[str, torch.Tensor]:
    """Σ over samples of |θ·∂L/∂θ| for every parameter, accumulated the reference's way (see module doc).

    All parameters get gradients (the reference never freezes anything), norms and biases included.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    running: dict[str, torch.Tensor] = {}
    for s in samples:
        cur = per_sample_sensitivity(model, s)
        for name, t in cur.items():
            if name in running:
                running[name] += t
            else:
                running[name] = t  # aliases the first sample's tensor, as in the reference
        del cur
        gc.collect()
    return running
