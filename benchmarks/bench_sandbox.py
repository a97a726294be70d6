"""Sandbox timings measured, not asserted: how long the code sandbox takes to start a program and to stop one.

tests/test_sandbox.py checks that each limit holds (a hung program is reported as timed out and killed with
its children, a busy loop dies of SIGXCPU, an output flood of the file-size limit) by the kind of failure,
not by how long it took: on a shared machine a wall-clock bound tests the load, not pkt. The timings those
tests once bounded are measured here, each ``--repeats`` times (median reported), beside that old bound:

* ``trivial``: start-to-verdict of ``pass`` (launcher, namespaces, uid drop, runner, cleanup); no old bound.
* ``timeout-1.5s``: a program (and its forked child) sleeping 300 s under a 1.5 s wall timeout: the run's
  duration, i.e. the timeout plus the kill and cleanup; old bound 10 s.
* ``cpu-limit-1s``: a busy loop under ``cpu_seconds=1`` and a 30 s wall timeout, ended by SIGXCPU; old
  bound 15 s.
* ``output-flood``: ``sys.stdout.write`` in a loop under ``max_file_mb=2``, ended by the file-size limit;
  old bound 3 s.

Run from the repository root with the project venv::

    python -m benchmarks.bench_sandbox --repeats 5 --out sandbox.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

from pkt.evaluate.sandbox import SandboxConfig, isolation, run_program

# item -> (program, settings, the status the run must end with, old bound in seconds or None)
ITEMS = {
    "trivial": ("pass\n", SandboxConfig(timeout=15), "passed", None),
    "timeout-1.5s": ("import os, time\nif os.fork() == 0:\n    time.sleep(300)\n    os._exit(0)\ntime.sleep(300)\n",
                     SandboxConfig(timeout=1.5), "timeout", 10.0),
    "cpu-limit-1s": ("while True:\n    pass\n", SandboxConfig(timeout=30, cpu_seconds=1), "failed", 15.0),
    "output-flood": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                     SandboxConfig(timeout=30, max_file_mb=2), "failed", 3.0),
}


def bench(item: str, repeats: int) -> dict:
    """Median duration (the sandbox's own ``ExecResult.duration``) of ``repeats`` runs of one item."""
    prog, cfg, status, bound = ITEMS[item]
    times = []
    for _ in range(repeats):
        r = run_program(prog, cfg)
        if r.status != status:  # a timing of the wrong behaviour would mean nothing
            raise SystemExit(f"{item}: ended {r.status!r}, expected {status!r}: {r.stderr[-300:]}")
        times.append(r.duration)
    med = statistics.median(times)
    return {"item": item, "median_s": med, "times_s": times, "old_bound_s": bound,
            "within_old_bound": None if bound is None else med <= bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--items", nargs="+", choices=list(ITEMS), default=list(ITEMS))
    ap.add_argument("--out", help="write the rows as JSON here")
    a = ap.parse_args()
    iso = isolation()
    rows = [bench(item, a.repeats) for item in a.items]
    print(f"isolation: {iso}")
    print(f"{'item':16s} {'median s':>9s} {'old bound s':>12s}  within")
    for r in rows:
        bound = "-" if r["old_bound_s"] is None else f"{r['old_bound_s']:.1f}"
        print(f"{r['item']:16s} {r['median_s']:9.2f} {bound:>12s}  {r['within_old_bound']}")
    if a.out:
        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "isolation": iso, "load_avg": os.getloadavg()}
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
