"""The methods of ``pkt run``, one file each, and the registry the runner, the plan and the executors use.

``REGISTRY`` maps a method's name to its :class:`~pkt.methods.base.Method`; ``SHARED`` maps the kind of a
seed-independent stage that methods read (Seeking's extraction, SeqKD's teacher answers) to its
:class:`~pkt.methods.base.SharedStage`, in the order a study runs them. Adding a method is adding a file that
defines it and calls :func:`register`: every module of this package is imported here (a method registered
elsewhere, e.g. in a test, works the same way).

The registry itself is :mod:`pkt.methods.registry`. Importing this package is cheap: a method imports torch,
transformers and the library's parts only when its stage runs.
"""

from __future__ import annotations

from pkt.methods.base import Method, SharedStage
from pkt.methods.registry import (REGISTRY, SHARED, companions, get, get_shared, is_vanilla, register,
                                  register_shared, unregister)

__all__ = ["Method", "SharedStage", "REGISTRY", "SHARED", "companions", "get", "get_shared", "is_vanilla",
           "register", "register_shared", "unregister"]



def _load_method_files() -> None:
    """Import every module of this package: each method file registers itself, so a new method is a new file and
    nothing else. The shared stages come first, in the order a study runs them (extraction, then the teacher's
    KD answers); the methods' registry order does not matter (a study runs its config's ``methods:`` order)."""
    import importlib
    import pkgutil

    for name in ("extract", "kd_data"):
        importlib.import_module(f"{__name__}.{name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name not in ("base", "registry"):
            importlib.import_module(f"{__name__}.{info.name}")


_load_method_files()
