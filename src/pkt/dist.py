"""The process's place in a data-parallel run (rank, world size, device): one accessor for all of pkt.

Training loops, tracking, the KD data generation, the CLI and the executors all ask the same question
(am I the main process? how many are there?); they ask it here, a module that imports nothing from pkt,
so that any layer may use it without an import pointing up to the training loop.
"""

from __future__ import annotations


def dist_state():
    """accelerate's per-process state (rank, world size, device), shared by everything in the process.

    Honours ``ACCELERATE_USE_CPU`` as ``Accelerator()`` does. A bare ``PartialState()`` ignores it, and the
    first state created is the one every later call gets: on a machine without GPUs each worker of
    ``accelerate launch`` would then run alone (world 1) and all of them would write the outputs.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
