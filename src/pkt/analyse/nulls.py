"""Similarity read against its nulls: what a teacher × student score would be with no shared knowledge.

A similarity means something only beside the value that no relation gives. pkt's analysis reports, for the
teacher and the student, representation similarity (linear CKA, debiased CKA, RSA of each module's outputs, per
layer pair) and the parametric similarity of a Seeking block to the student's weight. This module measures the
same quantities for two nulls, on the same tokens, with intervals over *examples* (half-sampling, below):

* **random teacher**: a model of the teacher's architecture with freshly initialised weights (its config's own
  initialiser, seeded), fed the same inputs. What the architecture and the inputs alone give.
* **shuffled inputs**: the real teacher fed *other* examples than the student. Example i's student tokens are
  paired with the teacher's tokens of example π(i) (π a seeded derangement), position by position over the
  tokens both have. What two models that read the same kind of text, but not the same text, give.

The real pairing is scored on exactly the student tokens that the shuffled pairing uses, so the three scores
share their n (CKA's small-sample bias is the same for all three).

The intervals resample *examples* (the tokens of one example move together) by half-sampling: each draw keeps
half of the examples, without replacement, and every layer pair's score is recomputed from the n×n token
matrices restricted to the kept tokens (no activation is read again). Drawing with replacement would not do: a
repeated example makes its token pairs identical in both models, and with 64 examples those pairs are a few
percent of all pairs, enough to lift a similarity near 0.1 by 0.05-0.1 and to leave the full sample's value
outside its own interval. A mean over n/2 of n examples drawn without replacement has the variance s²/n of the
mean over all n, so the spread of the half-sample scores around their mean estimates the full sample's (to first
order; the scores are smooth functions of sums over token pairs). Each summary (mean over the paper's triangle of
layer pairs, mean at the same relative depth, mean of each student layer's best teacher layer) gets the interval
value + the 2.5% and 97.5% quantiles of that spread, and so does its difference real − null (the same draws for
both sides, so the difference is paired).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from pkt.analyse.representations import RepConfig, collect_activations, plan_tokens, summarise_matrix
from pkt.errors import PktError

NULLS = ("random_teacher", "shuffled_inputs")
SUMMARIES = ("triangle", "same_depth", "best")


@dataclass(frozen=True)
class NullConfig:
    n_boot: int = 200
    seed: int = 0
    level: float = 0.95


def random_like(model, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    """A model of ``model``'s architecture (a model or its config) with weights from the config's own initialiser,
    in ``dtype`` (default: the model's own, or float32 for a config)."""
    from transformers import AutoModelForCausalLM

    config = model.config if isinstance(model, nn.Module) else model
    dtype = dtype or (next(model.parameters()).dtype if isinstance(model, nn.Module) else torch.float32)
    torch.manual_seed(seed)
    rand = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return rand.to(dtype).eval()


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (n ≥ 2)."""
    if n < 2:
        raise PktError(f"a shuffled-input null needs at least 2 examples with sample tokens, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p.tolist()


def shuffled_rows(counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student rows, teacher rows, example of each pair) pairing example i's sample tokens with example π(i)'s,
    over the first min(count_i, count_π(i)) tokens of each. ``counts``: sample tokens per example, in the row
    order of :func:`pkt.analyse.representations.collect_activations` (examples with samples only)."""
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    perm = derangement(len(counts), seed)
    s_rows, t_rows, group = [], [], []
    for i, j in enumerate(perm):
        k = min(counts[i], counts[j])
        s_rows += range(start[i], start[i] + k)
        t_rows += range(start[j], start[j] + k)
        group += [i] * k
    return torch.tensor(s_rows), torch.tensor(t_rows), torch.tensor(group)


def _token_matrices(x: torch.Tensor, measures) -> dict[str, torch.Tensor]:
    """The n×n matrices a layer's scores are made of: the centred Gram (CKA, debiased CKA) and the cosine matrix
    of the raw rows (RSA), in float32."""
    x = x.to(torch.float64)
    xc = x - x.mean(0)
    out = {}
    if {"cka", "dcka"} & set(measures):
        out["gram"] = (xc @ xc.T).float()
    if "rsa" in measures:
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out["cos"] = (xn @ xn.T).float()
    return out


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _stack(mats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The layers' token matrices of one side as ``[layers, n, n]`` tensors, so that a draw gathers them at once."""
    return {k: torch.stack([m[k] for m in mats]) for k in mats[0]}


def _vectors(mats: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor], idx: torch.Tensor,
             measure: str) -> torch.Tensor:
    """[layers, ·] unit vectors of one measure for the tokens ``idx`` (repeats allowed): a score is a dot product.
    ``mats``: per layer the :func:`_token_matrices`, or those stacked by :func:`_stack`."""
    st = _stack(mats) if isinstance(mats, list) else mats
    if measure == "rsa":
        n = len(idx)
        iu = torch.triu_indices(n, n, offset=1)
        c = st["cos"][:, idx][:, :, idx]
        v = c[:, iu[0], iu[1]]
        return _unit_rows(v - v.mean(dim=1, keepdim=True))
    g = st["gram"][:, idx][:, :, idx]
    if measure == "cka":  # re-centre on the drawn tokens: H K H with K the full sample's centred Gram
        g = g - g.mean(1, keepdim=True) - g.mean(2, keepdim=True) + g.mean((1, 2), keepdim=True)
    else:  # the U-centring of pkt.analyse.similarity.unbiased_centre_gram, for every layer at once
        n = g.shape[-1]
        if n < 4:
            raise ValueError("debiased CKA needs at least 4 samples")
        g = g.clone()
        g.diagonal(dim1=1, dim2=2).zero_()
        means = g.sum(1) / (n - 2)
        means = means - means.sum(1, keepdim=True) / (2 * (n - 1))
        g = g - means[:, :, None] - means[:, None, :]
        g.diagonal(dim1=1, dim2=2).zero_()
    return _unit_rows(g.reshape(g.shape[0], -1))


def _summaries(mat: torch.Tensor) -> dict[str, float]:
    s = summarise_matrix(mat)
    return {"triangle": s["teacher_ge_student"]["mean"], "same_depth": s["diagonal"]["proportional_mean"],
            "best": s["diagonal"]["best_mean"]}


def _draw(groups: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Row indices of a half-sample of the examples (without replacement), each kept example's rows together."""
    ids = torch.unique(groups)
    rows = [torch.nonzero(groups == g).flatten() for g in ids.tolist()]
    pick = np.sort(rng.choice(len(rows), size=max(2, len(rows) // 2), replace=False))
    return torch.cat([rows[k] for k in pick])


def _interval(point: float, draws: list[float], level: float) -> list[float]:
    """``point`` + the central ``level`` quantiles of the half-sample draws around their mean."""
    spread = np.asarray(draws) - np.mean(draws)
    return [float(point + np.quantile(spread, (1 - level) / 2)), float(point + np.quantile(spread, 1 - (1 - level) / 2))]


def compare_with_nulls(student: dict[str, list[torch.Tensor]], teacher: dict[str, list[torch.Tensor]],
                       random_teacher: dict[str, list[torch.Tensor]], counts: list[int], measures,
                       cfg: NullConfig = NullConfig(), progress: Callable | None = None) -> dict:
    """Per module kind and measure: the real, random-teacher and shuffled-input score matrices' summaries, each
    with a half-sampling interval over examples, and the paired differences real − null."""
    s_rows, t_rows, groups = shuffled_rows(counts, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    draws = [_draw(groups, rng) for _ in range(cfg.n_boot)]
    full = torch.arange(len(s_rows))
    out = {}
    kinds = [k for k in student if k in teacher and k in random_teacher]
    for kind in (progress(kinds) if progress else kinds):
        sides = {"student": [x[s_rows] for x in student[kind]], "real": [x[s_rows] for x in teacher[kind]],
                 "random_teacher": [x[s_rows] for x in random_teacher[kind]],
                 "shuffled_inputs": [x[t_rows] for x in teacher[kind]]}
        mats = {side: _stack([_token_matrices(x, measures) for x in xs]) for side, xs in sides.items()}
        del sides
        out[kind] = {}
        for measure in measures:
            def scores(idx, mats=mats, measure=measure):
                sv = _vectors(mats["student"], idx, measure)
                return {side: _summaries((sv @ _vectors(mats[side], idx, measure).T).double())
                        for side in ("real", *NULLS)}

            point = scores(full)
            boot = [scores(idx) for idx in draws]
            res = {}
            for side in ("real", *NULLS):
                res[side] = {k: {"value": point[side][k],
                                 "interval": _interval(point[side][k], [b[side][k] for b in boot], cfg.level)}
                             for k in SUMMARIES}
            for null in NULLS:
                res[f"real_minus_{null}"] = {
                    k: {"value": point["real"][k] - point[null][k],
                        "interval": _interval(point["real"][k] - point[null][k],
                                              [b["real"][k] - b[null][k] for b in boot], cfg.level)}
                    for k in SUMMARIES}
            out[kind][measure] = res
        del mats
    return out


def representation_nulls(teacher, student, tokenizer, examples, rep: RepConfig = RepConfig(),
                         cfg: NullConfig = NullConfig(), progress: Callable | None = None,
                         log: Callable = lambda s: None) -> dict:
    """The representation similarity of teacher and student beside its two nulls (the module docstring).
    ``teacher``/``student``: models or zero-argument loaders, loaded one at a time; the random teacher is built
    from the teacher's config after the teacher's pass."""
    rep.check()
    plan = plan_tokens(examples, tokenizer, rep)
    counts = [len(p) for p in plan.positions if len(p)]
    log(f"{len(examples)} examples, {plan.n_tokens} sample tokens ({rep.tokens})")
    acts = {}
    for role, ref in (("teacher", teacher), ("student", student)):
        model = ref() if callable(ref) and not isinstance(ref, nn.Module) else ref
        log(f"collecting {role} activations")
        acts[role] = collect_activations(model, plan, rep.kinds, rep.batch_size, tokenizer.pad_token_id)
        if role == "teacher":
            config, dtype = model.config, next(model.parameters()).dtype
            del model  # the teacher is dropped before its random twin is built
            rand = random_like(config, seed=cfg.seed, dtype=dtype)
            log("collecting the random teacher's activations")
            acts["random_teacher"] = collect_activations(rand, plan, rep.kinds, rep.batch_size, tokenizer.pad_token_id)
            del rand
    log(f"scoring layer pairs with {cfg.n_boot} half-samples of the examples")
    result = compare_with_nulls(acts["student"], acts["teacher"], acts["random_teacher"], counts, rep.measures, cfg,
                                progress=progress)
    return {"config": {"representations": asdict(rep), "nulls": asdict(cfg)}, "n_examples": len(counts),
            "n_tokens": plan.n_tokens, "n_paired_tokens": len(shuffled_rows(counts, cfg.seed)[0]),
            "modules": result}


def parametric_nulls(teacher, student: nn.Module, rank: int = 16, kinds=("up", "down"),
                     cfg: NullConfig = NullConfig()) -> dict:
    """cos(BA, W), cos(BA, W − BA) and ‖BA‖/‖W‖ of a Seeking block (the max-|w| block of the teacher layer at the
    student layer's relative depth, rank-``rank`` SVD) taken from the real teacher and from a random teacher of
    its architecture: mean over layers per module with a bootstrap interval over layers. ``teacher``: a model or
    a zero-argument loader; the two teachers are held one at a time (float32, a 1.5B teacher is 6 GB)."""
    from pkt.analyse.params import lora_similarity, seeking_init, summarise

    rng = np.random.default_rng(cfg.seed)

    def side(t: nn.Module) -> dict:
        # a copy: seeking_init rewrites the student's weights (base ← W − BA)
        model, _ = seeking_init(t, copy.deepcopy(student), rank=rank, kinds=kinds)
        recs = lora_similarity(model)
        summary = summarise(recs)
        for module, stats in summary.items():
            for key in stats:
                vals = np.array([r[key] for r in recs if r["module"] == module and r.get(key) is not None])
                boots = [vals[rng.integers(0, len(vals), len(vals))].mean() for _ in range(cfg.n_boot)]
                stats[key]["interval"] = [float(np.quantile(boots, q)) for q in ((1 - cfg.level) / 2,
                                                                                 1 - (1 - cfg.level) / 2)]
        return summary

    real = teacher() if callable(teacher) and not isinstance(teacher, nn.Module) else teacher
    config = real.config
    out = {"real": side(real)}
    del real  # the real teacher is dropped (when this function loaded it) before the random one is built
    out["random_teacher"] = side(random_like(config, seed=cfg.seed, dtype=torch.float32))
    return out


def _ci(stat: dict, digits: int = 3) -> str:
    lo, hi = stat["interval"]
    v = stat.get("value", stat.get("mean"))
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def nulls_markdown(res: dict) -> str:
    """The nulls' tables: per module and measure, each summary for the real pairing and both nulls, and the paired
    differences real − null; then the parametric null when it was run."""
    lines = [f"Teacher × student similarity against its nulls: {res['n_examples']} examples, {res['n_paired_tokens']} "
             f"paired tokens; 95% intervals from {res['config']['nulls']['n_boot']} half-samples of the examples.", "",
             "| module | measure | summary | real | random teacher | shuffled inputs | real − random | "
             "real − shuffled |", "|---|---|---|---|---|---|---|---|"]
    names = {"triangle": "teacher ≥ student", "same_depth": "same relative depth", "best": "best teacher layer"}
    for kind, per in res["modules"].items():
        for measure, r in per.items():
            for k in SUMMARIES:
                lines.append(f"| {kind} | {measure} | {names[k]} | {_ci(r['real'][k])} | {_ci(r['random_teacher'][k])} "
                             f"| {_ci(r['shuffled_inputs'][k])} | {_ci(r['real_minus_random_teacher'][k])} "
                             f"| {_ci(r['real_minus_shuffled_inputs'][k])} |")
    if res.get("params"):
        lines += ["", "A Seeking block (max-|w| block of the teacher layer at the same relative depth) against the "
                      "student's weight, per module: mean over layers [95% interval over layers].", "",
                  "| module | teacher | cos(BA, W) | cos(BA, W − BA) | ‖BA‖ / ‖W‖ |", "|---|---|---|---|---|"]
        for side in ("real", "random_teacher"):
            for mod, st in res["params"][side].items():
                lines.append(f"| {mod} | {side.replace('_', ' ')} | {_ci(st['cos_BA_original'], 4)} | "
                             f"{_ci(st['cos_BA_remaining'], 3)} | {_ci(st['norm_ratio'], 3)} |")
    return "\n".join(lines) + "\n"
