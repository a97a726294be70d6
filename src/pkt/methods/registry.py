"""The registry of ``pkt run``'s methods and shared stages (re-exported by :mod:`pkt.methods`).

Kept apart from the package's ``__init__``, which imports the built-in method files: a method file imports
:func:`register` from here, so no import goes back up to the package.
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
