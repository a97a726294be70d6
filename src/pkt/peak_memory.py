"""Peak resident memory of this process, and of one part of its work.

``ru_maxrss`` only ever grows, so in a study that runs its stages in one process it says how much the largest
stage so far needed, not this one. Linux lets a process reset its own peak (writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM``, Linux >= 4.0): :func:`reset_peak` does that before a stage, and
:func:`peak_rss_bytes` then reads the stage's own peak. Where the reset is not possible (another OS, a
restricted /proc) the peak is the process's so far, and :func:`reset_peak` says so by returning False.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last successful :func:`reset_peak` (else since the process began)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak() -> bool:
    """Make the peak start again from the current resident size; False where this system cannot."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False
