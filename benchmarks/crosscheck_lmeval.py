"""pkt's standard GSM8K and MMLU protocols against lm-evaluation-harness itself, on the same in-memory model.

    .venv/bin/pip install -e ".[lm-eval]"
    .venv/bin/python -m benchmarks.crosscheck_lmeval --model qwen2.5-coder-0.5b-instruct \
        --gsm8k-limit 100 --mmlu-limit 100 --out runs/xcheck-lmeval

Both sides score one seeded subset (``pkt.evaluate.tasks.common.select``, the subset ``pkt eval --limit N``
uses). pkt runs ``evaluate_model(..., protocol="standard")``; lm-eval 0.4.13 runs offline through its HF wrapper
(``HFLM(pretrained=<the same model object>)``) on tasks that ``include`` its own ``gsm8k-cot.yaml`` and
``mmlu/default/_default_template_yaml`` and only swap the hub dataset for local JSON files holding that subset
(MMLU: one task per subject, with the subject's dev rows as the few-shot split). Nothing else of lm-eval's
task definitions is touched: prompts, shots, stops, filters and metrics are its own.

For each question the script compares the verdicts (GSM8K: strict-match exact match; MMLU: acc) and lists every
disagreement with what explains it: for GSM8K, whether the two generations differ (and where) or the same text
was scored differently; for MMLU, both sides' log-likelihoods of " A".." D" and the margin between the top two.
Writes ``OUT/crosscheck_lmeval.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_task_configs(root: Path, gsm_rows: list[dict], mmlu_rows: list[dict], mmlu_dev: list[dict]) -> dict:
    """Task YAMLs (and their local data) that include lm-eval's own task files. Returns task names per family."""
    import yaml

    tasks_dir = _lm_eval_tasks_dir()
    names: dict[str, list[str]] = {"gsm8k": [], "mmlu": []}
    if gsm_rows:
        data = root / "gsm8k_test.jsonl"
        data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                for r in gsm_rows), encoding="utf-8")
        cfg = {"include": str(tasks_dir / "gsm8k" / "gsm8k-cot.yaml"), "task": "pkt_xcheck_gsm8k_cot",
               "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(data)}}}
        (root / "pkt_xcheck_gsm8k_cot.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        names["gsm8k"].append(cfg["task"])
    subjects = sorted({r["subject"] for r in mmlu_rows})
    for s in subjects:
        test, dev = root / f"mmlu_{s}_test.jsonl", root / f"mmlu_{s}_dev.jsonl"
        keep = ("subject", "question", "choices", "answer")
        test.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in mmlu_rows if r["subject"] == s),
                        encoding="utf-8")
        dev.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in mmlu_dev if r["subject"] == s),
                       encoding="utf-8")
        # description: the wording of lm-eval's per-subject mmlu_<subject>.yaml files
        cfg = {"include": str(tasks_dir / "mmlu" / "default" / "_default_template_yaml"), "task": f"pkt_xcheck_mmlu_{s}",
               "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": {"test": str(test), "dev": str(dev)}},
               "description": f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n"}
        (root / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        names["mmlu"].append(cfg["task"])
    return names


def run_lm_eval(model, tokenizer, root: Path, task_names: list[str], shots: int, batch_size: int,
                max_gen_toks: int | None = None, max_length: int | None = None) -> dict:
    """lm-eval's per-sample logs for ``task_names`` (one simple_evaluate call: one shot count)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
              device=str(next(model.parameters()).device), max_length=max_length)
    out = simple_evaluate(model=lm, tasks=task_names, num_fewshot=shots, task_manager=TaskManager(include_path=str(root)),
                          gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None, log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)
    return out["samples"]


def _first_diff(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_gsm8k(pkt_records: list[dict], lm_samples: list[dict]) -> dict:
    strict = {s["doc"]["question"]: s for s in lm_samples if s.get("filter") == "strict-match"}
    rows, dis = [], []
    for r in pkt_records:
        q = r["prompt"].rsplit("Q: ", 1)[1][:-len("\nA:")]
        s = strict[q]
        lm_text = s["resps"][0][0]
        lm_ok = bool(s["exact_match"])
        same_text = lm_text == r["output"]
        same_prompt = s["arguments"][0][0] == r["prompt"]  # the context lm-eval rendered from its own YAML
        rows.append({"id": r["id"], "pkt": r["correct"], "lm_eval": lm_ok, "same_output": same_text,
                     "same_prompt": same_prompt})
        if lm_ok != r["correct"]:
            i = _first_diff(lm_text, r["output"])
            dis.append({"id": r["id"], "pkt": r["correct"], "lm_eval": lm_ok, "pkt_extracted": r["extracted"],
                        "lm_eval_extracted": s["filtered_resps"][0], "gold": r["gold"], "same_output": same_text,
                        "outputs_diverge_at_char": None if same_text else i,
                        "pkt_after": r["output"][max(0, i - 40):i + 80], "lm_eval_after": lm_text[max(0, i - 40):i + 80]})
    n = len(rows)
    agree = sum(x["pkt"] == x["lm_eval"] for x in rows)
    return {"n": n, "agree": agree, "agreement": agree / n if n else 1.0,
            "pkt_accuracy": sum(x["pkt"] for x in rows) / n if n else 0.0,
            "lm_eval_accuracy": sum(x["lm_eval"] for x in rows) / n if n else 0.0,
            "same_output": sum(x["same_output"] for x in rows), "same_prompt": sum(x["same_prompt"] for x in rows),
            "disagreements": dis}


def compare_mmlu(pkt_records: list[dict], lm_samples_by_task: dict[str, list[dict]]) -> dict:
    lm = {}
    for samples in lm_samples_by_task.values():
        for s in samples:
            lm[(s["doc"]["subject"], s["doc"]["question"])] = s
    rows, dis = [], []
    for r in pkt_records:
        q = r["prompt"].rsplit("\n\n", 1)[1].split("\nA. ", 1)[0]
        s = next(v for (subj, qq), v in lm.items() if subj == r["subject"] and qq.strip() == q)
        ll = [float(x[0][0]) for x in s["resps"]]  # (loglikelihood, is_greedy) per choice
        lm_pred = "ABCD"[max(range(4), key=lambda j: ll[j])]
        lm_ok = bool(s["acc"])
        # lm-eval's requests are (context, continuation): the context must be pkt's prompt, the continuations " A".." D"
        same_prompt = all(a[0] == r["prompt"] for a in s["arguments"]) and [a[1] for a in s["arguments"]] == [
            " A", " B", " C", " D"]
        rows.append({"id": r["id"], "pkt": r["correct"], "lm_eval": lm_ok, "same_pred": lm_pred == r["extracted"],
                     "same_prompt": same_prompt})
        if lm_ok != r["correct"] or lm_pred != r["extracted"]:
            ours = [r["logprobs"][L] for L in "ABCD"]
            top = sorted(ll, reverse=True)
            dis.append({"id": r["id"], "gold": r["gold"], "pkt_pred": r["extracted"], "lm_eval_pred": lm_pred,
                        "pkt_logprobs": ours, "lm_eval_loglikelihoods": [round(x, 4) for x in ll],
                        "lm_eval_top2_margin": round(top[0] - top[1], 5),
                        "max_abs_logprob_diff": round(max(abs(a - b) for a, b in zip(ours, ll)), 5)})
    n = len(rows)
    agree = sum(x["pkt"] == x["lm_eval"] for x in rows)
    return {"n": n, "agree": agree, "agreement": agree / n if n else 1.0,
            "same_prediction": sum(x["same_pred"] for x in rows), "same_prompt": sum(x["same_prompt"] for x in rows),
            "pkt_accuracy": sum(x["pkt"] for x in rows) / n if n else 0.0,
            "lm_eval_accuracy": sum(x["lm_eval"] for x in rows) / n if n else 0.0,
            "disagreements": dis}


def crosscheck(model, tokenizer, *, gsm_rows, mmlu_rows, mmlu_dev, gsm_limit, mmlu_limit, seed=0, batch_size=8,
               gsm_max_new_tokens=None, max_length=None, save=None) -> dict:
    """Both harnesses on the same seeded subsets; returns the comparison (no files outside a temp dir).

    MMLU runs first (one forward per question), GSM8K second; ``save(report)`` is called after each."""
    from pkt.evaluate import evaluate_model
    from pkt.evaluate.tasks.common import select

    gsm_sel = select([dict(r, _index=i) for i, r in enumerate(gsm_rows)], gsm_limit, seed) if gsm_limit else []
    mmlu_sel = select([dict(r, _index=i) for i, r in enumerate(mmlu_rows)], mmlu_limit, seed) if mmlu_limit else []
    report: dict = {"seed": seed, "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    with tempfile.TemporaryDirectory(prefix="pkt-lmeval-xcheck-") as tmp:
        root = Path(tmp)
        names = write_task_configs(root, gsm_sel, mmlu_sel, mmlu_dev)
        if mmlu_sel:
            t0 = time.perf_counter()
            pkt = evaluate_model(model, tokenizer, ["mmlu"], protocol="standard",
                                 data={"mmlu": mmlu_sel, "mmlu_dev": mmlu_dev}, batch_size=batch_size,
                                 progress=False, log=None, out_dir=root / "pkt")
            recs = [json.loads(x) for x in (root / "pkt" / "mmlu" / "predictions.jsonl").read_text().splitlines()]
            t1 = time.perf_counter()
            lm = run_lm_eval(model, tokenizer, root, names["mmlu"], 5, batch_size, None, max_length)
            report["mmlu"] = {**compare_mmlu(recs, {k: lm[k] for k in names["mmlu"]}),
                              "pkt_seconds": round(t1 - t0, 1), "lm_eval_seconds": round(time.perf_counter() - t1, 1),
                              "pkt_protocol": pkt["mmlu"]["protocol"]}
            if save:
                save(report)
        if gsm_sel:
            t0 = time.perf_counter()
            pkt = evaluate_model(model, tokenizer, ["gsm8k"], protocol="standard", data={"gsm8k": gsm_sel},
                                 batch_size=batch_size, max_new_tokens=gsm_max_new_tokens, progress=False, log=None,
                                 out_dir=root / "pkt")
            recs = [json.loads(x) for x in (root / "pkt" / "gsm8k" / "predictions.jsonl").read_text().splitlines()]
            t1 = time.perf_counter()
            lm = run_lm_eval(model, tokenizer, root, names["gsm8k"], 8, batch_size, gsm_max_new_tokens, max_length)
            report["gsm8k"] = {**compare_gsm8k(recs, lm[names["gsm8k"][0]]), "pkt_seconds": round(t1 - t0, 1),
                               "lm_eval_seconds": round(time.perf_counter() - t1, 1),
                               "pkt_protocol": pkt["gsm8k"]["protocol"]}
            if save:
                save(report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gsm8k-limit", type=int, default=100)
    ap.add_argument("--mmlu-limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from pkt.data.tasks import gsm8k_test, mmlu_rows
    from pkt.io import write_json
    from pkt.models.load import load_model, load_tokenizer

    tok, model = load_tokenizer(args.model), load_model(args.model, dtype=args.dtype)
    model.eval()
    def save(rep):
        write_json(args.out / "crosscheck_lmeval.json", {"model": args.model, **rep})

    rep = crosscheck(model, tok, gsm_rows=gsm8k_test(), mmlu_rows=mmlu_rows("test"), mmlu_dev=mmlu_rows("dev"),
                     gsm_limit=args.gsm8k_limit, mmlu_limit=args.mmlu_limit, seed=args.seed, batch_size=args.batch_size,
                     save=save)
    save(rep)
    print(json.dumps({t: {k: v for k, v in rep[t].items() if k not in ("disagreements", "pkt_protocol")}
                      for t in ("gsm8k", "mmlu") if t in rep}, indent=1))


if __name__ == "__main__":
    main()
