"""The preflight refusals of ``pkt run`` on the real embedded models, timed as whole processes (docs/benchmarks.md,
after P5). Each config in ``benchmarks/preflight/`` must be refused with one line and exit 2, before any stage,
leaving nothing in ``--out``.

    .venv/bin/python -m benchmarks.bench_preflight [--repeats 1]

Prints one row per config: wall seconds (median of the repeats), exit status, whether ``--out`` stayed absent,
and the first 100 characters of the message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).parent / "preflight"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for cfg in sorted(CONFIGS.glob("*.yaml")):
        times, res, out = [], None, None
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                t0 = time.perf_counter()
                res = subprocess.run([sys.executable, "-m", "pkt.cli", "run", str(cfg), "--out", str(out)],
                                     capture_output=True, text=True, env=env)
                times.append(time.perf_counter() - t0)
                untouched = not out.exists()
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        rows.append({"config": cfg.name, "seconds": round(statistics.median(times), 1), "exit": res.returncode,
                     "out_untouched": untouched, "stderr_lines": len(lines),
                     "message": (lines[-1] if lines else "")[:100]})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
