"""The methods of ``pkt run``, one file each, and the registry the runner, the plan and the executors use.

``REGISTRY`` maps a method's name to its :class:`~pkt.methods.base.Method`; ``SHARED`` maps the kind of a
seed-independent stage that methods read (Seeking's extraction, SeqKD's teacher answers) to its
:class:`~pkt.methods.base.SharedStage`, in the order a study runs them. Adding a method is adding a file that
defines it and calls :func:`register`, plus its import below (a method registered elsewhere, e.g. in a test,
works the same way).

Importing this package is cheap: a method imports torch, transformers and the library's parts only when its
stage runs.
"""

from __future__ import annotations

from pkt.methods.base import Method, SharedStage

REGISTRY: dict[str, Method] = {}
SHARED: dict[str, SharedStage] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method under its name; returns it."""
    if not method.name:
        raise ValueError(f"{type(method).__name__}: a method needs a name")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def register_shared(stage: SharedStage) -> SharedStage:
    if not stage.kind:
        raise ValueError(f"{type(stage).__name__}: a shared stage needs a kind")
    SHARED[stage.kind] = stage
    return stage


def get(name: str) -> Method:
    """The registered method ``name``; KeyError naming the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}") from None


def get_shared(kind: str) -> SharedStage:
    try:
        return SHARED[kind]
    except KeyError:
        raise KeyError(f"unknown shared stage {kind!r}; known: {', '.join(SHARED)}") from None


def is_vanilla(name: str) -> bool:
    """Whether ``name`` is a registered method that evaluates a model as it is (student, teacher, ...)."""
    return name in REGISTRY and REGISTRY[name].vanilla


def companions(name: str) -> list[Method]:
    """The evaluations made of method ``name``'s model besides its own (the float32 student of the student)."""
    return [m for m in REGISTRY.values() if m.companion_of == name]


# the built-in methods, in the order of the configs' method lists; shared stages in the order a study runs them
from pkt.methods import extract, kd_data  # noqa: E402,F401
from pkt.methods import (  # noqa: E402,F401
    gkd, laten, laten_lora, lora, pissa, seeking, seeking_random, seeking_shuffled, seqkd, student, student_fp32,
    teacher)
