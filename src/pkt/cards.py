"""Model cards (README.md) for every checkpoint and adapter pkt writes, made with huggingface_hub.

A directory pkt writes (``merged/`` and ``adapter/`` of a fine-tuned or distilled student, the fused
checkpoint of ``pkt laten apply``) is meant to be pushed to the Hub or handed to someone as it is, so it
says what it is: the card's front matter (``ModelCardData``) carries

* ``base_model``: the student's **hub id** — for an embedded model the upstream id the registry records
  (:mod:`pkt.models.registry`), for a hub id the id itself — never a path on the machine that made it
  (a local directory the user gave is named in the body only);
* ``library_name`` (``transformers`` for checkpoints, ``peft`` for adapters), ``tags`` (pkt, the method),
  ``datasets`` (the hub dataset the training rows come from, when there is one), ``license`` (the base
  model's, when known);
* ``model-index`` with the evaluation results, once the study has evaluated the model.

The body says how it was made: method, teacher, data, budget, and the pkt command (or study config).
peft's own adapter README (an empty template whose ``base_model`` is the local cache path) is replaced,
and ``adapter_config.json``'s ``base_model_name_or_path`` is set to the same hub id, so that the adapter
loads from the Hub with plain peft. Offline, load the base model from pkt's prepared copy instead
(:func:`local_base`) and apply the adapter to it with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from pkt.io import write_json, write_text

CARD = "README.md"

# Where each task's PKT training rows come from on the Hub (docs/data.md §2); humaneval's split is generic
# code instructions of no known hub dataset, so it names none.
TRAIN_DATASETS = {"gsm8k": "openai/gsm8k", "mmlu": "cais/mmlu", "mbpp": "google-research-datasets/mbpp"}
# The benchmark each task is evaluated on: (hub id, config, split, display name, metric).
EVAL_DATASETS = {
    "gsm8k": ("openai/gsm8k", "main", "test", "GSM8K", "accuracy"),
    "mmlu": ("cais/mmlu", "all", "test", "MMLU", "accuracy"),
    "humaneval": ("openai/openai_humaneval", None, "test", "HumanEval", "pass@1"),
    "mbpp": ("google-research-datasets/mbpp", "full", "test", "MBPP", "pass@1"),
}
METHODS = {
    "seeking": "PostPKT / Seeking: LoRA initialised from the teacher's most sensitive weight blocks (rank-r SVD), "
               "then LoRA fine-tuning",
    "pissa": "PiSSA baseline: LoRA initialised from the student's own principal singular vectors, then LoRA "
             "fine-tuning",
    "lora": "LoRA baseline: standard LoRA fine-tuning",
    "kd": "knowledge-distillation baseline: LoRA fine-tuning on the teacher's greedy answers to the training prompts",
    "seqkd": "sequence-level knowledge distillation: LoRA fine-tuning on the teacher's greedy answers to the "
             "training prompts",
    "gkd": "on-policy knowledge distillation (GKD): the LoRA student learns the teacher's next-token distributions "
           "on its own samples",
    "laten": "PrePKT / LaTen: teacher neurons translated to the student's width by a trained hypernetwork and "
             "injected into the student's weights (no fine-tuning)",
    "laten-random": "LaTen's random-teacher null: LaTen's hypernetwork training and injection with each located "
                    "teacher vector replaced by a fixed random direction of its norm (a control, not a transfer)",
}


def _embedded(ref):
    from pkt.models.registry import EMBEDDED

    if ref is None:
        return None
    ref = str(ref)
    if ref in EMBEDDED:
        return EMBEDDED[ref]
    # a prepared copy of an embedded model ($PKT_HOME/models/NAME) is still that model
    try:
        from pkt.settings import pkt_home

        path = Path(ref).expanduser().resolve()
        root = (pkt_home() / "models").resolve()
        if path.parent == root and path.name in EMBEDDED:
            return EMBEDDED[path.name]
    except OSError:
        pass
    return None


def hub_id(ref) -> str | None:
    """The hub id naming a model reference: the registry's upstream id for an embedded model (or its
    prepared copy), the reference itself for a hub id, None for any other local directory."""
    if ref is None:
        return None
    m = _embedded(ref)
    if m is not None:
        return m.hub_id
    ref = str(ref)
    if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        return None
    return ref


def license_of(ref) -> str | None:
    """The base model's licence as a Hub licence id (e.g. ``apache-2.0``), when pkt knows it."""
    m = _embedded(ref)
    if m is None or not m.licence:
        return None
    return m.licence.split()[0].lower()


def local_base(hub: str) -> str:
    """Offline stand-in for a card's ``base_model``: the prepared embedded copy of that hub id."""
    from pkt.errors import ModelError
    from pkt.models.load import resolve
    from pkt.models.registry import EMBEDDED

    for name, m in EMBEDDED.items():
        if m.hub_id == hub:
            return resolve(name)
    raise ModelError(f"{hub}: not an embedded model; load it from the Hub (online) instead")


def invocation() -> str:
    """The command line of this process, as a user would retype it."""
    prog = Path(sys.argv[0]).name if sys.argv else "python"
    head = "pkt" if prog in ("pkt", "__main__.py") else prog
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


def _data_line(task, data) -> tuple[str, list[str]]:
    """(body text, front-matter datasets) for the training data."""
    if data:
        name = str(data)
        is_hub = not Path(name).expanduser().exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))
        text = f"`{name}` (hub dataset, `messages` column)" if is_hub else f"the chat file/dataset `{Path(name).name}`"
        return text, [name] if is_hub else []
    if task:
        ds = TRAIN_DATASETS.get(task)
        origin = f" (rows drawn from `{ds}`)" if ds else ""
        return f"the PKT `{task}` split from the LaTen repository{origin}", [ds] if ds else []
    return "not recorded", []


def eval_results(results: list[dict]):
    """huggingface_hub EvalResults from ``[{"task", "score", "n"}]`` of pkt's evaluation."""
    from huggingface_hub import EvalResult

    out = []
    for r in results:
        if r.get("task") not in EVAL_DATASETS or r.get("score") is None:
            continue
        ds, cfg, split, name, metric = EVAL_DATASETS[r["task"]]
        out.append(EvalResult(task_type="text-generation", dataset_type=ds, dataset_name=name, dataset_config=cfg,
                              dataset_split=split, metric_type=metric, metric_value=float(r["score"]),
                              metric_name=f"{metric} (n={r['n']})" if r.get("n") else metric))
    return out


def default_name(student, method: str, task=None) -> str:
    return f"{(hub_id(student) or 'student').split('/')[-1]}-pkt-{method}{'-' + task if task else ''}"


def build_card(*, library: str, method: str, student, teacher=None, task=None, data=None, command: str | None = None,
               details: dict | None = None, results: list[dict] | None = None, name: str | None = None):
    """A ``huggingface_hub.ModelCard`` for one checkpoint (``library="transformers"``) or adapter (``"peft"``)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = hub_id(student)
    data_text, datasets = _data_line(task, data)
    name = name or default_name(student, method, task)
    evals = eval_results(results or [])
    card_data = ModelCardData(base_model=base, library_name=library, tags=["pkt", method], datasets=datasets or None,
                              license=license_of(student), model_name=name if evals else None,
                              eval_results=evals or None, pipeline_tag="text-generation")
    emb = _embedded(student)
    student_text = f"`{base}`" if base else f"a local model (`{Path(str(student)).name}`)"
    if emb is not None:
        student_text += (f" — trained on pkt's embedded copy `{emb.name}` ({emb.note}), which approximates the "
                         "upstream weights")
    t_base = hub_id(teacher)
    teacher_text = f"`{t_base}`" if t_base else (f"a local model (`{Path(str(teacher)).name}`)" if teacher else "none")
    what = "a PEFT LoRA adapter" if library == "peft" else "a full Hugging Face checkpoint"
    lines = [f"# {name}", "",
             f"{what[0].upper() + what[1:]} of {f'`{base}`' if base else 'a local student model'}, made with pkt "
             "(cross-scale parametric knowledge transfer).", "",
             f"- **method:** `{method}` — {METHODS.get(method, method)}",
             f"- **student (base model):** {student_text}",
             f"- **teacher:** {teacher_text}",
             f"- **training data:** {data_text}"]
    for k, v in (details or {}).items():
        if v is not None:
            lines.append(f"- **{k}:** {v}")
    if command:
        lines += ["", "## How it was made", "", "```", command.strip(), "```"]
    lines += ["", "## Use", "", "```python"]
    if library == "peft":
        lines += ["from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"base = AutoModelForCausalLM.from_pretrained({base or 'BASE_MODEL'!r})",
                  "model = PeftModel.from_pretrained(base, 'path/to/this/adapter')",
                  f"tokenizer = AutoTokenizer.from_pretrained({base or 'BASE_MODEL'!r})"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "model = AutoModelForCausalLM.from_pretrained('path/to/this/checkpoint')",
                  "tokenizer = AutoTokenizer.from_pretrained('path/to/this/checkpoint')"]
    lines += ["```"]
    if evals:
        lines += ["", "## Evaluation", "", "| benchmark | metric | n | score |", "|---|---|---:|---:|"]
        for r in results or []:
            if r.get("task") in EVAL_DATASETS:
                lines.append(f"| {EVAL_DATASETS[r['task']][3]} | {EVAL_DATASETS[r['task']][4]} | {r.get('n', '')} "
                             f"| {float(r['score']):.4f} |")
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def save_card(card, directory: str | Path) -> Path:
    path = Path(directory) / CARD
    write_text(path, str(card))
    return path


def fix_adapter_config(adapter_dir: str | Path, student) -> None:
    """Point ``adapter_config.json``'s ``base_model_name_or_path`` at the student's hub id (not a cache path)."""
    base = hub_id(student)
    path = Path(adapter_dir) / "adapter_config.json"
    if base is None or not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base
    write_json(path, cfg)


def _details(summary: dict) -> dict:
    cfg = summary.get("config") or {}
    lora = f"r={cfg.get('r')}, alpha={cfg.get('alpha')}, on {','.join(cfg.get('targets') or [])}" if cfg else None
    budget = (f"{summary.get('n_train')} examples, {summary.get('steps')} optimizer steps, lr {cfg.get('lr')}, "
              f"batch {cfg.get('batch_size')}, prompt style {cfg.get('style')}") if cfg else None
    return {"LoRA": lora, "budget": budget, "final training loss": summary.get("final_loss")}


def write_run_cards(run_dir: str | Path, summary: dict, command: str | None = None,
                    results: list[dict] | None = None) -> list[Path]:
    """Cards for ``merged/`` and ``adapter/`` of a fine-tuning run (:func:`pkt.align.finetune.train_and_save`),
    from its summary; ``results`` (``[{"task", "score", "n"}]``) go into the model-index."""
    run_dir = Path(run_dir)
    method = summary.get("method") or summary.get("init") or "lora"
    kw = dict(method=method, student=summary.get("student"), teacher=summary.get("teacher"),
              task=summary.get("task"), data=summary.get("data_source"),
              command=command if command is not None else invocation(), details=_details(summary), results=results)
    written = []
    if (run_dir / "merged").is_dir():
        written.append(save_card(build_card(library="transformers", **kw), run_dir / "merged"))
    if (run_dir / "adapter").is_dir():
        fix_adapter_config(run_dir / "adapter", summary.get("student"))
        written.append(save_card(build_card(library="peft", **kw), run_dir / "adapter"))
    if (run_dir / "adapter_init").is_dir():
        fix_adapter_config(run_dir / "adapter_init", summary.get("student"))
        note = ("the adapter as initialised, before fine-tuning: peft's reference point for converting the trained "
                "adapter" + ("; it applies to the residual base W - BA, not to the student itself"
                             if method in ("pissa", "seeking") else ""))
        init_kw = {**kw, "details": {**kw["details"], "note": note}, "results": None}
        name = default_name(kw["student"], method, kw["task"]) + "-init"
        written.append(save_card(build_card(library="peft", name=name, **init_kw), run_dir / "adapter_init"))
    return written


def write_fused_card(out: str | Path, manifest: dict, command: str | None = None,
                     results: list[dict] | None = None) -> Path:
    """Card of a LaTen fused checkpoint, from the manifest :func:`pkt.laten.apply` writes."""
    details = {"hypernetwork step": manifest.get("step"), "transfer rate": manifest.get("transfer_rate"),
               "modules": ",".join(manifest.get("modules") or []) or None}
    method = "laten-random" if manifest.get("teacher_vectors") == "random" else "laten"
    card = build_card(library="transformers", method=method, student=manifest.get("student"),
                      teacher=manifest.get("teacher"), task=manifest.get("task"), data=manifest.get("data_source"),
                      command=command if command is not None else invocation(), details=details, results=results)
    return save_card(card, out)


def add_results(model_dir: str | Path, results: list[dict]) -> None:
    """Put evaluation results into the model-index of an existing pkt card (other fields kept)."""
    from huggingface_hub import ModelCard

    path = Path(model_dir) / CARD
    if not path.is_file():
        return
    card = ModelCard.load(path)
    if "pkt" not in (card.data.tags or []):  # a model directory pkt did not write (e.g. the user's teacher)
        return
    evals = eval_results(results)
    if not evals:
        return
    card.data.eval_results = evals
    card.data.model_name = card.data.model_name or Path(model_dir).parent.name
    write_text(path, str(card))


def add_study_results(records: list[dict]) -> None:
    """Put each evaluated model's results (``pkt run`` records with a ``model_dir``) into its cards: the
    checkpoint's and, for a fine-tuned arm, its adapter's."""
    by_dir: dict[str, list[dict]] = {}
    for r in records:
        if r.get("model_dir") and Path(str(r["model_dir"])).is_dir():
            by_dir.setdefault(str(r["model_dir"]), []).append({"task": r["task"], "score": r["score"], "n": r.get("n")})
    for model_dir, results in by_dir.items():
        add_results(model_dir, results)
        adapter = Path(model_dir).parent / "adapter"
        if adapter.is_dir():
            add_results(adapter, results)
