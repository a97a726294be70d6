"""A stage of a study as a typed value: what it is (kind), for which method, task and seed.

The runner, the plan, the executors and the records ask a :class:`Stage` what it is instead of parsing its
name. The name is derived from it, in the format stage directories and committed records have always used
(a stage directory is ``<name>-<16 hex digits>``: :mod:`pkt.experiment.cache`), so that old records and
caches still match:

* a method's build: ``{method}-{task}-s{seed}`` (kind ``build``);
* its evaluation: ``eval-{method}-{task}-s{seed}`` (kind ``eval``; ``method`` is the evaluated arm's name,
  e.g. ``student-fp32``);
* a seed-independent stage several methods read: ``{kind}-{task}`` (``extract``, ``kd-data``);
* the study's analysis: ``analysis``.

:meth:`Stage.from_name` reads a name back; only records written before stages carried their typed value
need it. A stage's estimate on the plan's reference machine is a :class:`Cost`. This module imports nothing
of pkt: every layer may use its values.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

BUILD, EVAL, ANALYSIS = "build", "eval", "analysis"


@dataclass(frozen=True)
class Stage:
    kind: str
    method: str | None = None
    task: str | None = None
    seed: int | None = None

    @property
    def name(self) -> str:
        parts = [] if self.kind == BUILD else [self.kind]
        parts += [p for p in (self.method, self.task) if p is not None]
        if self.seed is not None:
            parts.append(f"s{self.seed}")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Stage:
        if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
            raise ValueError(f"not a stage: {d!r}")
        seed = d.get("seed")
        return cls(d["kind"], d.get("method"), d.get("task"), int(seed) if seed is not None else None)

    @classmethod
    def from_name(cls, name: str, tasks: list[str]) -> Stage:
        """The stage a name denotes, given the study's tasks (a method may contain '-', a task does not).
        ValueError when the name fits no stage of a study with these tasks."""
        if name == ANALYSIS:
            return cls(ANALYSIS)
        alts = "|".join(re.escape(t) for t in sorted(tasks, key=len, reverse=True))
        if alts:
            m = re.fullmatch(rf"(.+)-({alts})-s(\d+)", name)
            if m:
                head, task, seed = m.group(1), m.group(2), int(m.group(3))
                if head.startswith(EVAL + "-"):
                    return cls(EVAL, head[len(EVAL) + 1:], task, seed)
                return cls(BUILD, head, task, seed)
            m = re.fullmatch(rf"(.+)-({alts})", name)
            if m:
                return cls(m.group(1), None, m.group(2))
        raise ValueError(f"stage {name!r} names no stage of a study of the tasks {tasks}")


def build(method: str, task: str, seed: int) -> Stage:
    return Stage(BUILD, method, task, seed)


def evaluation(method: str, task: str, seed: int) -> Stage:
    return Stage(EVAL, method, task, seed)


def shared(kind: str, task: str) -> Stage:
    return Stage(kind, None, task)


ANALYSIS_STAGE = Stage(ANALYSIS)


@dataclass
class Cost:
    """A stage's estimate: seconds and disk bytes on the reference machine, the work in words, and whether
    the bytes include a full copy of the student (the plan counts only the largest such copy unless
    ``keep_checkpoints``: each is deleted once evaluated)."""

    seconds: float
    bytes: int
    work: str
    checkpoint: bool = False
