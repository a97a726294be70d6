"""Layer selection: which teacher layers feed which student layers (shared by Seeking and LaTen).

Both methods keep ``n_student`` of the teacher's layers, re-sort them by index and map the i-th kept
teacher layer onto student layer i (docs/methods.md §2.2 and §4.2). Only the ranking differs: Seeking ranks
by summed sensitivity, LaTen by attribution; the ablations (Seeking's analysis figure) use random,
first or last layers. This module takes any per-layer score vector, so it knows nothing about either.
"""

from __future__ import annotations

import torch

from pkt.errors import PktError

STRATEGIES = ("score", "random", "first", "last")
ALIASES = {"sensitivity": "score", "attribution": "score", "top": "score"}


def select_layers(scores: torch.Tensor | None, n_student: int, strategy: str = "score", seed: int = 0,
                  n_teacher: int | None = None) -> list[int]:
    """Indices of ``n_student`` teacher layers in increasing order (entry i feeds student layer i).

    ``score``: the highest scores (ties to the lower index); ``random``: a seeded sample; ``first`` /
    ``last``: the leading / trailing layers. ``scores`` may be None for the score-free strategies if
    ``n_teacher`` is given.
    """
    strategy = ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES:
        raise PktError(f"layer strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if scores is not None:
        scores = torch.as_tensor(scores).double().flatten()
        n_teacher = scores.numel()
    if n_teacher is None:
        raise PktError(f"layer strategy {strategy!r} needs per-layer scores or the teacher's layer count")
    if not 1 <= n_student <= n_teacher:
        raise PktError(
            f"cannot map {n_teacher} teacher layers onto {n_student} student layers: the student must have "
            f"between 1 and {n_teacher} layers"
        )
    if strategy == "score":
        if scores is None:
            raise PktError("layer strategy 'score' needs per-layer scores")
        if not torch.isfinite(scores).all():
            raise PktError("layer scores contain NaN or inf")
        chosen = torch.sort(scores, descending=True, stable=True).indices[:n_student]
    elif strategy == "random":
        chosen = torch.randperm(n_teacher, generator=torch.Generator().manual_seed(seed))[:n_student]
    elif strategy == "first":
        chosen = torch.arange(n_student)
    else:
        chosen = torch.arange(n_teacher - n_student, n_teacher)
    return sorted(int(i) for i in chosen)
