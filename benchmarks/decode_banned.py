"""A study's evaluation of one model again, with every token whose text holds a string banned from its outputs.

    .venv/bin/python -m benchmarks.decode_banned configs/cpu-study.yaml --task humaneval --model student \
        --ban '#' --out RUN_DIR --digest docs/results/cpu-study/controls/student-humaneval-no-hash.json \
        [--reference RUN/stages/eval-student-humaneval-s0-KEY]

Why: in the CPU study the fine-tuned arms lose HumanEval problems where they drop the comments the student writes
(docs/results.md), which is a correlation. Banning every token that holds ``#`` takes comments away from the
student alone, with nothing else changed, and asks whether the student needs them: its pass@1 and the paired
counts against its study evaluation (``pkt study compare-predictions`` reads the digest this writes) are the answer.

The ban is a forward hook on the output embeddings that sets the banned tokens' logits to -inf, so both decoding
engines (padded and continuous) obey it without a change to pkt. The evaluation settings are the study config's
own (``Study.eval_cfg``, its first seed); the model is loaded in the config's eval dtype. Two checks that the ban is
the only change are in the digest: no output holds the banned string, and with ``--reference`` (the study's
evaluation stage dir, whose predictions.jsonl holds the full outputs), every problem whose reference output never
held it is answered identically. Greedy decoding never picks a banned token on such a path, so it is unchanged
unless the batch composition moved a float (counted, not assumed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

from pkt.studies.compare_predictions import digest_row
from pkt.studies.compare_records import DIGEST_FORMAT


def banned_ids(tokenizer, text: str) -> list[int]:
    """Every token id whose decoded text holds ``text`` (special tokens included: they decode to their name)."""
    return [i for i in range(len(tokenizer)) if text in tokenizer.decode([i])]


@contextlib.contextmanager
def banned(model, ids: list[int]):
    """Within the block, the model's logits for ``ids`` are -inf: no decoding strategy can pick them."""
    import torch

    index = torch.tensor(ids, dtype=torch.long)

    def hook(_module, _inputs, logits):
        return logits.index_fill(-1, index.to(logits.device), float("-inf"))

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def same_where_unbanned(rows: list[dict], reference: Path, text: str) -> dict:
    """Of the problems whose reference output never held ``text``, how many are answered identically."""
    file = reference / "predictions.jsonl" if reference.is_dir() else reference
    if not file.is_file():
        raise SystemExit(f"--reference {reference}: no predictions.jsonl there")
    ref = {}
    for n, line in enumerate(file.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
            ref[r["id"]] = r["output"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{file}:{n}: not a prediction row ({e})") from None
    clean = [r for r in rows if r["id"] in ref and text not in ref[r["id"]]]
    return {"reference_without_it": len(clean), "identical": sum(r["output"] == ref[r["id"]] for r in clean)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="the study's experiment YAML (its evaluation settings are used)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--model", default="student", help="student, teacher, or a model dir / embedded name")
    ap.add_argument("--ban", required=True, help="tokens whose text holds this string are never generated")
    ap.add_argument("--out", type=Path, required=True, help="run dir: predictions.jsonl and metrics go here")
    ap.add_argument("--digest", type=Path, help="write the predictions digest (committable JSON) here")
    ap.add_argument("--reference", type=Path, help="the study's evaluation stage dir of the same model and task")
    args = ap.parse_args(argv)
    if not args.ban:
        ap.error("--ban: give a non-empty string")
    if args.reference and not (args.reference / "predictions.jsonl" if args.reference.is_dir()
                               else args.reference).is_file():  # checked before the evaluation's half hour
        ap.error(f"--reference {args.reference}: no predictions.jsonl there")
    from pkt.errors import PktError

    try:
        return run(args)
    except PktError as e:  # a bad config, model or data setting: one line, not a traceback
        raise SystemExit(f"decode_banned: {e}") from None


def run(args) -> int:
    from pkt.config import load_config
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.runner import Study
    from pkt.evaluate.harness import run_task
    from pkt.io import write_json, write_jsonl
    from pkt.models.load import load_model, load_tokenizer
    from pkt.seeding import seed_everything

    cfg = load_config(ExperimentConfig, args.config)
    if args.task not in cfg.tasks:
        raise SystemExit(f"decode_banned: --task {args.task}: {args.config} evaluates {', '.join(cfg.tasks)}")
    ref = {"student": cfg.student, "teacher": cfg.teacher}.get(args.model, args.model)
    ecfg = Study(cfg, args.out / "study").eval_cfg(cfg.seeds[0], args.task)
    seed_everything(cfg.seeds[0])
    tok = load_tokenizer(ref)
    model = load_model(ref, dtype=cfg.eval_dtype)
    ids = banned_ids(tok, args.ban)
    t0 = time.perf_counter()
    with banned(model, ids):
        records, metrics = run_task(args.task, model, tok, ecfg)
    seconds = round(time.perf_counter() - t0, 1)
    metric = "accuracy" if "accuracy" in metrics else "pass@1"
    summary = {"model": ref, "task": args.task, "dtype": cfg.eval_dtype, "eval": ecfg.model_dump(mode="json"),
               "ban": args.ban, "banned_tokens": len(ids), "metric": metric, "score": metrics[metric],
               "n": len(records), "outputs_holding_it": sum(args.ban in (r.get("output") or "") for r in records),
               "seconds": seconds, "machine": platform.machine()}
    write_jsonl(args.out / "predictions.jsonl", records)
    if args.reference:
        summary["unbanned_paths"] = same_where_unbanned(records, args.reference, args.ban)
    write_json(args.out / "summary.json", summary)
    if args.digest:
        doc = {"format": DIGEST_FORMAT, "stage": f"eval-{args.model}-{args.task}-ban", "summary": summary,
               "rows": [digest_row(r) for r in records]}
        write_json(args.digest, doc)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
