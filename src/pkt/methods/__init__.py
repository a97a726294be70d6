"""The methods of ``pkt run``, one file each, and the registry the runner, the plan and the executors use.

``REGISTRY`` maps a method's name to its :class:`~pkt.methods.base.Method`; ``SHARED`` maps the kind of a
seed-independent stage that methods read (Seeking's extraction, SeqKD's teacher answers) to its
:class:`~pkt.methods.base.SharedStage`, in the order a study runs them. Adding a method is adding a file that
defines it and calls :func:`register`, plus its import below (a method registered elsewhere, e.g. in a test,
works the same way).

The registry itself is :mod:`pkt.methods.registry`. Importing this package is cheap: a method imports torch,
transformers and the library's parts only when its stage runs.
"""

from __future__ import annotations

from pkt.methods.base import Method, SharedStage
from pkt.methods.registry import (REGISTRY, SHARED, companions, get, get_shared, is_vanilla, register,
                                  register_shared, unregister)

__all__ = ["Method", "SharedStage", "REGISTRY", "SHARED", "companions", "get", "get_shared", "is_vanilla",
           "register", "register_shared", "unregister"]

# the built-in methods, in the order of the configs' method lists; shared stages in the order a study runs them
from pkt.methods import extract, kd_data  # noqa: E402,F401
from pkt.methods import (  # noqa: E402,F401
    gkd, laten, laten_lora, lora, pissa, seeking, seeking_random, seeking_shuffled, seqkd, student, student_fp32,
    teacher)
