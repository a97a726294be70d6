"""PostPKT (Seeking): extract sensitive teacher blocks as LoRA factors, inject, fine-tune.

Pipeline (docs/methods.md §4): seed samples → teacher sensitivity (:mod:`pkt.locate.sensitivity`) → keep the
student's number of teacher layers (:mod:`pkt.locate.layers`), re-sorted, teacher layer i → student
layer j in order → for each module kind, the block of the teacher weight with the student's shape
(:mod:`pkt.locate.structure`), using that weight's own sensitivity → rank-r SVD → the student's LoRA
init (:mod:`pkt.align.lora_init`) → LoRA SFT (:mod:`pkt.align.finetune`).

An extraction is a directory: ``factors.safetensors`` (``<student module>.lora_B`` = U_rΣ_r,
``<student module>.lora_A`` = V_rᵀ, and ``.rows``/``.cols`` index tensors for non-contiguous blocks) and
``manifest.json`` (teacher/student, chosen layers and mapping, every block, timings, peak RSS). The
factors carry no α: :func:`pkt.align.lora_init.apply_factors` folds the LoRA scaling in.

Controls (:func:`control_factors`), which keep what Seeking's init has besides the teacher's knowledge:
``random`` replaces each (U_r, V_r) by random orthonormal bases carrying the same singular values (same
rank, same ‖BA‖, no teacher subspace); ``shuffled`` keeps every extracted factor but puts it into the
wrong layer (a seeded derangement of the student layers, per module kind). Both stay output-preserving
(W − BA + BA), so a gap between Seeking and a control is what the teacher's subspaces, or their
placement, add beyond a large initial LoRA.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pkt.align.lora_init import DEFAULT_KINDS, INITS, VOCAB_KINDS, parse_kinds, svd_factors
from pkt.config import Settings
from pkt.errors import PktError
from pkt.io import atomic_dir, write_json
from pkt.locate import layers as layer_sel
from pkt.locate import structure
from pkt.draws import derangement, random_orthonormal  # noqa: F401  (also pkt.postpkt's own names)
from pkt.models.arch import ArchSpec
from pkt.peak_memory import peak_rss_bytes

FACTORS = "factors.safetensors"
MANIFEST = "manifest.json"


class SeekingConfig(Settings):
    """Extraction settings. Defaults: Seeking's (32 seeds, rank 16, sub-matrix, sensitivity layers)."""

    split: str = "extract"
    n_samples: int = 32
    rank: int = 16
    structure: str = "submatrix"
    layers: str = "score"
    targets: list[str] = list(DEFAULT_KINDS)
    style: str = "chat"
    max_length: int = 1024
    train_on_inputs: bool = False
    dtype: str = "float32"  # teacher weights; the sensitivity accumulators are always fp32
    device: str = "cpu"  # teacher device (or "auto" for accelerate's device_map)
    accum_device: str | None = None  # where the accumulators live (None = beside each weight)
    seed: int = 0

    def model_post_init(self, _ctx) -> None:
        if self.structure not in structure.STRATEGIES:
            raise PktError(f"structure {self.structure!r}: expected one of {', '.join(structure.STRATEGIES)}")
        if layer_sel.ALIASES.get(self.layers, self.layers) not in layer_sel.STRATEGIES:
            raise PktError(f"layers {self.layers!r}: expected one of {', '.join(layer_sel.STRATEGIES)}")
        parse_kinds(self.targets)
        if self.n_samples < 1 or self.rank < 1:
            raise PktError("n_samples and rank must be at least 1")


def spec_from_ref(ref) -> ArchSpec:
    """A model's ArchSpec without loading its weights (modules built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pkt.models.load import resolve

    cfg = AutoConfig.from_pretrained(resolve(ref))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    spec = ArchSpec.from_model(model)
    # meta tensors share data_ptr 0, so ArchSpec's observation of tying is unreliable here: use the config
    return dataclasses.replace(spec, tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))


def _neuron_axis(kind: str) -> int:
    # the non-residual axis: output rows of q/k/v/gate/up (and vocab rows of embed/lm_head), input
    # columns of o/down
    return 1 if kind in ("o", "down") else 0


def target_weight_names(teacher, kinds) -> set[str]:
    """Parameter names of the teacher weights the kinds can draw from (all layers; embed/lm_head if asked).

    Sensitivity is accumulated only for these: the accumulator of an untransferred 150k-vocabulary
    embedding/lm_head pair alone would be ~30% of a 1.5B model.
    """
    spec = ArchSpec.from_model(teacher)
    pname = {id(p): n for n, p in teacher.named_parameters()}
    weights = [spec.linear(teacher, i, k).weight for i in range(spec.num_layers) for k in kinds
               if k not in VOCAB_KINDS]
    weights += [(spec.embed(teacher) if k == "embed" else spec.lm_head(teacher)).weight
                for k in kinds if k in VOCAB_KINDS]
    return {pname[id(w)] for w in weights}


def extract_factors(teacher, sens: dict[str, torch.Tensor], student_spec: ArchSpec, cfg: SeekingConfig,
                    progress: bool = True) -> tuple[dict, dict, dict]:
    """Blocks + rank-r factors for every (student layer, kind). Returns (factors, index_tensors, manifest).

    ``factors``: student module name → (B, A); ``index_tensors``: extra tensors to save (row/col index sets).
    """
    t_spec = ArchSpec.from_model(teacher)
    kinds = parse_kinds(cfg.targets)
    from pkt.locate.sensitivity import layer_scores

    scores = layer_scores(sens, t_spec)
    chosen = layer_sel.select_layers(scores, student_spec.num_layers, cfg.layers, seed=cfg.seed)
    pname = {id(p): n for n, p in teacher.named_parameters()}
    jobs = [(i, j, k) for j, i in enumerate(chosen) for k in kinds if k not in VOCAB_KINDS]
    jobs += [(None, None, k) for k in kinds if k in VOCAB_KINDS]
    if any(k in VOCAB_KINDS for k in kinds) and t_spec.vocab_size != student_spec.vocab_size:
        raise PktError(f"embed/lm_head transfer needs identical vocabularies (teacher {t_spec.vocab_size}, "
                       f"student {student_spec.vocab_size} tokens)")
    factors, extra, blocks = {}, {}, []
    for n, (i, j, kind) in enumerate(tqdm(jobs, desc="extract", unit="module", disable=not progress)):
        if i is None:
            t_mod = t_spec.embed(teacher) if kind == "embed" else t_spec.lm_head(teacher)
            s_name, t_name = student_spec.paths[kind], t_spec.paths[kind]
            s_shape = (student_spec.vocab_size, student_spec.hidden_size)
        else:
            t_mod = t_spec.linear(teacher, i, kind)
            s_name, t_name = student_spec.module_name(j, kind), t_spec.module_name(i, kind)
            s_shape = student_spec.weight_shape(kind)
        w = t_mod.weight
        key = pname.get(id(w))
        if key is None or key not in sens:
            raise PktError(f"no sensitivity for teacher weight {t_name} (was it excluded?)")
        s = sens[key]
        blk = structure.select_block(s, s_shape, cfg.structure, _neuron_axis(kind), seed=cfg.seed * 100003 + n,
                                     what=f"{kind} ({t_name} → {s_name})")
        with torch.no_grad():
            b, a, sv = svd_factors(blk.take(w.detach()).float(), cfg.rank, return_spectrum=True)
        factors[s_name] = (b, a)
        for axis, name in ((blk.rows, "rows"), (blk.cols, "cols")):
            if not axis.contiguous:
                extra[f"{s_name}.{name}"] = axis.index.to(torch.int64)
        total = s.double().sum().item()
        blocks.append({
            "student": s_name, "teacher": t_name, "kind": kind, "teacher_layer": i, "student_layer": j,
            "teacher_shape": list(w.shape), "student_shape": list(s_shape), **blk.to_json(),
            "sensitivity_share": blk.take(s).double().sum().item() / total if total > 0 else None,
            "rank_r_energy": (sv[: cfg.rank].double().square().sum() / sv.double().square().sum()).item(),
        })
    manifest = {
        "method": "seeking",
        "teacher_arch": t_spec.to_dict(), "student_arch": student_spec.to_dict(),
        "layer_strategy": cfg.layers, "structure": cfg.structure, "rank": cfg.rank, "targets": list(kinds),
        "layer_scores": [float(x) for x in scores],
        "teacher_layers": chosen, "layer_map": {str(j): i for j, i in enumerate(chosen)},
        "blocks": blocks,
    }
    return factors, extra, manifest


def save_extraction(out: str | Path, factors: dict, extra: dict, manifest: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"{name}.lora_B"] = b.contiguous()
        tensors[f"{name}.lora_A"] = a.contiguous()
    tensors.update({k: v.contiguous() for k, v in extra.items()})
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / FACTORS), metadata={"format": "pkt-seeking-factors"})
        write_json(tmp / MANIFEST, manifest)
    return Path(out)


def load_extraction(path: str | Path) -> tuple[dict, dict]:
    """(factors: student module → (B, A), manifest) from an extraction directory."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / FACTORS).is_file() or not (path / MANIFEST).is_file():
        raise PktError(f"{path}: not an extraction directory (needs {FACTORS} and {MANIFEST}; "
                       "run `pkt extract sensitivity`)")
    tensors = load_file(str(path / FACTORS))
    factors = {}
    for key in tensors:
        if key.endswith(".lora_B"):
            name = key[: -len(".lora_B")]
            factors[name] = (tensors[key], tensors[f"{name}.lora_A"])
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    return factors, manifest


CONTROLS = ("random", "shuffled")


def control_factors(factors: dict, blocks: list[dict], control: str, seed: int = 0) -> tuple[dict, dict]:
    """Seeking's factors turned into a control: (new factors, what was done, for the manifest).

    ``blocks`` is the extraction manifest's list (student module name, kind, student layer of each factor).
    ``random``: B = U'Σ, A = V'ᵀ with U', V' random orthonormal and Σ = the column norms of the extracted B
    (U_rΣ_r has orthogonal columns of norm σ_i), so rank and singular values are those of the extraction.
    ``shuffled``: the factors of student layer j go to layer perm[j] (perm a derangement of the layers) for
    every module kind; embed/lm_head factors, which belong to no layer, stay where they are.
    """
    if control not in CONTROLS:
        raise PktError(f"seeking control {control!r}: expected one of {', '.join(CONTROLS)}")
    if control == "random":
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name in sorted(factors):
            b, a = (t.float() for t in factors[name])
            sigma = b.norm(dim=0)
            out[name] = ((random_orthonormal(b.shape[0], b.shape[1], gen) * sigma).contiguous(),
                         random_orthonormal(a.shape[1], a.shape[0], gen).T.contiguous())
        return out, {"control": "random", "seed": seed}
    layered = {b["student"]: (b["student_layer"], b["kind"]) for b in blocks if b.get("student_layer") is not None}
    name_of = {where: name for name, where in layered.items()}
    layers = sorted({j for j, _ in layered.values()})
    if layers != list(range(len(layers))):
        raise PktError(f"shuffled control: the extraction covers student layers {layers}, not 0..n-1")
    perm = derangement(len(layers), seed, what="student layers")
    out = {}
    for name, fac in factors.items():
        if name in layered:
            j, kind = layered[name]
            if (perm[j], kind) not in name_of:
                raise PktError(f"shuffled control: no {kind} factor in student layer {perm[j]} to swap with")
            out[name_of[perm[j], kind]] = fac
        else:
            out[name] = fac
    return out, {"control": "shuffled", "seed": seed, "layer_perm": perm}


def write_control(factors_dir: str | Path, out: str | Path, control: str, seed: int = 0) -> Path:
    """A control extraction directory built from an existing one (its manifest, plus the control)."""
    factors, manifest = load_extraction(factors_dir)
    new, info = control_factors(factors, manifest.get("blocks", []), control, seed)
    return save_extraction(out, new, {}, {**manifest, **info, "method": f"seeking-{control}",
                                          "source_extraction": str(factors_dir)})


def run_extraction(teacher_ref, student_ref, task: str, cfg: SeekingConfig, out: str | Path,
                   progress: bool = True, log=print) -> dict:
    """Load the teacher, compute sensitivity on the task's seed split, extract and save. Returns the manifest."""
    from pkt.data.tasks import load_split
    from pkt.locate.sensitivity import compute_sensitivity, tokenize_samples
    from pkt.models.load import assert_same_tokenizer, load_model, load_tokenizer

    t0 = time.perf_counter()
    kinds = parse_kinds(cfg.targets)
    student_spec = spec_from_ref(student_ref)
    tok = load_tokenizer(teacher_ref, padding_side="right")
    if any(k in VOCAB_KINDS for k in kinds):
        assert_same_tokenizer(tok, load_tokenizer(student_ref))
    examples = load_split(task, cfg.split)[: cfg.n_samples]
    samples = tokenize_samples(examples, tok, cfg.style, cfg.max_length, cfg.train_on_inputs)
    device_map = cfg.device if cfg.device == "auto" else {"": cfg.device}
    teacher = load_model(teacher_ref, dtype=cfg.dtype, device_map=device_map)
    weight_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    t_load = time.perf_counter() - t0
    log(f"teacher loaded ({weight_bytes / 2**30:.2f} GiB of weights, {t_load:.0f} s); "
        f"sensitivity on {len(samples)} {task}/{cfg.split} samples")
    wanted = target_weight_names(teacher, kinds)
    sens = compute_sensitivity(teacher, samples, accum_device=cfg.accum_device, progress=progress,
                               total=len(samples), param_filter=lambda n, p: n in wanted)
    t_sens = time.perf_counter() - t0 - t_load
    factors, extra, manifest = extract_factors(teacher, sens, student_spec, cfg, progress=progress)
    del sens
    t_extract = time.perf_counter() - t0 - t_load - t_sens
    manifest.update({
        "teacher": str(teacher_ref), "student": str(student_ref), "task": task, "split": cfg.split,
        "n_samples": len(samples), "sample_tokens": [len(s["input_ids"]) for s in samples],
        "config": cfg.model_dump(),
        "teacher_weight_bytes": weight_bytes, "peak_rss_bytes": peak_rss_bytes(),
        "seconds": {"load": round(t_load, 1), "sensitivity": round(t_sens, 1), "extract": round(t_extract, 1)},
    })
    del teacher
    gc.collect()
    save_extraction(out, factors, extra, manifest)
    return manifest


def run_postpkt(teacher_ref, student_ref, task: str, init: str, out: str | Path, ft_cfg, ex_cfg: SeekingConfig,
                factors_dir: str | Path | None = None, progress: bool = True, log=print,
                control: str | None = None, data: str | None = None, base_deltas: str | Path | None = None,
                heldout=None) -> dict:
    """Full PostPKT arm: (extract if seeking) → student LoRA with the init → SFT → save under ``out``.

    ``control`` (``random`` | ``shuffled``, seeking only): fine-tune from the control made of the extraction
    (:func:`control_factors`, seeded with the fine-tuning seed), written next to ``out``.
    ``base_deltas`` (a LaTen ``laten_deltas.safetensors``): fused into the student before the LoRA is made, so
    the arm fine-tunes the LaTen-injected student (the ``laten-lora`` arm of ``pkt run``).
    ``heldout`` (:class:`pkt.align.finetune.Heldout`): the held-out answer loss measured at its optimizer steps,
    written to ``out/heldout.json`` (training unchanged).
    """
    from pkt.align.finetune import train_and_save
    from pkt.dist import dist_state
    from pkt.align.lora_init import make_lora_model
    from pkt.data.tasks import load_split
    from pkt.models.load import load_model, load_tokenizer

    if init not in INITS:
        raise PktError(f"init {init!r}: expected one of {', '.join(INITS)}")
    if factors_dir is not None and init != "seeking":
        raise PktError(f"--factors is only used by --init seeking (got --init {init})")
    if control is not None and (init != "seeking" or control not in CONTROLS):
        raise PktError(f"--control {control!r}: expected one of {', '.join(CONTROLS)}, with --init seeking")
    out = Path(out)
    extra: dict = {"task": task, "teacher": str(teacher_ref) if teacher_ref else None, "student": str(student_ref)}
    user_data = None
    if data is not None:  # in place of the task's train split; read and validated before any model is loaded
        from pkt.data.chat import load_chat_data

        user_data = load_chat_data(data)
        extra["data_source"] = str(data)
    factors = None
    t0 = time.perf_counter()
    if init == "seeking":
        if factors_dir is None:
            if not teacher_ref:
                raise PktError("init 'seeking' needs --teacher (or --factors from `pkt extract sensitivity`)")
            factors_dir = out.with_name(out.name + ".extraction")
            ex_cfg = ex_cfg.model_copy(update={"rank": ft_cfg.r, "targets": list(ft_cfg.targets)})
            run_extraction(teacher_ref, student_ref, task, ex_cfg, factors_dir, progress=progress, log=log)
        if control is not None:
            factors_dir = write_control(factors_dir, out.with_name(f"{out.name}.{control}-factors"), control,
                                        seed=ft_cfg.seed)
            extra["control"] = control
        factors, manifest = load_extraction(factors_dir)
        if manifest.get("rank") != ft_cfg.r:
            raise PktError(f"{factors_dir}: factors have rank {manifest.get('rank')}, fine-tuning uses r={ft_cfg.r}")
        extra["factors"] = str(factors_dir)
        extra["teacher_layers"] = manifest.get("teacher_layers")
    t_extract = time.perf_counter() - t0
    tok = load_tokenizer(student_ref, padding_side="right")
    student = load_model(student_ref, dtype=ft_cfg.dtype)
    if base_deltas is not None:
        from pkt.inject import fuse, load_deltas

        fuse(student, load_deltas(base_deltas))
        extra["base_deltas"] = str(base_deltas)
    t1 = time.perf_counter()
    model = make_lora_model(student, init, ft_cfg.targets, ft_cfg.r, ft_cfg.alpha, ft_cfg.dropout, factors,
                            ft_cfg.pissa_niter)
    extra["init_seconds"] = round(time.perf_counter() - t1, 1)
    extra["extract_seconds"] = round(t_extract, 1)
    examples = user_data if user_data is not None else load_split(task, "train")
    if ft_cfg.n_train is not None:
        examples = examples[: ft_cfg.n_train]
    log(f"{init}: LoRA r={ft_cfg.r} α={ft_cfg.alpha} on {','.join(ft_cfg.targets)}; "
        f"fine-tuning on {len(examples)} {data or f'{task}/train'} examples")
    summary = train_and_save(model, tok, examples, ft_cfg, init, out, extra=extra, progress=progress,
                             heldout=heldout)
    if dist_state().is_main_process:  # under `accelerate launch` only the main process writes
        summary["peak_rss_bytes"] = peak_rss_bytes()
        write_json(out / "summary.json", summary)
    return summary
