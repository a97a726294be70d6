"""Teacher x student representation similarity by student depth, read from a study's analysis record.

    pkt study representation-depth docs/results/cpu-study/stages/analysis.json [--bands 4]

The neural-incompatibility paper reads its heat maps as "the first student layers are the least similar". The
analysis record keeps every (student layer, teacher layer) score, so the claim can be checked from it. Per module,
measure and band of student layers (``--bands`` equal bands, shallow to deep) this prints two means:
- over the pairs whose teacher layer is at least the student's (the paper's triangle);
- of each student layer's best-matching teacher layer.
The two can disagree. A first layer matches the teacher's first layers closely, but its triangle row also holds
every deeper teacher layer, and those are far from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def depth_bands(matrix: list[list[float]], bands: int) -> list[dict]:
    """Split the student layers (rows) into ``bands`` contiguous bands; per band, the triangle and best-match means."""
    n = len(matrix)
    if n == 0 or bands < 1 or bands > n:
        raise ValueError(f"{bands} bands for {n} student layers")
    out = []
    for b in range(bands):
        lo, hi = b * n // bands, (b + 1) * n // bands
        tri = [v for i in range(lo, hi) for j, v in enumerate(matrix[i]) if j >= i]
        best = [max(matrix[i]) for i in range(lo, hi)]
        out.append({"layers": f"{lo}–{hi - 1}", "triangle": sum(tri) / len(tri) if tri else float("nan"),
                    "best": sum(best) / len(best)})
    return out


def load_modules(path: Path) -> dict:
    """The representation matrices of an analysis record: {module: {measure: matrix}}."""
    try:
        record = json.loads(path.read_text())
        modules = record["result"]["plots"]["representations"]["modules"]
        return {m: {meas: v["matrix"] for meas, v in by.items()} for m, by in modules.items()}
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read it as JSON ({e})")
    except (KeyError, TypeError):
        raise SystemExit(f"{path}: not an analysis stage record (no result.plots.representations.modules)")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path, help="a study's stages/analysis.json")
    ap.add_argument("--bands", type=int, default=4, help="bands of student layers, shallow to deep (default 4)")
    args = ap.parse_args(argv)
    modules = load_modules(args.record)
    rows = []
    for module, by in modules.items():
        for measure, matrix in by.items():
            try:
                bands = depth_bands(matrix, args.bands)
            except ValueError as e:
                raise SystemExit(f"{args.record}: {module}/{measure}: {e}")
            rows.append((module, measure, bands))
    labels = [b["layers"] for b in rows[0][2]]
    print("| module | measure | " + " | ".join(f"layers {x}: triangle / best" for x in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for module, measure, bands in rows:
        print(f"| {module} | {measure} | " + " | ".join(f"{b['triangle']:.2f} / {b['best']:.2f}" for b in bands)
              + " |")
    print("\ntriangle: mean over the pairs whose teacher layer is at least the student's; best: mean of each student"
          " layer's best teacher layer.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
