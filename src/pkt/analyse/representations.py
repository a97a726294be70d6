"""Representation ("ethological") similarity between teacher and student layers.

Both models read the same task inputs (same tokenizer, checked). Forward hooks on stock modules collect,
per layer, the outputs of ``up_proj``, ``down_proj``, ``v_proj``, ``o_proj`` and the residual stream
(the embedding output plus every decoder layer's output: ``L+1`` states, as ``output_hidden_states``
except that the last one is taken *before* the final norm). Tokens are the samples: the response
tokens (or all tokens) of N examples, concatenated and subsampled to ``max_tokens`` with a seed.

Every teacher-layer × student-layer pair is scored with linear CKA, debiased linear CKA and RSA (see
:mod:`pkt.analyse.similarity`); each layer is reduced once to n×n-sized unit vectors, so pairs of very
different widths (8960 vs 4864) cost one dot product. Matrices are ``[student_layer, teacher_layer]``.

Memory: activations are kept in the model's dtype (Qwen2.5 1.5B, all five kinds, 2048 tokens, bf16:
≈1.6 GB); the per-layer vectors of one module kind at a time take ≈24 MB per layer at 2048 tokens.
Activations are gathered on each module's own device and moved to the CPU, so a model spread over devices
or offloaded by accelerate (a ``device_map``) gives the same result as on one device.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from pkt.analyse.similarity import MEASURES, layer_vectors, pairwise
from pkt.data.chat import IGNORE, tokenize_example
from pkt.errors import PktError
from pkt.models.arch import ArchSpec
from pkt.models.load import module_device

KINDS = ("up", "down", "v", "o", "residual")
KIND_LABELS = {"up": "mlp.up_proj", "down": "mlp.down_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "residual": "residual stream"}
# The paper's representation heat-maps (docs/methods.md §3.2), Llama-2 13B → 7B.
PAPER_MEANS = {"up": (0.691, 0.156), "down": (0.450, 0.245), "v": (0.479, 0.162), "o": (0.411, 0.188)}


@dataclass(frozen=True)
class RepConfig:
    kinds: tuple[str, ...] = ("up", "down", "v", "o", "residual")
    measures: tuple[str, ...] = MEASURES
    tokens: str = "response"  # "response" | "all"
    max_tokens: int = 2048
    seed: int = 0
    batch_size: int = 4
    style: str = "chat"
    max_length: int = 1024
    compute_dtype: str = "float32"  # n×n products; float64 for exactness on small n

    def check(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise PktError(f"unknown module kind(s) {bad}; expected some of {', '.join(KINDS)}")
        bad = [m for m in self.measures if m not in MEASURES]
        if bad:
            raise PktError(f"unknown measure(s) {bad}; expected some of {', '.join(MEASURES)}")
        if self.tokens not in ("response", "all"):
            raise PktError(f"tokens {self.tokens!r}: expected 'response' or 'all'")
        if self.max_tokens < 4:
            raise PktError("max_tokens must be at least 4")


@dataclass
class TokenPlan:
    """Tokenised inputs and, per example, the positions that are samples."""

    features: list[dict]
    positions: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(p) for p in self.positions))


def plan_tokens(examples, tokenizer, cfg: RepConfig = RepConfig()) -> TokenPlan:
    """Tokenise the examples and choose the sample tokens (seeded subsample of the pool, in order)."""
    feats = [tokenize_example(e, tokenizer, cfg.style, cfg.max_length) for e in examples]
    pool = []  # (example, position)
    for i, f in enumerate(feats):
        for t, lab in enumerate(f["labels"]):
            if cfg.tokens == "all" or lab != IGNORE:
                pool.append((i, t))
    if len(pool) < 4:
        raise PktError(f"only {len(pool)} sample tokens in {len(examples)} examples; need at least 4")
    if len(pool) > cfg.max_tokens:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(pool), generator=g)[: cfg.max_tokens].sort().values.tolist()
        pool = [pool[k] for k in keep]
    positions = [[] for _ in feats]
    for i, t in pool:
        positions[i].append(t)
    return TokenPlan(feats, [torch.tensor(p, dtype=torch.long) for p in positions])


def _batches(plan: TokenPlan, batch_size: int, pad_id: int):
    """Right-padded batches (plain forward passes need no left padding) of examples with samples."""
    idx = [i for i, p in enumerate(plan.positions) if len(p)]
    for s in range(0, len(idx), batch_size):
        chunk = idx[s: s + batch_size]
        width = max(len(plan.features[i]["input_ids"]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        b_idx, t_idx = [], []
        for b, i in enumerate(chunk):
            seq = plan.features[i]["input_ids"]
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            b_idx.append(torch.full((len(plan.positions[i]),), b, dtype=torch.long))
            t_idx.append(plan.positions[i])
        yield ids, mask, torch.cat(b_idx), torch.cat(t_idx)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect_activations(model: nn.Module, plan: TokenPlan, kinds=KINDS, batch_size: int = 4, pad_id: int = 0,
                        progress: Callable | None = None) -> dict[str, list[torch.Tensor]]:
    """Per kind, a list over layers of ``[n_tokens, width]`` activations at the planned tokens."""
    spec = ArchSpec.from_model(model)
    store: dict[str, list[list[torch.Tensor]]] = {}
    where: dict[str, torch.Tensor] = {}
    handles = []

    def hook(kind: str, layer: int):
        def fn(_mod, _inp, out):
            h = _first(out)
            # under a device_map each layer's output is on that layer's device
            store[kind][layer].append(h[where["b"].to(h.device), where["t"].to(h.device)].detach().cpu())
        return fn

    try:
        for kind in kinds:
            if kind == "residual":
                mods = [spec.embed(model)] + list(spec.layers(model))
            else:
                mods = [spec.linear(model, i, kind) for i in range(spec.num_layers)]
            store[kind] = [[] for _ in mods]
            handles += [m.register_forward_hook(hook(kind, j)) for j, m in enumerate(mods)]
        # inputs go where the embedding runs (its parameters are on meta if accelerate offloaded it)
        device = module_device(model.get_input_embeddings())
        batches = list(_batches(plan, batch_size, pad_id))
        for ids, mask, b, t in (progress(batches) if progress else batches):
            where["b"], where["t"] = b, t
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: [torch.cat(chunks) for chunks in layers] for k, layers in store.items()}


def compare_activations(teacher_acts: dict[str, list[torch.Tensor]], student_acts: dict[str, list[torch.Tensor]],
                        measures=MEASURES, compute_dtype: torch.dtype = torch.float32,
                        progress: Callable | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per kind and measure, the ``[student_layer, teacher_layer]`` score matrix (float64).

    Consumes the activation lists kind by kind (they are freed as their vectors are built).
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    kinds = [k for k in teacher_acts if k in student_acts]
    for kind in (progress(kinds) if progress else kinds):
        tv = [layer_vectors(x, measures, compute_dtype=compute_dtype) for x in teacher_acts[kind]]
        sv = [layer_vectors(x, measures, compute_dtype=compute_dtype) for x in student_acts[kind]]
        out[kind] = {m: pairwise([v[m] for v in sv], [v[m] for v in tv]) for m in measures}
        del tv, sv
    return out


def proportional_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher index at the same relative depth as each student index."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _stats(vals: list[float]) -> dict:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def summarise_matrix(mat: torch.Tensor) -> dict:
    """Mean/std over all cells and over the paper's filled cells (teacher index ≥ student index), and the
    diagonal path: per student layer the proportional-depth teacher layer and the best-matching one."""
    ns, nt = mat.shape
    m = mat.tolist()
    prop = proportional_map(ns, nt)
    best = [max(range(nt), key=lambda j: (m[i][j] if not math.isnan(m[i][j]) else -math.inf)) for i in range(ns)]
    return {
        "all": _stats([v for row in m for v in row]),
        "teacher_ge_student": _stats([m[i][j] for i in range(ns) for j in range(nt) if j >= i]),
        "diagonal": {
            "proportional_teacher": prop,
            "proportional_scores": [m[i][prop[i]] for i in range(ns)],
            "proportional_mean": _stats([m[i][prop[i]] for i in range(ns)])["mean"],
            "best_teacher": best,
            "best_scores": [m[i][best[i]] for i in range(ns)],
            "best_mean": _stats([m[i][best[i]] for i in range(ns)])["mean"],
            "mean_abs_offset": statistics.fmean(abs(b - p) for b, p in zip(best, prop)),
            "best_within_2_of_proportional": sum(abs(b - p) <= 2 for b, p in zip(best, prop)) / ns,
            "best_monotone": all(best[i] <= best[i + 1] for i in range(ns - 1)),
        },
    }


def _load(ref):
    return ref() if callable(ref) and not isinstance(ref, nn.Module) else ref


def representation_similarity(teacher, student, tokenizer, examples, cfg: RepConfig = RepConfig(),
                              progress: Callable | None = None, log: Callable = lambda s: None) -> dict:
    """The whole analysis. ``teacher``/``student`` are models or zero-argument loaders; loaders are called
    one at a time and their model is dropped after its pass (peak memory = one model + activations).

    Returns a JSON-ready dict: config, token count, layer counts, and per kind and measure the matrix
    and its summary.
    """
    cfg.check()
    plan = plan_tokens(examples, tokenizer, cfg)
    log(f"{len(examples)} examples, {plan.n_tokens} sample tokens ({cfg.tokens})")
    cdtype = {"float32": torch.float32, "float64": torch.float64}[cfg.compute_dtype]
    acts = {}
    for role, ref in (("teacher", teacher), ("student", student)):
        model = _load(ref)
        log(f"collecting {role} activations")
        acts[role] = collect_activations(model, plan, cfg.kinds, cfg.batch_size, tokenizer.pad_token_id,
                                         progress=(lambda it, r=role: progress(it, desc=f"{r} forward"))
                                         if progress else None)
        if model is not ref:
            del model
    layers = {r: {k: len(v) for k, v in a.items()} for r, a in acts.items()}
    log("scoring all teacher-layer x student-layer pairs")
    mats = compare_activations(acts["teacher"], acts["student"], cfg.measures, cdtype,
                               progress=(lambda it: progress(it, desc="similarity")) if progress else None)
    return {
        "config": asdict(cfg),
        "n_examples": len(examples),
        "n_tokens": plan.n_tokens,
        "layers": layers,
        "orientation": "matrix[student_layer][teacher_layer]",
        "modules": {k: {m: {"matrix": mat.tolist(), "summary": summarise_matrix(mat)} for m, mat in per.items()}
                    for k, per in mats.items()},
    }
