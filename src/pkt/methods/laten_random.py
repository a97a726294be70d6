"""``laten-random``: LaTen's null. The same hypernetwork training, located sites, point and injection as ``laten``,
with every located teacher vector replaced by a fixed random direction of its norm (the random-teacher null,
:func:`pkt.locate.pairing.null_vectors`). The hypernetwork is trained on the student's own loss over the align
examples, so it can lower that loss whatever it is fed; a LaTen gain counts only where it exceeds this arm's."""

from __future__ import annotations

from pkt.methods.laten import Laten
from pkt.methods.registry import register


class LatenRandom(Laten):
    name = "laten-random"
    vectors = "random"
    controls = "laten"


register(LatenRandom())
