"""Atomic artifact writes: readers never see a half-written file or directory.

Everything pkt writes goes to a temporary sibling first and is renamed into place (``os.replace`` is
atomic on one filesystem). Interrupted runs therefore leave either the old artifact or none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pkt.errors import PktError


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt must not leave a half-written temp file
        raise


def check_output_dir(path: str | Path, setting: str = "--out") -> None:
    """Fail before any work, naming the setting, when ``path`` cannot be (or become) a directory pkt can
    write in: a file in the way, a read-only or full filesystem, no permission. Creates nothing: the
    probe file in the nearest existing directory is removed at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PktError(f"{setting} {path}: exists and is not a directory")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise PktError(f"{setting} {path}: {base} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".pkt-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PktError(f"{setting} {path}: cannot write in {base} ({e.strerror or e})") from None


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True):
    """Yield a temporary directory that becomes ``path`` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(path)
        shutil.rmtree(path)
    os.replace(tmp, path)
