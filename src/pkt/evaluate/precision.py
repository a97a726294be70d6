"""Evaluate a built model in a dtype that keeps what the method changed.

A transferred model (merged LoRA, LaTen's fused checkpoint) differs from the student by a delta that can
be smaller than the resolution of the evaluation dtype: bf16 keeps 8 significant bits, so a change below
about 2^-9 of a weight's magnitude rounds back to the student's value and the evaluation measures the
student. :func:`surviving` compares the checkpoint with the student entry by entry, streaming both
safetensors files tensor by tensor (no model is built), and counts how many changed entries still differ
after both are cast to the evaluation dtype. :func:`choose_dtype` keeps the requested dtype when at least
``min_surviving`` of them survive and falls back to float32 otherwise; the caller records the dtype used
next to every result.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pkt.errors import ModelError


def _weight_files(ref: str) -> dict[str, Path]:
    """{tensor name: safetensors file} of a model reference (embedded name, local directory or hub id)."""
    import json

    from pkt.models.load import resolve

    path = Path(resolve(ref))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(ref), allow_patterns=["*.safetensors", "*.json"]))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"model {ref!r}: no safetensors weights in {path} (needed to compare with the student)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def surviving(model_ref: str, reference_ref: str, dtype: str | torch.dtype) -> dict:
    """Entries of ``model_ref`` that differ from ``reference_ref`` in float32, and how many of them still
    differ once both are cast to ``dtype``. Tensors are matched by name and shape."""
    from safetensors import safe_open

    from pkt.models.load import parse_dtype

    dt = parse_dtype(dtype)
    mine, ref = _weight_files(model_ref), _weight_files(reference_ref)
    changed = kept = compared = 0
    handles: dict = {}

    def tensor(files: dict, name: str) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt").__enter__()
        return handles[f].get_tensor(name)

    try:
        for name in sorted(mine):
            if name not in ref:
                continue
            a, b = tensor(mine, name), tensor(ref, name)
            if a.shape != b.shape or not a.is_floating_point():
                continue
            compared += 1
            a32, b32 = a.float(), b.float()
            diff = a32 != b32
            n = int(diff.sum())
            if n:
                changed += n
                kept += int(((a32.to(dt) != b32.to(dt)) & diff).sum())
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return {"dtype": str(dt).removeprefix("torch."), "tensors": compared, "changed": changed, "surviving": kept,
            "fraction": kept / changed if changed else None}


def choose_dtype(model_ref: str, reference_ref: str, dtype: str, min_surviving: float) -> tuple[str, dict]:
    """(dtype to evaluate in, survival report): ``dtype`` unless fewer than ``min_surviving`` of the changed
    entries survive it, then float32."""
    report = surviving(model_ref, reference_ref, dtype)
    frac = report["fraction"]
    used = "float32" if frac is not None and frac < min_surviving else dtype
    report.update(requested=dtype, used=used, min_surviving=min_surviving,
                  fallback=used != dtype)
    return used, report
