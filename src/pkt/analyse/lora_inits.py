"""The LoRA inits that ``pkt analyze params`` compares: loaded or built, measured, and written out.

Every model measured here is a peft LoRA model whose frozen base holds ``W - scaling·BA`` (the convention of
PiSSA and Seeking, under which :func:`pkt.analyse.params.lora_similarity` reads cos(BA, W_original),
cos(BA, W_remaining) and the norm ratio). The models come from two places:

* :func:`adapter_model`: a saved adapter on the base it was saved with. A saved PiSSA/OLoRA config would rerun
  its data-driven init on load (mutating the base a second time) before the saved factors are loaded, so the
  layers are built with a no-op init instead; an adapter whose base is the *original* weights has
  ``scaling·BA`` subtracted from its base, so that the same definitions apply.
* :func:`init_model`: PiSSA on the student, or Seeking from the teacher: evenly spaced teacher layers and the
  largest-Σ|W| blocks, or, with ``seeds``, the teacher's sensitivity on that many extract examples choosing
  both (:func:`seeking_sensitivity`).

:func:`write_params` summarises the records per module, writes ``params.json`` and ``params.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from pkt.analyse import params as P
from pkt.errors import PktError

INITS = ("pissa", "seeking")
BASE_IS = ("remaining", "original")


def _quiet(msg: str) -> None:
    """The default ``log``: say nothing."""


def adapter_model(adapter: str, base: str, base_is: str = "remaining", dtype: str = "float32") -> nn.Module:
    """The saved peft ``adapter`` on ``base``, with the frozen base made ``W - scaling·BA``.

    ``base_is``: ``remaining`` when the base already is the residual (what PiSSA/Seeking save), ``original``
    when it is the unmodified model (the residual is then computed here, in place).
    """
    from peft import PeftConfig, PeftModel

    from pkt.models.load import load_model

    if base_is not in BASE_IS:
        raise PktError(f"--base-is: expected {' or '.join(repr(b) for b in BASE_IS)}")
    config = PeftConfig.from_pretrained(adapter)
    config.init_lora_weights = True  # no-op init: the saved factors are loaded over it unchanged
    model = PeftModel.from_pretrained(load_model(base, dtype=dtype), adapter, config=config)
    if base_is == "original":
        from peft.tuners.lora import LoraLayer

        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLayer):
                    ad = m.active_adapters[0]
                    w = m.get_base_layer().weight
                    w.sub_((m.scaling[ad] * m.lora_B[ad].weight.float() @ m.lora_A[ad].weight.float()).to(w))
    return model


def seeking_sensitivity(teacher_model: nn.Module, student_model: nn.Module, teacher_ref: str, task: str,
                        seeds: int, kinds) -> tuple[list[int], dict]:
    """The teacher's sensitivity |w·∇w| of the ``kinds`` weights on ``seeds`` extract examples of ``task``:
    (teacher layer for each student layer, the sensitivity maps that choose each block)."""
    from pkt.data.tasks import load_split
    from pkt.locate.layers import select_layers
    from pkt.locate.sensitivity import compute_sensitivity, layer_scores, tokenize_samples
    from pkt.models.arch import PEFT_NAMES, ArchSpec
    from pkt.models.load import load_tokenizer

    samples = tokenize_samples(load_split(task, "extract")[:seeds], load_tokenizer(teacher_ref))
    names = tuple(f"{PEFT_NAMES[k]}.weight" for k in kinds)
    sens = compute_sensitivity(teacher_model, samples, param_filter=lambda n, p: n.endswith(names))
    t_spec, s_spec = ArchSpec.from_model(teacher_model), ArchSpec.from_model(student_model)
    return select_layers(layer_scores(sens, t_spec), s_spec.num_layers), sens


def init_model(name: str, student_model: nn.Module, teacher_model: nn.Module | None = None, *,
               teacher_ref: str | None = None, rank: int = 16, kinds=("up", "down"), block: str = "max_abs",
               seeds: int = 0, task: str = "gsm8k") -> tuple[nn.Module, dict]:
    """LoRA init ``name`` built on ``student_model`` (mutated in place): (peft model, what the JSON records of
    it: ``description`` and, for Seeking, the ``blocks`` taken from the teacher)."""
    if name == "pissa":
        return P.pissa_init(student_model, rank=rank, kinds=kinds), {
            "description": "peft LoraConfig(init_lora_weights='pissa'), alpha = r"}
    if name != "seeking":
        raise PktError(f"--init {name!r}: expected {' or '.join(INITS)}")
    if teacher_model is None:
        raise PktError("--init seeking needs --teacher")
    layer_map, sens, how = None, None, "evenly spaced teacher layers, max Σ|W| contiguous blocks"
    if seeds > 0:
        layer_map, sens = seeking_sensitivity(teacher_model, student_model, teacher_ref, task, seeds, kinds)
        how = (f"teacher sensitivity on {seeds} {task} extract seeds (up/down weights): top layers, "
               "max Σ sensitivity contiguous blocks")
    if block == "leading":
        how = how.split(",")[0] + ", leading blocks"
    model, blocks = P.seeking_init(teacher_model, student_model, rank=rank, kinds=kinds, block=block,
                                   layer_map=layer_map, sensitivity=sens)
    return model, {"description": f"{how}; SVD rank {rank}, B = U_rΣ_r, A = V_rᵀ, base ← W − BA "
                                  "(pkt.align.lora_init.make_lora_model)",
                   "blocks": [b.__dict__ for b in blocks]}


def compare_inits(inits: list[str], student: str, teacher: str | None = None, *, rank: int = 16,
                  kinds=("up", "down"), block: str = "max_abs", seeds: int = 0, task: str = "gsm8k",
                  dtype: str = "float32", teacher_dtype: str = "bfloat16",
                  log: Callable[[str], None] = _quiet) -> tuple[dict, dict]:
    """Each init built on a fresh copy of ``student`` and measured: ({init: records}, metadata for the JSON).
    The teacher is loaded once, when Seeking needs it."""
    from pkt.models.load import load_model

    unknown = [n for n in inits if n not in INITS]
    if unknown:
        raise PktError(f"--init {unknown[0]!r}: expected {' or '.join(INITS)}")
    if "seeking" in inits and not teacher:
        raise PktError("--init seeking needs --teacher")
    meta: dict = {"student": student, "teacher": teacher, "inits": {}, "dtype": dtype,
                  "teacher_dtype": teacher_dtype}
    results, teacher_model = {}, None
    for name in inits:
        log(f"[{name}] loading student {student}")
        stud = load_model(student, dtype=dtype)
        if name == "seeking" and teacher_model is None:
            log(f"[seeking] loading teacher {teacher}")
            teacher_model = load_model(teacher, dtype=teacher_dtype)
        model, about = init_model(name, stud, teacher_model, teacher_ref=teacher, rank=rank, kinds=kinds,
                                  block=block, seeds=seeds, task=task)
        meta["inits"][name] = about["description"]
        if "blocks" in about:
            meta["seeking_blocks"] = about["blocks"]
        log(f"[{name}] measuring")
        results[name] = P.lora_similarity(model)
        del model, stud
    return results, meta


def write_params(out: Path, results: dict, meta: dict, title: str, seconds: float,
                 log: Callable[[str], None] = _quiet) -> tuple[Path, Path]:
    """Summaries logged per module; ``params.json`` (metadata, summary, records) and ``params.png`` written."""
    from pkt.analyse import plots
    from pkt.io import write_json

    summary = {k: P.summarise(v) for k, v in results.items()}
    for k, per in summary.items():
        for mod, s in per.items():
            log(f"{k:8s} {mod:10s} cos(BA,W_orig) mean {s['cos_BA_original']['mean']:+.4f}   "
                f"cos(BA,W_rem) mean {s['cos_BA_remaining']['mean']:+.4f}   "
                f"norm ratio {s['norm_ratio']['mean']:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "params.json", {**meta, "summary": summary, "records": results, "seconds": round(seconds, 1)})
    return out / "params.json", Path(plots.plot_params(results, out / "params.png", title=title))
