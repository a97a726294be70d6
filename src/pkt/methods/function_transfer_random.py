"""``function-transfer-random``: function-transfer's procedure with the teacher's task vector replaced, per
projection, by random singular vectors carrying the teacher delta's own singular values (same rank and Frobenius
norm, seeded; :func:`pkt.transfer.function_transfer.random_task_vector`): what a transferred update of that size
does without the teacher's directions."""

from __future__ import annotations

from pkt.methods.function_transfer import FunctionTransfer
from pkt.methods.registry import register


class FunctionTransferRandom(FunctionTransfer):
    name = "function-transfer-random"
    task_vector = "random"
    controls = "function-transfer"


register(FunctionTransferRandom())
