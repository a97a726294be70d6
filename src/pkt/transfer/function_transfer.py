"""Function transfer: the teacher's task vector moved into the student through what its layers compute.

Teacher and student weights share no basis, but each student layer's outputs resemble a teacher layer's
(docs/methods.md §9). So the update is not copied coordinate by coordinate; its *effect* on calibration
activations is reproduced in closed form (docs/methods.md §9.2):

1. Teacher and student (float32, no grad) read the same token ids; forward hooks collect every target
   projection's input X and output Y, and each decoder layer's residual stream.
2. Each student layer l is paired with a teacher layer m(l): by linear CKA of the residual streams after the
   layers (``pairing="cka"``, by default the best non-decreasing assignment, ``monotone``), at the same
   relative depth (``"depth"``), or the null ``"shuffled"``: the CKA pairing under a seeded derangement of
   the student layers.
3. Per projection p of student layer l, the teacher's update effect ``E = X_t ΔW_tᵀ`` (tokens × d_out_t) is
   carried into the student's output space by a linear map M (d_out_t × d_out_s) fitted on the centred
   calibration outputs, ``Y_s ≈ Y_t M`` (for gate and up, on the FFN neurons' activations: :data:`SPACE`):
   ridge least squares (``output_map="ridge"``) or the semi-orthogonal Procrustes factor (``"procrustes"``). Then ``ΔW_sᵀ = (X_sᵀX_s + λI)⁻¹ X_sᵀ E M``, the ridge solution of
   ``min ‖X_s ΔW_sᵀ − E M‖² + λ‖ΔW_s‖²``, with λ = ``ridge`` × tr(X_sᵀX_s)/d_in (likewise ``map_ridge`` for M).
   ``rank`` optionally truncates ΔW_s by SVD; the default keeps it full rank (merged into the weights).

Every fit is a ridge regression on the n calibration tokens, so it can be solved in the token space: by the
push-through identity (XᵀX + λI)⁻¹Xᵀ = Xᵀ(XXᵀ + λI)⁻¹ an n × n factorisation replaces a width × width one
(:mod:`pkt.transfer.transfer_solve`). With few tokens (a few hundred to several thousand) the activations
themselves are kept (float32) and each Gram is factorised in the smaller form; with many, only float64
sufficient statistics (X_sᵀX_s, X_sᵀE, Y_tᵀY_t, Y_tᵀY_s and the means), whose size does not grow with the
tokens, and the primal form (:func:`solve_in_tokens` decides). Either way the student layers are split into
passes (one forward of each model per sequence and pass) whose matrices fit in ``max_stat_gib``.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field

from pkt.transfer.transfer_solve import OutputMap, TokenRidge, primal_map, ridge_solve, token_map, use_dual
from pkt.config import Settings
from pkt.errors import PktError
from pkt.models.arch import LINEAR_KINDS, ArchSpec

# projections that read the same input share one X_sᵀX_s
INPUT_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
# the output space whose teacher → student map carries a projection's effect: its own output, except gate and
# up, which write d_ff > d_model outputs that the model only excites in a d_model-dimensional subspace (a map
# fitted there is unidentified off it); theirs is the FFN neurons' activations, down's input, indexed by the
# same neurons and of full rank through the nonlinearity
SPACE = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "ffn", "up": "ffn", "down": "down"}
# the projection whose input stands for its input group's (in the token space: hooked whichever kinds move)
GROUP_REP = {"attn": "q", "o": "o", "mlp": "gate", "down": "down"}
TaskVector = dict[tuple[int, str], torch.Tensor]  # (layer, kind) -> ΔW [d_out, d_in]


class TransferConfig(Settings):
    """How the update is transferred (docs/methods.md §9.2 gives the reasons for the defaults)."""

    pairing: Literal["cka", "shuffled", "depth"] = "cka"
    monotone: bool = True  # CKA pairing: the best non-decreasing assignment (else each layer's own argmax)
    output_map: Literal["ridge", "procrustes"] = "ridge"
    map_ridge: float = Field(1e-2, gt=0)  # relative to tr(Y_tᵀY_t)/d_out_t (centred)
    ridge: float = Field(1e-2, gt=0)  # relative to tr(X_sᵀX_s)/d_in_s
    rank: int | None = Field(None, ge=1)
    cka_tokens: int = Field(2048, ge=4)  # tokens (seeded subsample) the layer CKA is computed on
    max_stat_gib: float = Field(4.0, gt=0)
    seed: int = 0  # the CKA subsample and the shuffled pairing's derangement


# ---- pairing ---------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_cka(teacher, student, sequences: list[torch.Tensor], max_tokens: int, seed: int = 0) -> torch.Tensor:
    """Linear CKA [student layer, teacher layer] of the residual streams after each decoder layer, on the
    same tokens of both models (all tokens of the sequences, a seeded subsample of ``max_tokens``)."""
    from pkt.analyse.representations import TokenPlan, collect_activations, compare_activations

    pool = [(i, t) for i, s in enumerate(sequences) for t in range(len(s))]
    if len(pool) < 4:
        raise PktError(f"function transfer: {len(pool)} calibration tokens; the layer CKA needs at least 4")
    if len(pool) > max_tokens:
        keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:max_tokens].sort().values
        pool = [pool[k] for k in keep.tolist()]
    positions = [[t for i, t in pool if i == j] for j in range(len(sequences))]
    plan = TokenPlan([{"input_ids": s.tolist()} for s in sequences], [torch.tensor(p, dtype=torch.long)
                                                                      for p in positions])
    acts = [collect_activations(m, plan, kinds=("residual",), batch_size=1) for m in (teacher, student)]
    mat = compare_activations(acts[0], acts[1], measures=("cka",), compute_dtype=torch.float64)["residual"]["cka"]
    return mat[1:, 1:]  # index 0 is the embedding output


def monotone_pairing(score: torch.Tensor) -> list[int]:
    """The non-decreasing map student layer → teacher layer maximising the summed score (dynamic programme)."""
    best, back = score[0].clone(), []
    for row in score[1:]:
        prefix, arg = torch.cummax(best, dim=0)
        back.append(arg)
        best = row + prefix
    path = [int(best.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def shuffled_pairing(base: list[int], seed: int, tries: int = 1000) -> tuple[list[int], list[int]]:
    """(pairing, permutation): ``base[perm[l]]`` for a seeded derangement perm of the student layers, the first
    of ``tries`` derangements under which no layer keeps its teacher layer (else the first one drawn)."""
    from pkt.draws import derangement

    first = None
    for k in range(tries):
        perm = derangement(len(base), seed * 7919 + k)
        first = first or perm
        if all(base[p] != base[i] for i, p in enumerate(perm)):
            return [base[p] for p in perm], perm
    return [base[p] for p in first], first


def pair_layers(cka: torch.Tensor, cfg: TransferConfig) -> tuple[list[int], dict]:
    """Teacher layer of each student layer, and what the record keeps of how it was chosen."""
    from pkt.analyse.representations import proportional_map

    n_s, n_t = cka.shape
    best = monotone_pairing(cka) if cfg.monotone else [int(i) for i in cka.argmax(1)]
    info: dict = {"pairing": cfg.pairing, "monotone": cfg.monotone, "cka_pairing": best}
    if cfg.pairing == "depth":
        pairing = proportional_map(n_s, n_t)
    elif cfg.pairing == "shuffled":
        pairing, info["derangement"] = shuffled_pairing(best, cfg.seed)
        info["moved"] = sum(a != b for a, b in zip(pairing, best))  # all, unless a teacher layer repeats
    else:
        pairing = best
    info["teacher_layers"] = pairing
    info["pair_cka"] = [round(float(cka[l, m]), 4) for l, m in enumerate(pairing)]
    return pairing, info


# ---- task vectors ----------------------------------------------------------------------------------------
def task_vector_from_adapter(teacher, adapter_dir) -> tuple[TaskVector, object]:
    """(ΔW = the adapter's own delta per teacher projection, the teacher without the adapter): peft computes
    each delta (its scaling, rsLoRA or not), then the adapter is removed."""
    from pathlib import Path

    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise PktError(f"{adapter_dir}: no LoRA adapter there (adapter_config.json), the teacher's task vector "
                       "is read from a teacher-lora run's adapter/")
    model = PeftModel.from_pretrained(teacher, str(adapter_dir))
    spec = ArchSpec.from_model(model)
    tv: TaskVector = {}
    for i in range(spec.num_layers):
        for kind in LINEAR_KINDS:
            mod = spec.linear(model, i, kind)
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
                tv[(i, kind)] = mod.get_delta_weight("default").detach().float().cpu().clone()
    if not tv:
        raise PktError(f"{adapter_dir}: the adapter changes none of the teacher's projections")
    return tv, model.unload()


def random_task_vector(tv: TaskVector, seed: int) -> TaskVector:
    """The null: per projection, random orthonormal singular vectors carrying the teacher delta's own singular
    values (same rank, same Frobenius norm, no teacher direction)."""
    from pkt.draws import random_orthonormal

    gen = torch.Generator().manual_seed(seed)
    out: TaskVector = {}
    for key in sorted(tv):
        s = torch.linalg.svdvals(tv[key].double())
        r = int((s > s[0] * 1e-6).sum()) if s.numel() and s[0] > 0 else 0
        u = random_orthonormal(tv[key].shape[0], r, gen).double()
        v = random_orthonormal(tv[key].shape[1], r, gen).double()
        out[key] = ((u * s[:r]) @ v.T).float()
    return out


# ---- statistics ------------------------------------------------------------------------------------------
@torch.no_grad()
def _capture(model, spec: ArchSpec, keys, ids: torch.Tensor, dtype=torch.float64) -> dict:
    """{(layer, kind): (input, output)} of one sequence, in ``dtype`` on the CPU (copies)."""
    from pkt.models.load import module_device

    got, handles = {}, []

    def hook(key):
        def fn(_mod, args, out):
            got[key] = tuple(a[0].detach().to("cpu", dtype, copy=True) for a in (args[0], out))
        return fn

    try:
        handles = [spec.linear(model, *key).register_forward_hook(hook(key)) for key in keys]
        model(input_ids=ids.view(1, -1).to(module_device(model.get_input_embeddings())), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def _space(got: dict, layer: int, space: str) -> torch.Tensor:
    """The activations an output map is fitted on: a projection's output, or for "ffn" down's input."""
    return got[(layer, "down")][0] if space == "ffn" else got[(layer, space)][1]


def layer_stat_bytes(s: ArchSpec, t: ArchSpec, kinds, ridge_map: bool) -> int:
    """float64 bytes of one student layer's statistics."""
    widths = {k: (s.weight_shape(k), t.weight_shape(k)) for k in LINEAR_KINDS}
    n = 0
    for group in {INPUT_GROUP[k] for k in kinds}:
        d_in = widths[next(k for k in kinds if INPUT_GROUP[k] == group)][0][1]
        n += d_in * d_in
    for k in kinds:
        n += widths[k][0][1] * widths[k][1][0]  # X_sᵀE
    for space in {SPACE[k] for k in kinds}:
        o_s, o_t = (s.intermediate_size, t.intermediate_size) if space == "ffn" else \
            (widths[space][0][0], widths[space][1][0])
        n += o_t * o_s + (o_t * o_t if ridge_map else 0)
    return 8 * n


def layer_solve_flops(s: ArchSpec, t: ArchSpec, kinds, n: int | None = None) -> int:
    """Approximate flops of one student layer's solves: from statistics (``n`` None), a Cholesky factor and
    two triangular solves per width-sized Gram; in the token space (``n`` tokens), each Gram in the smaller
    of its primal and dual forms (:func:`pkt.transfer.transfer_solve.use_dual`), with the products around it."""
    total = 0
    maps = {}  # space -> (d_t, d_s): one map per space (gate and up share theirs)
    for k in kinds:
        (o_s, i_s), (o_t, i_t) = s.weight_shape(k), t.weight_shape(k)
        maps[SPACE[k]] = (t.intermediate_size, s.intermediate_size) if SPACE[k] == "ffn" else (o_t, o_s)
        if n is None:
            total += i_s ** 3 // 3 + 2 * i_s * i_s * o_s
            continue
        d_t, d_s = maps[SPACE[k]]
        total += n * i_t * o_t + 2 * n * i_s * o_s  # E = X_t ΔW_tᵀ; the effect ‖X_s ΔW_sᵀ‖²
        total += n * n * (d_t + d_s) if use_dual(n, d_t) else n * d_t * d_s  # E M
        total += 2 * n * n * o_s if use_dual(n, i_s) else 2 * i_s * i_s * o_s  # the solve's right-hand side
    for d_t, d_s in maps.values():
        d = min(d_t, n) if n is not None else d_t
        total += d ** 3 // 3 + 2 * d * d * d_s + (n * d * (d_t + d_s) if n is not None else 0)
    if n is not None:
        for group in {INPUT_GROUP[k] for k in kinds}:
            i_s = s.weight_shape(GROUP_REP[group])[1]
            d = min(i_s, n)
            total += d ** 3 // 3 + n * i_s * d  # the Gram (XXᵀ or XᵀX) and its factor
    return total


def token_entries(pairing: list[int], s_keys) -> set[tuple]:
    """The token matrices the token space keeps for the (student layer, kind) pairs ``s_keys``:
    (side "s" | "t", layer, kind, "in" | "out"); each input group's by its :data:`GROUP_REP`, each output
    space's output (for "ffn", down's input), the teacher's at the paired layer."""
    out = set()
    for l, k in s_keys:
        for side, layer in (("s", l), ("t", pairing[l])):
            out.add((side, layer, GROUP_REP[INPUT_GROUP[k]], "in"))
            out.add(_out_entry(layer, SPACE[k], side))
    return out


def _out_entry(layer: int, space: str, side: str) -> tuple:
    return (side, layer, "down", "in") if space == "ffn" else (side, layer, space, "out")


def layer_token_bytes(s: ArchSpec, t: ArchSpec, kinds, n: int) -> int:
    """float32 bytes of one student layer's token matrices on ``n`` tokens (teacher layers shared by two
    student layers counted twice)."""
    widths = {"s": s, "t": t}
    return 4 * n * sum(widths[side].weight_shape(kind)[1 if io == "in" else 0]
                       for side, _, kind, io in token_entries([0], [(0, k) for k in kinds]))


def solve_in_tokens(s: ArchSpec, t: ArchSpec, kinds, ridge_map: bool, n: int) -> bool:
    """The rule of ``solve="auto"``: keep the tokens' activations (float32, then dual wherever n is below a
    Gram's width) when they take no more memory per layer than the float64 statistics. For Qwen2.5-Coder
    1.5B → 0.5B that is up to 12,888 tokens with the ridge map (6,892 with Procrustes, which keeps no
    Y_tᵀY_t), beyond which every Gram but the 8,960-wide FFN map's is narrower than n anyway."""
    return layer_token_bytes(s, t, kinds, n) <= layer_stat_bytes(s, t, kinds, ridge_map)


def layer_passes(layers: list[int], per_layer: int, max_bytes: float) -> list[list[int]]:
    step = max(1, int(max_bytes // max(per_layer, 1)))
    return [layers[i: i + step] for i in range(0, len(layers), step)]


def _gram(d: dict, key, a: torch.Tensor, b: torch.Tensor) -> None:
    """d[key] += aᵀb, in place after the first (no second matrix of that size)."""
    if key in d:
        d[key].addmm_(a.T, b)
    else:
        d[key] = a.T @ b


def collect(teacher, student, tv: TaskVector, pairing: list[int], s_keys: list[tuple[int, str]], sequences,
            ridge_map: bool) -> tuple[dict, dict, dict]:
    """Statistics summed over the sequences, for the (student layer, kind) pairs ``s_keys`` (the teacher side
    of layer l is its layer pairing[l]): per (l, kind) X_sᵀE and ‖E‖²; per (l, output space) the output
    map's Y_tᵀY_s, Y_tᵀY_t, means, ‖Y_s‖² and token count; per (l, input group) X_sᵀX_s."""
    t_spec, s_spec = ArchSpec.from_model(teacher), ArchSpec.from_model(student)
    down = {(l, "down") for l, k in s_keys if SPACE[k] == "ffn"}  # their maps read down's input
    s_hooks = sorted(set(s_keys) | down)
    t_hooks = sorted({(pairing[l], k) for l, k in s_hooks})
    dw = {(pairing[l], k): tv[(pairing[l], k)].detach().double() for l, k in s_keys}
    stats = ({}, {}, {})
    for ids in sequences:
        accumulate(stats, _capture(teacher, t_spec, t_hooks, ids), _capture(student, s_spec, s_hooks, ids), dw,
                   pairing, s_keys, ridge_map)
    return stats


def accumulate(stats: tuple[dict, dict, dict], t_got: dict, s_got: dict, dw: TaskVector, pairing: list[int],
               s_keys, ridge_map: bool) -> None:
    """Add one sequence's activations ({(layer, kind): (input, output)} of each model, float64) to the
    statistics (eff, maps, gram) of :func:`collect`."""
    eff, maps, gram = stats
    for l in sorted({l for l, _ in s_keys}):
        kinds = [k for ll, k in s_keys if ll == l]
        for group in {INPUT_GROUP[k] for k in kinds}:  # q, k and v read one input: one Gram matrix
            xs = s_got[(l, next(k for k in kinds if INPUT_GROUP[k] == group))][0]
            _gram(gram, (l, group), xs, xs)
        for space in {SPACE[k] for k in kinds}:
            yt, ys = _space(t_got, pairing[l], space), _space(s_got, l, space)
            m = maps.setdefault((l, space), {"mt": 0.0, "ms": 0.0, "ss": 0.0, "n": 0})
            _gram(m, "ts", yt, ys)
            if ridge_map:
                _gram(m, "tt", yt, yt)
            m["mt"], m["ms"] = m["mt"] + yt.sum(0), m["ms"] + ys.sum(0)
            m["ss"] += float(ys.square().sum())
            m["n"] += ys.shape[0]
        for k in kinds:
            e = t_got[(pairing[l], k)][0] @ dw[(pairing[l], k)].T  # the teacher update's effect
            _gram(eff, (l, k, "xe"), s_got[(l, k)][0], e)
            eff[(l, k, "ee")] = eff.get((l, k, "ee"), 0.0) + float(e.square().sum())


@torch.no_grad()
def collect_tokens(teacher, student, pairing: list[int], s_keys, sequences) -> dict:
    """The token matrices of :func:`token_entries` for ``s_keys``, float32 (the models' own activations, kept
    without loss), n_tokens × width, the sequences' rows one after the other."""
    t_spec, s_spec = ArchSpec.from_model(teacher), ArchSpec.from_model(student)
    wanted = token_entries(pairing, s_keys)
    n = int(sum(len(s) for s in sequences))
    acts, row = {}, 0
    for ids in sequences:
        got = {side: _capture(model, spec, sorted({(l, k) for sd, l, k, _ in wanted if sd == side}), ids,
                              torch.float32)
               for side, model, spec in (("t", teacher, t_spec), ("s", student, s_spec))}
        for key in wanted:
            side, l, k, io = key
            x = got[side][(l, k)][0 if io == "in" else 1]
            if key not in acts:
                acts[key] = torch.empty(n, x.shape[1], dtype=torch.float32)
            acts[key][row: row + x.shape[0]] = x
        row += len(ids)
        del got
    return acts


# ---- the closed-form solves ------------------------------------------------------------------------------
def output_map(a: dict, how: str, rel: float) -> OutputMap:
    """The map fitted from one output space's statistics (:func:`collect`), centred here in place (the
    statistics are not used again)."""
    n = a["n"]
    mt, ms = a["mt"] / n, a["ms"] / n
    ts = a["ts"].addr_(mt, ms, alpha=-n)
    tt = None if how == "procrustes" else a["tt"].addr_(mt, mt, alpha=-n)
    return primal_map(tt, ts, a["ss"] - n * float(ms @ ms), how, rel)


def solve_statistics(eff: dict, maps: dict, gram: dict, keys, pairing: list[int], cfg: TransferConfig,
                     deltas: TaskVector, rows: list) -> None:
    """The pass's updates from its statistics, every Gram in the primal form, into ``deltas`` and ``rows``."""
    fitted = {key: output_map(a, cfg.output_map, cfg.map_ridge) for key, a in maps.items()}
    for l, k in keys:
        g = gram[(l, INPUT_GROUP[k])]
        dw = ridge_solve(g, fitted[(l, SPACE[k])].apply(eff[(l, k, "xe")]), cfg.ridge).T  # d_out_s × d_in_s
        dw = _rank_capped(dw, cfg.rank)
        effect = float((dw @ g * dw).sum())  # ‖X_s ΔW_sᵀ‖²
        _record(deltas, rows, l, pairing[l], k, dw, fitted[(l, SPACE[k])], False, effect, eff[(l, k, "ee")])


def solve_tokens(acts: dict, tv: TaskVector, keys, pairing: list[int], cfg: TransferConfig, dual: bool | None,
                 deltas: TaskVector, rows: list) -> None:
    """The pass's updates from its token matrices (:func:`collect_tokens`), each Gram in the primal or the dual
    form (``dual`` None: the smaller, :func:`pkt.transfer.transfer_solve.use_dual`), one student layer at a time;
    a layer's matrices are dropped once solved, a teacher layer's once no student layer left reads it."""
    layers = sorted({l for l, _ in keys})
    for i, l in enumerate(layers):
        m = pairing[l]
        kinds = [k for ll, k in keys if ll == l]
        # this layer's matrices in float64 (the teacher's may be shared with another student layer: copies)
        x = {key: acts[key].double() for key in token_entries(pairing, [(l, k) for k in kinds])}
        fitted = {space: token_map(x[_out_entry(m, space, "t")], x[_out_entry(l, space, "s")],
                                   cfg.output_map, cfg.map_ridge, dual) for space in {SPACE[k] for k in kinds}}
        solvers = {g: TokenRidge(x[("s", l, GROUP_REP[g], "in")], cfg.ridge, dual)
                   for g in {INPUT_GROUP[k] for k in kinds}}
        for k in kinds:
            solver = solvers[INPUT_GROUP[k]]
            e = x[("t", m, GROUP_REP[INPUT_GROUP[k]], "in")] @ tv[(m, k)].double().T  # the teacher's effect
            dw = _rank_capped(solver.solve(fitted[SPACE[k]].apply(e)).T, cfg.rank)  # d_out_s × d_in_s
            effect = float((solver.x @ dw.T).square().sum())
            _record(deltas, rows, l, m, k, dw, fitted[SPACE[k]], solver.dual, effect, float(e.square().sum()))
            del e
        del x, fitted, solvers
        later = {pairing[ll] for ll in layers[i + 1:]}
        done = [key for key in acts if (key[0] == "s" and key[1] == l) or (key[0] == "t" and key[1] not in later)]
        for key in done:
            del acts[key]


def _rank_capped(dw: torch.Tensor, rank: int | None) -> torch.Tensor:
    if rank is not None and rank < min(dw.shape):
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        dw = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return dw


def _record(deltas: TaskVector, rows: list, l: int, m: int, k: str, dw: torch.Tensor, fitted: OutputMap,
            solve_dual: bool, effect: float, ee: float) -> None:
    """ΔW_s (float32) and its row: the map's R², ‖X_s ΔW_sᵀ‖/‖E‖, and the forms solved in (token space)."""
    deltas[(l, k)] = dw.float()
    rows.append({"layer": l, "teacher_layer": m, "kind": k, "map": SPACE[k],
                 "map_r2": None if fitted.r2 is None else round(fitted.r2, 4),
                 "effect_ratio": round(math.sqrt(effect / ee), 4) if ee > 0 else None,
                 "forms": {"map": "dual" if fitted.dual else "primal", "solve": "dual" if solve_dual else "primal"}})


def transfer(teacher, student, tv: TaskVector, sequences: list[torch.Tensor], cfg: TransferConfig,
             log=print, solve: Literal["auto", "primal", "dual"] = "auto") -> tuple[TaskVector, dict]:
    """(ΔW_s per (student layer, kind), report) for the teacher delta ``tv`` (keyed by teacher layer).

    ``solve`` says how, never what (the forms are mathematically identical): "auto" keeps the calibration
    tokens' activations when they take no more memory than the statistics would (:func:`solve_in_tokens`)
    and then factorises each Gram in the smaller of its primal and dual forms, else the statistics, primal;
    "primal": the statistics; "dual": the tokens, every Gram dual."""
    t0 = time.perf_counter()
    t_spec, s_spec = ArchSpec.from_model(teacher), ArchSpec.from_model(student)
    kinds = [k for k in LINEAR_KINDS if any(kind == k for _, kind in tv)]
    if not sequences:
        raise PktError("function transfer: no calibration sequences")
    cka = layer_cka(teacher, student, sequences, cfg.cka_tokens, cfg.seed)
    pairing, info = pair_layers(cka, cfg)
    info["cka"] = [[round(float(x), 4) for x in row] for row in cka]
    t_pair = time.perf_counter() - t0
    ridge_map = cfg.output_map == "ridge"
    n_tokens = int(sum(len(s) for s in sequences))
    tokens = solve == "dual" or (solve == "auto" and solve_in_tokens(s_spec, t_spec, kinds, ridge_map, n_tokens))
    per_layer = layer_token_bytes(s_spec, t_spec, kinds, n_tokens) if tokens else \
        layer_stat_bytes(s_spec, t_spec, kinds, ridge_map)
    layers = [l for l in range(s_spec.num_layers) if any((pairing[l], k) in tv for k in kinds)]
    passes = layer_passes(layers, per_layer, cfg.max_stat_gib * 2**30)
    deltas: TaskVector = {}
    rows, t_stats = [], 0.0
    for n_pass, chunk in enumerate(passes):
        log(f"function transfer: pass {n_pass + 1}/{len(passes)}, student layers {chunk[0]}..{chunk[-1]} "
            f"({'token space' if tokens else 'statistics'})")
        keys = [(l, k) for l in chunk for k in kinds if (pairing[l], k) in tv]
        t1 = time.perf_counter()
        if tokens:
            acts = collect_tokens(teacher, student, pairing, keys, sequences)
            t_stats += time.perf_counter() - t1
            solve_tokens(acts, tv, keys, pairing, cfg, True if solve == "dual" else None, deltas, rows)
            del acts
        else:
            eff, maps, gram = collect(teacher, student, tv, pairing, keys, sequences, ridge_map)
            t_stats += time.perf_counter() - t1
            solve_statistics(eff, maps, gram, keys, pairing, cfg, deltas, rows)
            del eff, maps, gram
    info.update(kinds=kinds, projections=rows, passes=len(passes), n_sequences=len(sequences), n_tokens=n_tokens,
                solved_from="tokens" if tokens else "statistics",
                seconds={"pairing": round(t_pair, 1), "statistics": round(t_stats, 1),
                         "solve": round(time.perf_counter() - t0 - t_pair - t_stats, 1)})
    return deltas, info


@torch.no_grad()
def rel_norms(model, deltas: TaskVector) -> dict:
    """‖ΔW‖/‖W‖ of ``deltas`` against ``model``'s weights: per projection, per kind and in total."""
    spec = ArchSpec.from_model(model)
    per, sums = {}, {}
    for (l, k), dw in sorted(deltas.items()):
        d2, w2 = float(dw.double().square().sum()), float(spec.linear(model, l, k).weight.double().square().sum())
        per[f"{l}.{k}"] = round(math.sqrt(d2 / w2), 6) if w2 > 0 else None
        acc = sums.setdefault(k, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + d2, acc[1] + w2
    d2, w2 = sum(a[0] for a in sums.values()), sum(a[1] for a in sums.values())
    return {"rel_norm": math.sqrt(d2 / w2) if w2 > 0 else None,
            "rel_norm_per_kind": {k: math.sqrt(a[0] / a[1]) for k, a in sums.items() if a[1] > 0},
            "rel_norm_per_projection": per}


@torch.no_grad()
def apply_deltas(student, deltas: TaskVector) -> dict:
    """W_s ← W_s + ΔW_s in place (added in float32, cast back); returns :func:`rel_norms` against the
    weights before the change."""
    norms = rel_norms(student, deltas)
    spec = ArchSpec.from_model(student)
    for (l, k), dw in deltas.items():
        w = spec.linear(student, l, k).weight
        w.copy_((w.detach().float() + dw.float().to(w.device)).to(w.dtype))
    return norms
