"""Content-addressed stage cache: a stage's output directory is keyed by a hash of its config and inputs.

A finished stage holds ``stage.json`` (its payload, result and timing) and is never recomputed; an
interrupted one leaves nothing (the directory is built under a temporary name and renamed at the end,
see :func:`pkt.io.atomic_dir`). Re-running an experiment after a crash or SIGKILL therefore resumes at
the first unfinished stage and gives the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pkt.io import atomic_dir, write_json


def stable_hash(payload) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    stage: str
    key: str
    seconds: float
    cached: bool


@dataclass
class StageCache:
    root: Path
    log: Callable[[str], None] = print
    records: list[StageRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A stage killed hard (SIGKILL, power loss) leaves its temporary directory behind; it is never read,
        # only reclaimed here. One runner per output directory is assumed.
        stages = Path(self.root) / "stages"
        if stages.is_dir():
            for tmp in stages.glob(".*.tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def path(self, stage: str, payload) -> Path:
        return Path(self.root) / "stages" / f"{stage}-{stable_hash(payload)}"

    def run(self, stage: str, payload: dict, fn: Callable[[Path], dict]) -> tuple[Path, dict]:
        """Return (directory, result) of the stage, computing it with ``fn(tmp_dir) -> result`` if needed."""
        path = self.path(stage, payload)
        meta = path / "stage.json"
        if meta.is_file():
            data = json.loads(meta.read_text())
            self.records.append(StageRecord(stage, path.name, data["seconds"], True))
            self.log(f"[cached] {stage} ({path.name})")
            return path, data["result"]
        self.log(f"[run]    {stage}")
        t0 = time.perf_counter()
        with atomic_dir(path) as tmp:
            result = fn(tmp)
            seconds = round(time.perf_counter() - t0, 2)
            write_json(tmp / "stage.json", {"stage": stage, "payload": payload, "result": result, "seconds": seconds})
        self.records.append(StageRecord(stage, path.name, seconds, False))
        self.log(f"[done]   {stage} in {seconds:.1f} s")
        return path, result
