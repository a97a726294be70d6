"""Differentiable injection of translated vectors into located rows/columns of a stock transformers model.

What: a *delta* is a set of student rows (q, k, v, gate, up: output features) or columns (o, down: input
features) of one projection plus the vectors to add there. The effective weight is ``W + Δ`` with Δ zero
everywhere else (the reference adds, it does not replace). Two ways to apply it:

* :class:`Injector`: forward hooks on the stock ``nn.Linear`` modules that add ``F.linear(x, Δ)``
  computed sparsely (``x @ V.T`` scattered into the located output rows, or ``x[..., cols] @ V``). The
  weights are untouched and the values may carry autograd history, so the LM loss back-propagates into
  the hypernetwork that produced them. No forked modeling file; works with any module named by ArchSpec.
* :func:`fuse`: add Δ into the weights (in fp32, then cast back) and :func:`save_fused` writes a standard
  HF checkpoint (:func:`fused`: fused for the length of a block, the weights restored after it). The
  reference stored Δ as a plain attribute and ``save_pretrained`` silently wrote the
  unmodified student (docs/methods.md §7.1 item 1); here the saved weights really contain the injection, and
  the deltas themselves are saved next to them (``laten_deltas.safetensors``) for auditing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from pkt.errors import PktError
from pkt.io import atomic_dir, write_json
from pkt.models.arch import ArchSpec, unwrap

ROW_KINDS = ("q", "k", "v", "gate", "up")  # Δ lives in output rows: vectors have length in_features
COL_KINDS = ("o", "down")  # Δ lives in input columns: vectors have length out_features

# (student layer, module kind) -> (indices [n] (long, unique), values [n, d_student])
Deltas = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def axis(kind: str) -> int:
    """0 when a located neuron of this module is a weight row, 1 when it is a column."""
    if kind in ROW_KINDS:
        return 0
    if kind in COL_KINDS:
        return 1
    raise PktError(f"cannot inject into module kind {kind!r}; expected one of {', '.join(ROW_KINDS + COL_KINDS)}")


def check_deltas(model, deltas: Deltas, spec: ArchSpec | None = None) -> None:
    spec = spec or ArchSpec.from_model(model)
    for (layer, kind), (idx, val) in deltas.items():
        if not 0 <= layer < spec.num_layers:
            raise PktError(f"delta for layer {layer}: the model has {spec.num_layers} layers")
        out_f, in_f = spec.weight_shape(kind)
        n_axis, vec_len = (out_f, in_f) if axis(kind) == 0 else (in_f, out_f)
        if idx.dim() != 1 or val.shape != (idx.numel(), vec_len):
            raise PktError(f"delta {kind}@{layer}: values {tuple(val.shape)} for {idx.numel()} indices, "
                           f"expected ({idx.numel()}, {vec_len})")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_axis):
            raise PktError(f"delta {kind}@{layer}: index out of range 0..{n_axis - 1}")
        if torch.unique(idx).numel() != idx.numel():
            raise PktError(f"delta {kind}@{layer}: duplicate indices (each row/column gets one vector)")


class Injector:
    """Forward hooks adding sparse deltas to stock projections; a context manager.

    ``set(deltas)`` may be called between forward passes (e.g. once per training step) without
    re-registering hooks. Values are cast to the activation dtype inside the hook.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = unwrap(model)
        self.spec = spec or ArchSpec.from_model(self.model)
        self.deltas: Deltas = {}
        self._handles: list = []

    def set(self, deltas: Deltas, check: bool = True) -> "Injector":
        if check:
            check_deltas(self.model, deltas, self.spec)
        new_keys = set(deltas) != set(self.deltas)
        self.deltas = dict(deltas)
        if self._handles and new_keys:
            self.detach()
            self.attach()
        return self

    def _hook(self, key):
        row = axis(key[1]) == 0

        def hook(mod, args, out):
            if key not in self.deltas:
                return out
            idx, val = self.deltas[key]
            # the output is where the module ran; the hook sees the input as passed in, before an
            # accelerate hook (device_map) moved it there
            x = args[0].to(out.device)
            val = val.to(dtype=x.dtype, device=x.device)
            idx = idx.to(x.device)
            if row:  # rows idx of Δ are val: (x @ Δ.T)[..., idx] = x @ val.T
                return out.index_add(-1, idx, x @ val.T)
            return out + x.index_select(-1, idx) @ val  # columns idx of Δ are val.T

        return hook

    def attach(self) -> "Injector":
        if self._handles:
            return self
        for key in self.deltas:
            mod = self.spec.linear(self.model, *key)
            self._handles.append(mod.register_forward_hook(self._hook(key)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()


def dense(spec: ArchSpec, kind: str, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """The full Δ matrix (fp32) of one delta: zero except the located rows/columns."""
    d = torch.zeros(spec.weight_shape(kind), dtype=torch.float32)
    if axis(kind) == 0:
        d[idx] = val.detach().float().cpu()
    else:
        d[:, idx] = val.detach().float().cpu().T
    return d


@torch.no_grad()
def fuse(model: nn.Module, deltas: Deltas, spec: ArchSpec | None = None) -> None:
    """W <- W + Δ in place, added in fp32 then cast back to the weight's dtype.

    Not for a model whose weights accelerate offloaded (``device_map`` with ``"disk"``, or ``"cpu"`` next
    to a GPU): accelerate reloads them from its offload store for every forward and has no API to write
    them back, so a fused value would be dropped. That is an error, named before anything is changed;
    :class:`Injector` (hooks, weights untouched) works on such a model.
    """
    from accelerate.utils import has_offloaded_params

    model = unwrap(model)
    spec = spec or ArchSpec.from_model(model)
    check_deltas(model, deltas, spec)
    for layer, kind in deltas:
        if has_offloaded_params(spec.linear(model, layer, kind)):
            raise PktError(f"cannot fuse into {spec.module_name(layer, kind)}: its weights are offloaded by "
                           "accelerate (device_map 'disk'/'cpu' offload); load the student without offloading "
                           "to fuse or save it, or apply the deltas with Injector")
    for (layer, kind), (idx, val) in deltas.items():
        w = spec.linear(model, layer, kind).weight
        new = w.detach().float().cpu()
        idx = idx.cpu()
        if axis(kind) == 0:
            new[idx] += val.detach().float().cpu()
        else:
            new[:, idx] += val.detach().float().cpu().T
        w.copy_(new.to(device=w.device, dtype=w.dtype))


@contextlib.contextmanager
def fused(model: nn.Module, deltas: Deltas, spec: ArchSpec | None = None):
    """:func:`fuse` for the duration of a block, then every touched weight back as it was, bit for bit: one
    loaded student scores many injections in turn (each measured on the fused weights, as a saved checkpoint
    would be) without re-loading it."""
    model = unwrap(model)
    spec = spec or ArchSpec.from_model(model)
    weights = [spec.linear(model, layer, kind).weight for layer, kind in deltas]
    saved = [w.detach().clone() for w in weights]
    try:
        fuse(model, deltas, spec)
        yield model
    finally:
        with torch.no_grad():
            for w, old in zip(weights, saved):
                w.copy_(old)


def save_deltas(deltas: Deltas, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for (layer, kind), (idx, val) in sorted(deltas.items()):
        tensors[f"layers.{layer}.{kind}.index"] = idx.detach().cpu().long().clone()  # up and down share indices
        tensors[f"layers.{layer}.{kind}.values"] = val.detach().cpu().float().clone()
    save_file(tensors, str(path))


def load_deltas(path: str | Path) -> Deltas:
    from safetensors.torch import load_file

    raw = load_file(str(path))
    out: Deltas = {}
    for name in raw:
        if name.endswith(".index"):
            _, layer, kind, _ = name.split(".")
            out[(int(layer), kind)] = (raw[name], raw[name[: -len("index")] + "values"])
    return out


def save_fused(model: nn.Module, tokenizer, deltas: Deltas, out: str | Path, manifest: dict | None = None,
               spec: ArchSpec | None = None) -> Path:
    """Fuse ``deltas`` into ``model`` (in place) and write an ordinary HF checkpoint directory atomically."""
    model = unwrap(model)
    fuse(model, deltas, spec)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_deltas(deltas, tmp / "laten_deltas.safetensors")
        write_json(tmp / "pkt-laten.json", manifest or {})
    return out


@torch.no_grad()
def delta_stats(student, deltas: Deltas, spec: ArchSpec) -> dict:
    """Size of the injection relative to the weights it lands on, overall and per module kind.

    ``rel_norm`` = ‖Δ‖_F / ‖W_located‖_F over the located rows/columns only (so it does not shrink with
    the transfer rate); ``bf16_ratio`` = ‖Δ‖_F / ‖r‖_F with r the bf16 rounding resolution of each located
    weight (half its bf16 ulp): below 1 the injection is smaller than what casting the student to bf16
    already moves; ``bf16_changed`` = share of the located weights whose bf16 value W + Δ differs from W's
    (0 means a student evaluated in bf16 is exactly the vanilla one; weights lying on a bf16 rounding tie,
    common in dequantized checkpoints, flip with any Δ, so read it with ``bf16_ratio``); ``rms`` = RMS of
    Δ's entries.
    """
    acc: dict[str, list[float]] = {}
    for (layer, kind), (idx, val) in deltas.items():
        w = spec.linear(student, layer, kind).weight.detach().float().cpu()
        idx = idx.cpu()
        loc = w[idx] if axis(kind) == 0 else w[:, idx].T  # [n, d], rows as the values are laid out
        v = val.detach().float().cpu()
        changed = ((loc + v).bfloat16() != loc.bfloat16()).sum().item()
        # |w| = m·2^e with m in [0.5, 1): bf16 keeps 8 significant bits, so its ulp there is 2^(e-8)
        half_ulp = torch.where(loc == 0, 0.0, torch.ldexp(torch.ones_like(loc), torch.frexp(loc).exponent - 9))
        a = acc.setdefault(kind, [0.0, 0.0, 0.0, 0, 0.0])
        a[0] += float(v.pow(2).sum())
        a[1] += float(loc.pow(2).sum())
        a[2] += changed
        a[3] += v.numel()
        a[4] += float(half_ulp.pow(2).sum())

    def row(d2, w2, ch, n, r2):
        return {"rel_norm": (d2 / w2) ** 0.5 if w2 > 0 else float("nan"),
                "bf16_ratio": (d2 / r2) ** 0.5 if r2 > 0 else float("nan"), "bf16_changed": ch / max(n, 1),
                "rms": (d2 / max(n, 1)) ** 0.5}

    per_kind = {k: row(*a) for k, a in sorted(acc.items())}
    total = [sum(a[i] for a in acc.values()) for i in range(5)]
    return {**row(*total), "per_kind": per_kind}
