"""``pkt analyze params | representations | behaviour``: neural-incompatibility analyses → JSON + PNG.

Settings: defaults < ``--config`` YAML (section ``params``, ``representations`` or ``behaviour``: any of the
command's options by name) < flags. The work is done in :mod:`pkt.analyse`; this module parses and calls.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pkt.cli import config_option

app = typer.Typer(help="Neural-incompatibility analyses: parametric, representation and behavioural similarity "
                       "(JSON + PNG).", no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="analyze")


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _progress(it, desc: str | None = None):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch", leave=False)


def _kinds(spec: str, allowed) -> tuple[str, ...]:
    from pkt.errors import PktError

    items = tuple(k.strip().removesuffix("_proj") for k in spec.split(",") if k.strip())
    bad = [k for k in items if k not in allowed]
    if bad or not items:
        raise PktError(f"modules {spec!r}: expected a comma list of {', '.join(allowed)}")
    return items


def _examples(task: str, split: str, n: int, data: Path | None = None):
    from pkt.data.jsonl import read_chat_jsonl
    from pkt.data.tasks import load_split
    from pkt.errors import PktError

    rows = read_chat_jsonl(data) if data else load_split(task, split)
    if n < 1:
        raise PktError("--n must be at least 1")
    return rows[:n]


def _same_tok(teacher: str, student: str):
    from pkt.models.load import assert_same_tokenizer, load_tokenizer

    tok = load_tokenizer(student, padding_side="right")
    assert_same_tokenizer(load_tokenizer(teacher), tok)
    return tok


@app.command()
def params(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (params.json, params.png)."),
    init: list[str] = typer.Option(None, "--init", help="Build this init in process: pissa | seeking (repeatable)."),
    student: str = typer.Option(None, help="Student model (embedded name, HF dir or hub id)."),
    teacher: str = typer.Option(None, help="Teacher model (needed by --init seeking)."),
    adapter: str = typer.Option(None, help="A saved peft LoRA adapter directory to analyse instead (+ --base)."),
    base: str = typer.Option(None, help="The base model the --adapter sits on."),
    base_is: str = typer.Option("remaining", help="For --adapter: the base weight is the frozen residual "
                                                  "('remaining', W - BA, as saved by PiSSA/Seeking) or 'original'."),
    rank: int = typer.Option(16, help="LoRA rank for --init."),
    modules: str = typer.Option("up,down", help="Comma list of projections (q,k,v,o,gate,up,down)."),
    block: str = typer.Option("max_abs", help="Seeking sub-block: max_abs (largest Σ|W|, or Σ sensitivity with "
                                              "--seeds) | leading."),
    seeds: int = typer.Option(0, help="Seeking: teacher sensitivity on this many --task extract examples picks "
                                      "layers and blocks (0 = evenly spaced layers, |W| blocks)."),
    task: str = typer.Option("gsm8k", help="Task whose extract split gives the sensitivity seeds."),
    dtype: str = typer.Option("float32", help="Student load dtype (float32 keeps the SVD residual exact)."),
    teacher_dtype: str = typer.Option("bfloat16", help="Teacher load dtype (its blocks are factored in float32)."),
    config: Path = config_option("params"),  # applied by its callback, before the other options
) -> None:
    """Parametric similarity of LoRA inits: cos(BA, W_original), cos(BA, W_remaining), norm ratio per layer."""
    from pkt.analyse import lora_inits
    from pkt.analyse.params import lora_similarity
    from pkt.errors import PktError
    from pkt.models.arch import LINEAR_KINDS

    kinds = _kinds(modules, LINEAR_KINDS)
    t0 = time.perf_counter()
    meta: dict = {"modules": list(kinds), "rank": rank}
    if adapter:
        if init:
            raise PktError("give either --adapter (+ --base) or --init, not both")
        if not base:
            raise PktError("--adapter needs --base (the model the adapter was saved on)")
        model = lora_inits.adapter_model(adapter, base, base_is, dtype)
        results = {Path(adapter).name: lora_similarity(model)}
        meta.update(adapter=adapter, base=base, base_is=base_is)
    else:
        if not init:
            raise PktError("give --init pissa|seeking (repeatable) with --student [--teacher], or --adapter")
        if not student:
            raise PktError("--init needs --student")
        results, about = lora_inits.compare_inits(init, student, teacher, rank=rank, kinds=kinds, block=block,
                                                  seeds=seeds, task=task, dtype=dtype, teacher_dtype=teacher_dtype,
                                                  log=_log)
        meta.update(about)
    title = f"Parametric similarity, rank {rank}: {student or base}" + (f" ← {teacher}" if teacher else "")
    js, png = lora_inits.write_params(out, results, meta, title, time.perf_counter() - t0, log=_log)
    typer.echo(f"wrote {js} and {png}")


@app.command()
def representations(
    teacher: str = typer.Option(..., help="Teacher model."),
    student: str = typer.Option(..., help="Student model (same tokenizer)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (representations.json, heat-map PNGs)."),
    task: str = typer.Option("gsm8k", help="Task of the inputs."),
    split: str = typer.Option("train", help="PKT split of the inputs: extract | align | train."),
    n: int = typer.Option(16, help="Number of examples (the first n of the split)."),
    data: Path = typer.Option(None, help="A chat-messages JSONL file to read the inputs from instead of --task/--split."),
    max_tokens: int = typer.Option(2048, help="Cap on sample tokens (seeded subsample)."),
    tokens: str = typer.Option("response", help="Sample tokens: response | all."),
    modules: str = typer.Option("up,down,v,o,residual", help="Comma list of up,down,v,o,residual."),
    measures: str = typer.Option("cka,dcka,rsa", help="Comma list of cka,dcka,rsa."),
    batch_size: int = typer.Option(4, help="Examples per forward pass."),
    dtype: str = typer.Option("bfloat16", help="Model dtype for the forward passes."),
    seed: int = typer.Option(0, help="Token subsample seed."),
    config: Path = config_option("representations"),  # applied by its callback, before the other options
) -> None:
    """Teacher-layer × student-layer CKA / debiased CKA / RSA of module outputs, with heat-maps."""
    from pkt.analyse import plots
    from pkt.analyse.representations import PAPER_MEANS, RepConfig, representation_similarity
    from pkt.analyse.representations import KINDS as REP_KINDS
    from pkt.analyse.similarity import MEASURES
    from pkt.io import write_json
    from pkt.models.load import load_model

    cfg = RepConfig(kinds=_kinds(modules, REP_KINDS), measures=_kinds(measures, MEASURES), tokens=tokens,
                    max_tokens=max_tokens, seed=seed, batch_size=batch_size)
    cfg.check()
    t0 = time.perf_counter()
    tok = _same_tok(teacher, student)
    examples = _examples(task, split, n, data)

    def loader(ref):
        def f():
            _log(f"loading {ref} ({dtype})")
            return load_model(ref, dtype=dtype)
        return f

    res = representation_similarity(loader(teacher), loader(student), tok, examples, cfg, progress=_progress,
                                    log=_log)
    res.update(teacher=teacher, student=student, task=None if data else task, split=None if data else split,
               data=str(data) if data else None, dtype=dtype,
               seconds=round(time.perf_counter() - t0, 1))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "representations.json", res)
    pngs = []
    for m in cfg.measures:
        pngs.append(plots.plot_heatmaps(res, m, out / f"representations_{m}.png"))
        for kind in cfg.kinds:
            s = res["modules"][kind][m]["summary"]
            paper = f"   paper {PAPER_MEANS[kind][0]:.3f} ± {PAPER_MEANS[kind][1]:.3f}" if kind in PAPER_MEANS else ""
            _log(f"{m:5s} {kind:8s} mean {s['all']['mean']:+.3f} ± {s['all']['std']:.3f}  "
                 f"(t≥s cells {s['teacher_ge_student']['mean']:+.3f})  diagonal {s['diagonal']['proportional_mean']:+.3f}"
                 f"  best {s['diagonal']['best_mean']:+.3f}{paper}")
    typer.echo(f"wrote {out / 'representations.json'} and {', '.join(pngs)}")


@app.command()
def behaviour(
    teacher: str = typer.Option(..., help="Teacher model."),
    student: str = typer.Option(..., help="Student model (same tokenizer)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (behaviour.json, behaviour.png)."),
    task: str = typer.Option("gsm8k", help="Task of the inputs."),
    split: str = typer.Option("train", help="PKT split: extract | align | train."),
    n: int = typer.Option(16, help="Number of examples (the first n of the split)."),
    data: Path = typer.Option(None, help="A chat-messages JSONL file to read the inputs from instead of --task/--split."),
    batch_size: int = typer.Option(4, help="Examples per forward pass."),
    dtype: str = typer.Option("bfloat16", help="Model dtype."),
    per_token: bool = typer.Option(True, help="Keep the per-token rows in the JSON."),
    config: Path = config_option("behaviour"),  # applied by its callback, before the other options
) -> None:
    """Per-token KL(teacher‖student) and top-1 agreement on response tokens (teacher-forced)."""
    from pkt.analyse import plots
    from pkt.analyse.behaviour import BehaviourConfig, behaviour_similarity
    from pkt.io import write_json
    from pkt.models.load import load_model

    t0 = time.perf_counter()
    tok = _same_tok(teacher, student)
    examples = _examples(task, split, n, data)
    _log(f"loading {teacher} and {student} ({dtype})")
    tm, sm = load_model(teacher, dtype=dtype), load_model(student, dtype=dtype)
    res = behaviour_similarity(tm, sm, tok, examples, BehaviourConfig(batch_size=batch_size, keep_per_token=True),
                               progress=lambda it: _progress(it, "teacher+student forward"))
    res.update(teacher=teacher, student=student, task=None if data else task, split=None if data else split,
               data=str(data) if data else None, dtype=dtype,
               seconds=round(time.perf_counter() - t0, 1))
    out.mkdir(parents=True, exist_ok=True)
    png = plots.plot_behaviour(res, out / "behaviour.png", title=f"{teacher} vs {student} on {task}/{split}")
    if not per_token:
        res.pop("per_token")
    write_json(out / "behaviour.json", res)
    s = res["summary"]
    _log(f"{s['n_tokens']} tokens: KL mean {s['kl_mean']:.4f} median {s['kl_median']:.4f}, top-1 agreement "
         f"{s['top1_agreement']:.3f} (teacher acc {s['teacher_top1_accuracy']:.3f}, student acc "
         f"{s['student_top1_accuracy']:.3f})")
    typer.echo(f"wrote {out / 'behaviour.json'} and {png}")


@app.command()
def nulls(
    teacher: str = typer.Option(..., help="Teacher model."),
    student: str = typer.Option(..., help="Student model (same tokenizer)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (nulls.json, nulls.md)."),
    task: str = typer.Option("gsm8k", help="Task of the inputs."),
    split: str = typer.Option("train", help="PKT split of the inputs: extract | align | train."),
    n: int = typer.Option(64, help="Number of examples (the first n of the split); the intervals resample them."),
    data: Path = typer.Option(None, help="A chat-messages JSONL file to read the inputs from instead of --task/--split."),
    max_tokens: int = typer.Option(1024, help="Cap on sample tokens (seeded subsample)."),
    modules: str = typer.Option("up,down,v,o,residual", help="Comma list of up,down,v,o,residual."),
    measures: str = typer.Option("cka,dcka,rsa", help="Comma list of cka,dcka,rsa."),
    n_boot: int = typer.Option(200, help="Half-samples of the examples the intervals are drawn from."),
    params_rank: int = typer.Option(16, help="Rank of the Seeking blocks of the parametric null (0: skip it)."),
    batch_size: int = typer.Option(4, help="Examples per forward pass."),
    dtype: str = typer.Option("bfloat16", help="Model dtype for the forward passes."),
    seed: int = typer.Option(0, help="Seed of the token subsample, the random teacher, the derangement, the draws."),
    config: Path = config_option("nulls"),  # applied by its callback, before the other options
) -> None:
    """Teacher × student similarity beside its nulls: a random teacher of the same architecture, and the teacher
    fed other examples; intervals from half-samples of the examples."""
    from pkt.analyse.nulls import NullConfig, nulls_markdown, parametric_nulls, representation_nulls
    from pkt.analyse.representations import KINDS as REP_KINDS
    from pkt.analyse.representations import RepConfig
    from pkt.analyse.similarity import MEASURES
    from pkt.errors import PktError
    from pkt.io import write_json, write_text
    from pkt.models.load import load_model

    if n < 2 or n_boot < 10:
        raise PktError("--n must be at least 2 and --n-boot at least 10")
    rep = RepConfig(kinds=_kinds(modules, REP_KINDS), measures=_kinds(measures, MEASURES), max_tokens=max_tokens,
                    seed=seed, batch_size=batch_size)
    rep.check()
    cfg = NullConfig(n_boot=n_boot, seed=seed)
    t0 = time.perf_counter()
    tok = _same_tok(teacher, student)
    examples = _examples(task, split, n, data)

    def loader(ref, dt=dtype):
        def f():
            _log(f"loading {ref} ({dt})")
            return load_model(ref, dtype=dt)
        return f

    res = representation_nulls(loader(teacher), loader(student), tok, examples, rep, cfg, progress=_progress, log=_log)
    if params_rank:
        _log("parametric null: Seeking blocks of the real and of a random teacher (float32)")
        res["params"] = parametric_nulls(loader(teacher, "float32"), loader(student, "float32")(), rank=params_rank,
                                         cfg=cfg)
    res.update(teacher=teacher, student=student, task=None if data else task, split=None if data else split,
               data=str(data) if data else None, dtype=dtype, seconds=round(time.perf_counter() - t0, 1))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "nulls.json", res)
    md = nulls_markdown(res)
    write_text(out / "nulls.md", md)
    typer.echo(md, nl=False)
    typer.echo(f"wrote {out / 'nulls.json'} and {out / 'nulls.md'}")
