"""Content-addressed stage cache: a stage's output directory is keyed by a hash of everything that
determines it (settings, code, libraries, models, data: see :mod:`pkt.experiment.fingerprint`).

A finished stage holds ``stage.json`` (its key, result, wall time and peak resident memory) and is never recomputed; an
interrupted one leaves nothing (the directory is built under a temporary name and renamed at the end,
see :func:`pkt.io.atomic_dir`). Re-running an experiment after a crash or SIGKILL therefore resumes at
the first unfinished stage and gives the same numbers as an uninterrupted run.

A ``stage.json`` that cannot be read or lacks its result counts as missing: the stage is recomputed,
never trusted and never a crash. A stage whose bulky outputs were pruned after use (``pruned.json``)
also counts as missing for whoever needs it again.

One runner per output directory: :meth:`StageCache.lock` takes an exclusive ``fcntl`` lock on
``OUT/.pkt-run.lock`` for the whole run; a second runner gets a one-line error instead of deleting the
first one's temporary directories. Only the lock holder reclaims temporary directories left by a hard
kill. The stages of a run under ``--executor ray`` are computed by Ray tasks of the lock holder
(``worker=True``), each writing its own stage directory atomically. In *dry* mode (the plan of ``pkt run --dry-run``) nothing is run, locked or written: each stage
reports its key and whether it is already cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pkt.errors import PktError
from pkt.stage import Stage
from pkt.io import atomic_dir, write_json
from pkt.machine import describe, kernel_class, same_class
from pkt.peak_memory import peak_rss_bytes, release_memory, reset_peak, rss_bytes

LOCK_NAME = ".pkt-run.lock"
PRUNED = "pruned.json"


def stable_hash(payload) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    stage: str  # the stage's name
    key: str
    seconds: float
    cached: bool
    of: Stage | None = None  # the stage as a typed value (None: a stage run by name only)
    peak_rss_bytes: int | None = None  # the stage's own peak resident memory, where measured

    def to_dict(self) -> dict:
        """What a manifest lists of the stage."""
        return {"stage": self.stage, "key": self.key, "seconds": self.seconds, "cached": self.cached,
                **({"peak_rss_bytes": self.peak_rss_bytes} if self.peak_rss_bytes is not None else {})}


def read_record(path: Path) -> dict | None:
    """The stage record of a finished stage directory, or None (missing, unreadable, incomplete, pruned)."""
    if (path / PRUNED).exists():
        return None
    try:
        data = json.loads((path / "stage.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "result" not in data or not isinstance(data.get("seconds"), (int, float)):
        return None
    return data


@dataclass
class StageCache:
    root: Path
    log: Callable[[str], None] = print
    records: list[StageRecord] = field(default_factory=list)
    dry: bool = False
    # computes stages for the run that holds the lock (a Ray task of that run: pkt.experiment.executors),
    # which checked the lock itself; it never takes or reclaims anything
    worker: bool = False
    _lock_fd: int | None = None

    @property
    def stages(self) -> Path:
        return Path(self.root) / "stages"

    @contextlib.contextmanager
    def lock(self):
        """Hold the output directory for this runner; refuse (PktError) if another runner holds it."""
        root = Path(self.root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PktError(f"output directory {root}: cannot be written ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PktError(f"output directory {root} is in use by another pkt run (pid {holder}); "
                           "wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        try:
            # A stage killed hard (SIGKILL, power loss) leaves its temporary directory behind; it is never
            # read. Only the lock holder may reclaim them: another runner's are in use.
            if self.stages.is_dir():
                for tmp in self.stages.glob(".*.tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            yield self
        finally:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def path(self, stage: Stage | str, key_payload) -> Path:
        return self.stages / f"{stage}-{stable_hash(key_payload)}"

    def is_cached(self, stage: Stage | str, key_payload) -> bool:
        return read_record(self.path(stage, key_payload)) is not None

    def run(self, stage: Stage | str, key_payload: dict, fn: Callable[[Path], dict]) -> tuple[Path, dict | None]:
        """Return (directory, result) of the stage, computing it with ``fn(tmp_dir) -> result`` if needed.
        A :class:`Stage` is also written into its ``stage.json`` (``of``), which its record carries.

        In dry mode nothing runs: the result is the cached one, or None when the stage would run.
        """
        of = stage if isinstance(stage, Stage) else None
        stage = str(stage)
        path = self.path(stage, key_payload)
        data = read_record(path)
        if self.dry:
            self.records.append(StageRecord(stage, path.name, data["seconds"] if data else 0.0, data is not None, of))
            return path, data["result"] if data else None
        if data is not None:
            self.records.append(StageRecord(stage, path.name, data["seconds"], True, of, data.get("peak_rss_bytes")))
            other = data.get("machine")
            # a record made by other kernels (AMX bf16 vs AVX-512, another torch) may differ in its last digits
            note = (f"; computed on {describe(other)}, this machine is {describe(kernel_class())}"
                    if isinstance(other, dict) and not same_class(other, kernel_class()) else "")
            self.log(f"[cached] {stage} ({path.name}{note})")
            return path, data["result"]
        if self._lock_fd is None and not self.worker:
            raise RuntimeError("StageCache.run outside StageCache.lock()")
        if path.exists():
            self.log(f"[redo]   {stage}: its record is unreadable or its outputs were pruned")
        self.log(f"[run]    {stage}")
        t0 = time.perf_counter()
        # the stage's own peak memory: what earlier stages freed goes back to the OS, then the process's peak is
        # reset (where the OS allows; else the record says the peak is the process's so far)
        release_memory()
        scope = "stage" if reset_peak() else "process"
        start_rss = rss_bytes()
        with atomic_dir(path) as tmp:
            result = fn(tmp)
            seconds = round(time.perf_counter() - t0, 2)
            peak = peak_rss_bytes()
            record = {"stage": stage, **({"of": of.to_dict()} if of else {}), "key": key_payload, "result": result,
                      "seconds": seconds, "peak_rss_bytes": peak, "peak_scope": scope,
                      **({"start_rss_bytes": start_rss} if start_rss is not None else {}), "machine": kernel_class()}
            write_json(tmp / "stage.json", record)
        self.records.append(StageRecord(stage, path.name, seconds, False, of, peak))
        self.log(f"[done]   {stage} in {seconds:.1f} s, peak resident memory {peak / 2**30:.2f} GiB"
                 + ("" if scope == "stage" else " (the process's so far)"))
        return path, result

    def prune(self, path: Path, files: list[Path], note: str) -> int:
        """Delete bulky outputs of a finished stage, marking it so that it is rebuilt if needed again."""
        freed = 0
        write_json(path / PRUNED, {"note": note, "files": [str(f.relative_to(path)) for f in files]})
        for f in files:
            if f.is_file():
                freed += f.stat().st_size
                f.unlink()
        return freed
