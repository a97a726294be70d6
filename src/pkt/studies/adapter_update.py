"""How far fine-tuning moved the student: the norm of a saved adapter's update ΔW against the base weights W.

    pkt study adapter-update --base ~/.cache/pkt/models/qwen2.5-coder-0.5b-instruct \\
        runs/cpu-study-dropout0/stages/{lora,pissa,seeking}-humaneval-s*

A fine-tuning stage saves ``run/adapter``: a peft LoRA whose product is the whole change to the base model. For
LoRA that is the trained BA; for a non-zero init (PiSSA, Seeking) pkt saves peft's converted adapter, whose
product is the trained BA minus the initial one, so every arm's ΔW is measured from the same student. The same
optimizer, learning rate and steps move a non-zero adapter's product further: a step changes BA by about
ΔB·A + B·ΔA, Adam moves each factor by about the learning rate whatever its gradient's scale, and B starts at
zero in LoRA but large in PiSSA or Seeking. This prints, per stage, ‖ΔW‖/‖W‖ over all
adapted matrices and per projection (square roots of summed squares), so that arms are compared by the size of
their update, not only by its result.

:func:`merged_update_norms` measures the same change from the weights themselves: the merged checkpoint minus the
student, over the matrices an adapter covers (``pkt study pilot`` uses it for PiSSA and Seeking, whose init rewrites
W as W − B₀A₀: what reached the evaluated model is the merged checkpoint, whatever peft's conversion saved), and
:func:`update_norms` of a run's ``adapter_init/`` gives the init's own ‖B₀A₀‖/‖W‖, its size at step 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

PREFIX = "base_model.model."


def adapter_dir(path: Path) -> Path:
    """A stage directory, its run/ or the adapter itself."""
    for cand in (path / "run" / "adapter", path / "adapter", path):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise SystemExit(f"{path}: no adapter_config.json in it, its adapter/ or its run/adapter/")


def base_tensors(base: Path):
    """{name: safe_open handle} over the base model's safetensors shards, read one tensor at a time."""
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{base}: no *.safetensors (give the base model's directory with --base)")
    where = {}
    for f in files:
        h = safe_open(str(f), framework="pt")
        for k in h.keys():
            where[k] = h
    return where


def update_norms(adapter: Path, base: dict) -> dict[str, tuple[float, float]]:
    """{base weight name: (‖ΔW‖_F², ‖W‖_F²)} for every matrix the adapter changes."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise SystemExit(f"{adapter}: per-module ranks or alphas are not supported")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key_a, a in weights.items():
        if not key_a.endswith(".lora_A.weight"):
            continue
        b = weights[key_a.replace(".lora_A.", ".lora_B.")]
        name = key_a.removeprefix(PREFIX).replace(".lora_A.weight", ".weight")
        if name not in base:
            raise SystemExit(f"{adapter}: {name} is not a weight of the base model")
        w = base[name].get_tensor(name).float()
        delta = scale * (b.float() @ a.float())
        if delta.shape != w.shape:
            raise SystemExit(f"{adapter}: {name}: update {tuple(delta.shape)} against weight {tuple(w.shape)}")
        out[name] = (float(delta.pow(2).sum()), float(w.pow(2).sum()))
    if not out:
        raise SystemExit(f"{adapter}: the adapter holds no lora_A/lora_B pair")
    return out


def merged_update_norms(merged: Path, base: dict, adapter: Path) -> dict[str, tuple[float, float]]:
    """{base weight name: (‖M − W‖_F², ‖W‖_F²)} of a merged checkpoint M against the base W, for every matrix the
    adapter (any of a run's adapters: only its module names are read) covers."""
    from pkt.errors import PktError

    names = sorted(k.removeprefix(PREFIX).replace(".lora_A.weight", ".weight")
                   for k in load_file(str(adapter / "adapter_model.safetensors")) if k.endswith(".lora_A.weight"))
    if not names:
        raise PktError(f"{adapter}: the adapter holds no lora_A/lora_B pair")
    built = base_tensors(merged)
    out = {}
    for name in names:
        if name not in base or name not in built:
            raise PktError(f"{merged}: {name} is not a weight of both the merged checkpoint and the base model")
        w, m = base[name].get_tensor(name).float(), built[name].get_tensor(name).float()
        if m.shape != w.shape:
            raise PktError(f"{merged}: {name}: {tuple(m.shape)} against the base's {tuple(w.shape)}")
        out[name] = (float((m - w).pow(2).sum()), float(w.pow(2).sum()))
    return out


def summarise(norms: dict[str, tuple[float, float]]) -> dict[str, float]:
    """‖ΔW‖/‖W‖ over all matrices ("all") and per projection (q_proj, up_proj, ...)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (d2, w2) in norms.items():
        for group in ("all", name.split(".")[-2]):
            sums[group][0] += d2
            sums[group][1] += w2
    return {g: math.sqrt(d2 / w2) for g, (d2, w2) in sums.items()}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("stages", type=Path, nargs="+", help="fine-tuning stage directories (or their run/adapter)")
    ap.add_argument("--base", type=Path, required=True, help="the base model's directory (its safetensors)")
    args = ap.parse_args(argv)
    base = base_tensors(args.base)
    rows = [(p.name, summarise(update_norms(adapter_dir(p), base))) for p in args.stages]
    groups = sorted({g for _, s in rows for g in s} - {"all"})
    print("‖ΔW‖/‖W‖ in percent, over the adapted matrices (all) and per projection")
    print("")
    print("| stage | all | " + " | ".join(groups) + " |")
    print("|---|---:|" + "---:|" * len(groups))
    for name, s in rows:
        print(f"| {name} | {100 * s['all']:.3f} | " + " | ".join(
            f"{100 * s[g]:.3f}" if g in s else "–" for g in groups) + " |")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
