"""Stop a training loop at the first non-finite loss.

A diverged run (loss NaN or ±inf, e.g. from a learning rate that is far too high) must not be saved as
if it were a result: every training loop calls :func:`check_finite` on each step's loss, which raises
:class:`NonFiniteLoss`, a one-line :class:`~pkt.errors.PktError` naming the loop and the step. The
callers write their outputs atomically, so nothing of the failed run is kept or cached.
"""

from __future__ import annotations

import math

from pkt.errors import PktError


class NonFiniteLoss(PktError):
    """A training loss became NaN or infinite."""


def check_finite(loss, step: int, what: str) -> float:
    """Return ``loss`` as a float, or raise :class:`NonFiniteLoss` if it is NaN or infinite."""
    value = float(loss.detach().float().item() if hasattr(loss, "detach") else loss)
    if not math.isfinite(value):
        raise NonFiniteLoss(f"{what}: loss is {value} at step {step}; training diverged "
                            "(lower the learning rate), nothing was saved")
    return value
