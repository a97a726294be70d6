"""P13 of docs/benchmarks.md: does a bfloat16 evaluation see what a build changed? On the real pair (not a test).

    PKT_DATA_DIR=../shared/data .venv/bin/python -m benchmarks.bench_eval_bf16 configs/decisive-gsm8k.yaml \
        --model RUN/stages/build-n64-e1-lr0.0003-s0-*/run/merged --point n64-e1-lr0.0003-s0 --out p13.json

The study's held-out evaluation (its questions, prompts, decoding and answer loss, from the study's config) runs
on the student and on the built model (merged weights), each cast to bf16, and (``--variants``) on the built model
in float32 again. They are set beside the float32 figures the study recorded for the student and the built model
(``--point``'s record): what a cheaper evaluation must reproduce is the *change*, the built model's score and
answer loss minus the student's in the same dtype, and which questions it turns. Wall seconds per evaluation are
measured in one process, one after another, so their ratios are side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("student-bf16", "merged-bf16", "merged-fp32")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path, help="the pilot-kind study whose held-out evaluation is used")
    ap.add_argument("--model", required=True, help="the built model (merged weights) of --point")
    ap.add_argument("--point", required=True, help="the point's record name in the study's records/points")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from pkt.evaluate.harness import run_task
    from pkt.evaluate.precision import surviving
    from pkt.machine import kernel_class
    from pkt.models.load import load_model, load_tokenizer
    from pkt.seeding import seed_everything
    from pkt.studies import staged
    from pkt.studies.pilot import Pilot, load_config

    cfg, _ = load_config(args.config)
    study = Pilot(cfg, None, dry=True, log=lambda s: None)
    ecfg = study.eval_cfg("heldout")
    student = cfg.student
    records = Path(cfg.records)
    rec = {"student-fp32 (record)": json.loads((records / "student.json").read_text())["heldout"],
           "merged-fp32 (record)": json.loads((records / "points" / f"{args.point}.json").read_text())["heldout"]}
    tok = load_tokenizer(student)
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "kernels": kernel_class(), "config": str(args.config), "point": args.point,
           "surviving_bf16": surviving(args.model, student, "bfloat16"), "variants": {}}
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        if name == "student-bf16":
            model = load_model(student, dtype="bfloat16")
        elif name == "merged-bf16":
            model = load_model(args.model, dtype="bfloat16")
        elif name == "merged-fp32":
            model = load_model(args.model, dtype="float32")
        else:
            raise SystemExit(f"--variants: unknown {name!r} (choose from {', '.join(VARIANTS)})")
        loaded = time.perf_counter() - t0
        seed_everything(ecfg.seed)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            got = staged.generation_result(cfg.task, "accuracy", model, tok, ecfg, study.heldout.rows, Path(d))
        gen = time.perf_counter() - t1
        _, loss = run_task(f"{cfg.task}_loss", model, tok, ecfg, rows=study.heldout.loss)
        got.update(answer_loss=loss["nll"], load_seconds=round(loaded, 1), generation_seconds=round(gen, 1),
                   loss_seconds=round(time.perf_counter() - t1 - gen, 1))
        res["variants"][name] = got
        print(json.dumps({name: {k: v for k, v in got.items() if k not in ("ids", "per_example")}}), flush=True)
        del model
        args.out.write_text(json.dumps(res, indent=1) + "\n")

    # the change each evaluation sees: the built model minus the student in the same dtype, and which questions
    # it turns, against the float32 record's
    v = {**rec, **res["variants"]}
    fp32_student, fp32_build = (rec[k]["per_example"] for k in ("student-fp32 (record)", "merged-fp32 (record)"))
    want = [b - a for a, b in zip(fp32_student, fp32_build)]
    summary = {}
    for arm, base in (("merged-fp32 (record)", "student-fp32 (record)"), ("merged-bf16", "student-bf16"),
                      ("merged-fp32", "student-fp32 (record)")):
        if arm in v and base in v:
            turn = [b - a for a, b in zip(v[base]["per_example"], v[arm]["per_example"])]
            summary[f"{arm} - {base}"] = {
                "score": round(v[arm]["score"] - v[base]["score"], 4),
                "answer_loss": round(v[arm]["answer_loss"] - v[base]["answer_loss"], 4),
                "questions_turned_as_in_fp32": sum(a == b for a, b in zip(turn, want)),
                "same_verdicts_as_fp32_model": sum(a == b for a, b in zip(v[arm]["per_example"], fp32_build))}
    res["change"] = summary
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
