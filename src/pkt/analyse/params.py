"""Parametric similarity: how a LoRA init or an injected delta relates to the student's own weights.

LoRA inits with a mutated base (PiSSA, Seeking) keep the model's function at step 0 by storing
``W_remaining = W − scaling·BA`` as the frozen base weight. For every LoRA-wrapped linear layer
``lora_similarity`` reports (flattened cosines, float64)

* ``cos_BA_original``  = cos(scaling·BA, W_original) with ``W_original = W_remaining + scaling·BA``;
* ``cos_BA_remaining`` = cos(scaling·BA, W_remaining);
* ``norm_ratio``       = ‖scaling·BA‖_F / ‖W_original‖_F (also ``norm_ratio_remaining``).

It works on *any* peft LoRA model whose base was mutated this way (for an ordinary zero-B LoRA the
cosines are 0). Analytic checks: PiSSA gives cos(BA, W_res) = 0 and cos(BA, W) = sqrt(Σ_{i≤r}σᵢ²/Σσᵢ²);
for a foreign (teacher) factor, cos(BA, W) ≈ 0 and cos(BA, W − BA) ≈ −‖BA‖/‖W − BA‖ (docs/methods.md §3.1).

``delta_similarity`` does the LaTen-style comparison: cos(delta, W) restricted to the rows/columns the
delta touches (its support is the "located" mask).

``pissa_init`` and ``seeking_init`` build the two inits on a student in process (see their docstrings).

Weights are read inside accelerate's ``align_module_device``, so a model loaded with an offloading
``device_map`` (parameters on ``meta``, brought in per forward) gives the same numbers as a plain one.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

import torch
import torch.nn as nn
from accelerate.utils import align_module_device

from pkt.analyse.similarity import flat_cosine
from pkt.errors import PktError
from pkt.models.arch import PEFT_NAMES, ArchSpec, unwrap

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def _layer_and_module(name: str) -> tuple[int | None, str]:
    m = _LAYER_RE.search(name)
    return (int(m.group(1)) if m else None), name.split(".")[-1]


def lora_similarity(peft_model: nn.Module, adapter: str | None = None) -> list[dict]:
    """Per LoRA-wrapped linear layer: cos(BA, W_original), cos(BA, W_remaining) and norm ratios.

    ``BA`` is the effective update ``scaling·B@A`` of ``adapter`` (default: the active adapter).
    Records are sorted by (module, layer).
    """
    from peft.tuners.lora import LoraLayer

    rows = []
    for name, m in peft_model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        ad = adapter or _active(m)
        if ad not in m.lora_A:
            continue
        a = m.lora_A[ad].weight.detach().to(torch.float64)
        b = m.lora_B[ad].weight.detach().to(torch.float64)
        ba = m.scaling[ad] * (b @ a)
        base = m.get_base_layer()
        with align_module_device(base):
            w_rem = base.weight.detach().to(device=a.device, dtype=torch.float64)
        if getattr(m, "fan_in_fan_out", False):
            w_rem = w_rem.T
        if ba.shape != w_rem.shape:
            raise PktError(f"{name}: LoRA update {tuple(ba.shape)} does not match base weight {tuple(w_rem.shape)}")
        w_orig = w_rem + ba
        layer, module = _layer_and_module(name)
        n_ba, n_orig, n_rem = float(ba.norm()), float(w_orig.norm()), float(w_rem.norm())
        rows.append({
            "name": _strip_peft(name), "layer": layer, "module": module, "rank": int(a.shape[0]),
            "scaling": float(m.scaling[ad]),
            "cos_BA_original": flat_cosine(ba, w_orig),
            "cos_BA_remaining": flat_cosine(ba, w_rem),
            "norm_BA": n_ba, "norm_original": n_orig, "norm_remaining": n_rem,
            "norm_ratio": n_ba / n_orig if n_orig else float("nan"),
            "norm_ratio_remaining": n_ba / n_rem if n_rem else float("nan"),
        })
    if not rows:
        raise PktError("no LoRA layers found: expected a peft LoRA model")
    return sorted(rows, key=lambda r: (r["module"], r["layer"] if r["layer"] is not None else -1, r["name"]))


def _active(m) -> str:
    act = m.active_adapters if hasattr(m, "active_adapters") else m.active_adapter
    return act[0] if isinstance(act, (list, tuple)) else act


def _strip_peft(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def delta_similarity(student: nn.Module, deltas: dict[str, torch.Tensor]) -> list[dict]:
    """LaTen-style: per module, cos(delta, W) on the located rows × columns (the delta's support).

    ``deltas`` maps a module name (``model.layers.3.mlp.up_proj``; a ``.weight`` suffix or a peft prefix
    is accepted) to a delta of the weight's shape that is zero outside the located rows/columns.
    Also reported: the cosine over the full matrix, the norm ratio ‖delta‖/‖W_located‖ and the counts.
    """
    plain = unwrap(student)
    rows = []
    for name, delta in deltas.items():
        mod_name = _strip_peft(name)
        mod_name = mod_name[: -len(".weight")] if mod_name.endswith(".weight") else mod_name
        try:
            mod = plain.get_submodule(mod_name)
        except AttributeError:
            raise PktError(f"delta for {name!r}: the student has no module {mod_name!r}") from None
        base = getattr(mod, "get_base_layer", lambda: mod)()
        with align_module_device(base):
            w = base.weight.detach().to(device="cpu", dtype=torch.float64)
        d = delta.detach().to(device="cpu", dtype=torch.float64)
        if d.shape != w.shape:
            raise PktError(f"delta for {name!r} is {tuple(d.shape)}, the weight is {tuple(w.shape)}")
        r_mask = d.abs().sum(1) > 0
        c_mask = d.abs().sum(0) > 0
        d_loc, w_loc = d[r_mask][:, c_mask], w[r_mask][:, c_mask]
        layer, module = _layer_and_module(mod_name)
        n_wloc = float(w_loc.norm())
        rows.append({
            "name": mod_name, "layer": layer, "module": module,
            "rows": int(r_mask.sum()), "cols": int(c_mask.sum()),
            "cos_delta_located": flat_cosine(d_loc, w_loc) if d_loc.numel() else 0.0,
            "cos_delta_full": flat_cosine(d, w),
            "norm_delta": float(d.norm()), "norm_located": n_wloc,
            "norm_ratio": float(d.norm()) / n_wloc if n_wloc else float("nan"),
        })
    return sorted(rows, key=lambda r: (r["module"], r["layer"] if r["layer"] is not None else -1, r["name"]))


def summarise(records: list[dict], keys: tuple[str, ...] | None = None) -> dict[str, dict[str, dict]]:
    """Per module: mean/std/min/max over layers of each numeric key (``cos_*`` and ``norm_ratio*``)."""
    by_mod: dict[str, list[dict]] = {}
    for r in records:
        by_mod.setdefault(r["module"], []).append(r)
    out = {}
    for mod, rs in by_mod.items():
        ks = keys or tuple(k for k in rs[0] if k.startswith(("cos_", "norm_ratio")))
        out[mod] = {}
        for k in ks:
            vals = [r[k] for r in rs]
            out[mod][k] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                           "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


# ---- building the inits --------------------------------------------------------------------------

def pissa_init(student: nn.Module, rank: int = 16, kinds=("up", "down"), lora_alpha: int | None = None):
    """peft PiSSA init of ``student`` (mutates its weights in place), as the PostPKT ``pissa`` arm builds it."""
    from pkt.align.lora_init import make_lora_model

    return make_lora_model(student, "pissa", tuple(kinds), r=rank, alpha=lora_alpha or rank, dropout=0.0)


@dataclass(frozen=True)
class SeekingBlock:
    student_layer: int
    teacher_layer: int
    module: str
    row0: int
    col0: int


def even_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer for each student layer: ``n_student`` evenly spaced teacher layers, in order."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def seeking_factors(teacher: nn.Module, student: nn.Module, rank: int = 16, kinds=("up", "down"),
                    block: str = "max_abs", layer_map: list[int] | None = None,
                    sensitivity: dict[str, torch.Tensor] | None = None):
    """Seeking-style factors for every (student layer, kind): ``{module name: (B, A)}`` and the blocks used.

    Student layer i takes teacher layer ``layer_map[i]`` (default: evenly spaced, ``even_layer_map``). From
    that teacher weight a contiguous sub-block of the student weight's shape is cut: the block with the
    largest ``Σ score`` (``block="max_abs"``), where score is the teacher's sensitivity map
    ``sensitivity[<teacher param name>]`` when given and ``|W|`` otherwise, or the leading block
    (``block="leading"``). The block is factored by truncated SVD: ``B = U_rΣ_r``, ``A = V_rᵀ``.
    """
    from pkt.align.lora_init import svd_factors
    from pkt.locate.structure import max_sum_submatrix

    t_spec, s_spec = ArchSpec.from_model(teacher), ArchSpec.from_model(student)
    layer_map = layer_map or even_layer_map(t_spec.num_layers, s_spec.num_layers)
    if len(layer_map) != s_spec.num_layers:
        raise PktError(f"layer map has {len(layer_map)} entries, the student has {s_spec.num_layers} layers")
    if block not in ("max_abs", "leading"):
        raise PktError(f"block {block!r}: expected 'max_abs' or 'leading'")
    factors, blocks = {}, []
    for i, tl in enumerate(layer_map):
        for kind in kinds:
            t_mod = t_spec.linear(teacher, tl, kind)
            with align_module_device(t_mod):
                # still valid after exit: accelerate swaps a meta parameter in, it does not free this one
                tw = t_mod.weight.detach()
            shape = tuple(s_spec.linear(student, i, kind).weight.shape)  # a meta tensor has its shape too
            if block == "leading":
                r0, c0 = 0, 0
            else:
                key = t_spec.module_name(tl, kind) + ".weight"
                score = sensitivity[key] if sensitivity is not None else tw.abs()
                r0, c0 = max_sum_submatrix(score, *shape)
            sub = tw[r0:r0 + shape[0], c0:c0 + shape[1]].float()
            factors[s_spec.module_name(i, kind)] = svd_factors(sub, rank)
            blocks.append(SeekingBlock(i, tl, PEFT_NAMES[kind], r0, c0))
    return factors, blocks


def seeking_init(teacher: nn.Module, student: nn.Module, rank: int = 16, kinds=("up", "down"),
                 block: str = "max_abs", layer_map: list[int] | None = None,
                 sensitivity: dict[str, torch.Tensor] | None = None):
    """Seeking LoRA init of ``student`` (mutated in place) from ``seeking_factors``, built with the project's
    ``pkt.align.lora_init.make_lora_model`` (α = r, base ← W − BA). Returns (peft model, blocks)."""
    from pkt.align.lora_init import make_lora_model

    factors, blocks = seeking_factors(teacher, student, rank, kinds, block, layer_map, sensitivity)
    model = make_lora_model(student, "seeking", kinds=tuple(kinds), r=rank, alpha=rank, dropout=0.0,
                            factors=factors)
    return model, blocks
