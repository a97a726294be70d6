"""Peak resident memory of this process, and of one part of its work.

``ru_maxrss`` only ever grows, so in a study that runs its stages in one process it says how much the largest
stage so far needed, not this one. Linux lets a process reset its own peak (writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM``, Linux >= 4.0): :func:`reset_peak` does that before a stage, and
:func:`peak_rss_bytes` then reads the stage's own peak. Where the reset is not possible (another OS, a
restricted /proc) the peak is the process's so far, and :func:`reset_peak` says so by returning False.

A peak measured that way still counts what earlier stages left behind: glibc's malloc keeps freed blocks of a
few MiB (most of a model's weight matrices, once its mmap threshold has risen) in its heap instead of returning
them, so a stage that follows the teacher's would carry gigabytes it never asked for. :func:`release_memory`
(a garbage collection, then glibc's ``malloc_trim``) hands them back before the reset, so the peak is the
stage's own and a run's peak is its largest stage's, not the sum of its history.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (``VmHWM``, ``VmRSS``: KiB there) in bytes; None where unreadable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size since the last successful :func:`reset_peak` (else since the process began)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak() -> bool:
    """Make the peak start again from the current resident size; False where this system cannot."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int | None:
    """The current resident set size (None where /proc is not readable)."""
    return _status_bytes("VmRSS")


def release_memory() -> bool:
    """Collect garbage and return the heap's free memory to the OS (glibc's ``malloc_trim``); False where the C
    library has no such call (musl, macOS), in which case only the collection ran."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
