"""``function-transfer-shuffled``: function-transfer with the teacher's real task vector sent through the wrong
layers: the CKA pairing under a seeded derangement of the student layers
(:func:`pkt.transfer.function_transfer.shuffled_pairing`): what the layer correspondence adds."""

from __future__ import annotations

from pkt.methods.function_transfer import FunctionTransfer
from pkt.methods.registry import register


class FunctionTransferShuffled(FunctionTransfer):
    name = "function-transfer-shuffled"
    pairing = "shuffled"
    controls = "function-transfer"


register(FunctionTransferShuffled())
