"""Wall time of the tiny-pair study (tests/test_ray_executor.py) with the sequential executor and with Ray.

Runs the study ``--repeats`` times with each executor, alternating, each time into a fresh output
directory (nothing cached), on one local Ray instance of ``--workers`` CPUs started once (its start-up
is timed apart). Prints the runs and the medians as a Markdown table.

    PKT_DATA_DIR=... .venv/bin/python benchmarks/bench_executors.py --repeats 3 --workers 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

BUDGET = dict(train_examples=4, epochs=1, batch_size=2, max_length=160, rank=2, alpha=2, extract_samples=2,
              laten_choice="fixed", laten_steps=1, laten_batch=2, kd_max_new_tokens=8, eval_limit=3,
              eval_max_new_tokens=8, loss_examples=3, kd_truncated="keep", gkd_max_new_tokens=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import ray
    import torch

    from pkt.config import validate
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.executors import RayExecutor
    from pkt.experiment.runner import Study
    from pkt.testing import save_tiny, tiny_model, tiny_tokenizer

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-executors-"))
    tok = tiny_tokenizer()
    cfg = validate(ExperimentConfig, {
        "name": "tiny", "teacher": save_tiny(tiny_model("qwen2", "teacher", len(tok)), tok, tmp / "teacher"),
        "student": save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp / "student"),
        "tasks": ["gsm8k"], "seeds": [0], "dtype": "float32", "teacher_dtype": "float32", "analysis_examples": 2,
        "budget": BUDGET})
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    start = time.perf_counter() - t0
    times: dict[str, list[float]] = {"sequential": [], "ray": []}
    try:
        for i in range(args.repeats):
            for name in times:
                study = Study(cfg, tmp / f"{name}-{i}", log=lambda s: None)
                t0 = time.perf_counter()
                if name == "ray":
                    with RayExecutor() as ex:
                        study.run(executor=ex)
                else:
                    study.run()
                times[name].append(time.perf_counter() - t0)
                print(f"run {i + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    print(f"\nRay start-up ({args.workers} CPUs): {start:.1f} s\n")
    print("| executor | runs (s) | median (s) |\n|---|---|---:|")
    for name, ts in times.items():
        print(f"| {name} | {', '.join(f'{t:.1f}' for t in ts)} | {statistics.median(ts):.1f} |")


if __name__ == "__main__":
    main()
