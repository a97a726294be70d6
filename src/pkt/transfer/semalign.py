"""SemAlign: teacher layer outputs recomposed in the student's space through the shared vocabulary, and the
student trained layer by layer towards them (docs/methods.md §9.3; S3, arXiv 2510.24208).

Teacher and student share one tokenizer, so each vocabulary row is a pair of index-aligned vectors, one in each
hidden space. A teacher hidden state h_t is *decomposed* over the teacher's vocabulary vectors and the same
coefficients *recompose* a student-space target from the student's:

* ``recompose="lstsq"`` (the default): with H_t, H_s the vocabulary matrices (rows = tokens; the LM heads by
  default) and the pseudoinverse bases of S3 (s_i = column i of H⁺), the minimum-norm decomposition of h_t has
  coefficients H_t h_t (the logit lens), and recomposing them gives h_s = H_s⁺ H_t h_t: the student state whose
  vocabulary scores best match the teacher's, a linear map R = (H_sᵀH_s + λI)⁻¹ H_sᵀH_t (d_s × d_t). It is exact
  where an exact answer exists: R = I when both models are one, R = Qᵀ when the student's vocabulary vectors are
  the teacher's rotated by an orthogonal Q.
* ``"cosine"``: S3 v1's formula read literally: the coefficients are the cosines of h_t to the unit-norm teacher
  bases, recombined over the unit-norm student bases, R = Ŝ_S Ŝ_Tᵀ. The 151k bases are an overcomplete frame, so
  this is not the identity even for one model (the oracle in tests/test_semalign.py measures by how much).

Only d × d statistics are accumulated over the vocabulary (in float64 chunks), so the full vocabulary costs one
pass over each matrix. The student is then trained shallow to deep (S3 v2's "frontier" schedule): student layer l,
paired with teacher layer m(l), reads the hidden states that the already-trained layers before it produce and is
trained alone (the projections in ``kinds``, full rank) so that its output, or its own contribution to the
residual stream (``target``), moves towards R applied to teacher layer m(l)'s, under a per-token cosine or a
relative squared error. The teacher's states are computed once; a layer is replayed with the arguments the model
itself passed to it (captured by a hook), so no modeling code is re-implemented.

``vocab_shuffle`` is the null (``semalign-shuffled``): the student rows are matched to the teacher rows through a
seeded derangement of the basis tokens, so R carries the teacher's states through the wrong words; everything
else (pairing, steps, learning rate, layers) stays the same.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field

from pkt.config import Settings
from pkt.errors import PktError
from pkt.models.arch import ArchSpec



class SemAlignConfig(Settings):
    """How the targets are built and the layers trained (docs/methods.md §9.3 gives the reasons)."""

    basis: Literal["lm_head", "embed"] = "lm_head"  # S3: the LM head's pseudoinverse (input side ≈ 0 in its Fig. 2)
    recompose: Literal["lstsq", "cosine"] = "lstsq"
    basis_tokens: int | None = Field(None, ge=1)  # the k tokens most frequent in the training inputs; None: all
    ridge: float = Field(1e-6, ge=0)  # relative to tr(H_sᵀH_s)/d_s
    vocab_shuffle: bool = False  # the null: student rows matched to teacher rows through a derangement
    pairing: Literal["depth", "cka"] = "depth"  # depth: S3's max(1, ⌊L_t k / L_s⌋) (1-based)
    layers: list[int] | None = None  # student layers trained (shallow to deep); None: every layer
    kinds: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(["v", "o", "up", "down"],
                                                                          min_length=1)  # S3's LoRA targets
    target: Literal["output", "contribution"] = "output"
    loss: Literal["cosine", "mse"] = "cosine"
    skip_first: bool = True  # position 0 (the attention sink) is left out of the loss
    steps: int = Field(20, ge=0)  # optimiser steps per trained layer
    batch_size: int = Field(4, ge=1)  # sequences per step
    lr: float = Field(5e-5, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    cka_tokens: int = Field(2048, ge=4)
    seed: int = 0


# ---- the vocabulary bases --------------------------------------------------------------------------------
def vocab_matrix(model, which: str) -> torch.Tensor:
    """The model's vocabulary vectors [V, d]: its LM head's rows or its input embeddings."""
    spec = ArchSpec.from_model(model)
    return (spec.lm_head(model) if which == "lm_head" else spec.embed(model)).weight.detach()


def basis_rows(sequences: list[torch.Tensor], n_vocab: int, k: int | None) -> torch.Tensor:
    """Token ids of the basis: every id below ``n_vocab`` (the tokenizer's, so a head's padding rows, never
    trained, stay out), or the ``k`` most frequent in ``sequences`` (ties and the fill by lower id, which in a
    BPE vocabulary is the earlier, more frequent merge), sorted."""
    if k is None or k >= n_vocab:
        return torch.arange(n_vocab)
    counts = torch.zeros(n_vocab, dtype=torch.float64)
    for s in sequences:
        counts += torch.bincount(s[s < n_vocab], minlength=n_vocab).double()
    order = sorted(range(n_vocab), key=lambda i: (-counts[i].item(), i))
    return torch.tensor(sorted(order[:k]))


def _chunks(n: int, size: int = 16384):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _grams(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, perm: torch.Tensor | None):
    """(aᵀa, aᵀb, ‖b‖²) over ``rows`` in float64 chunks, a's rows taken at ``rows[perm]`` when permuted."""
    a_rows = rows if perm is None else rows[perm]
    gaa = gab = None
    bb = 0.0
    for sl in _chunks(len(rows)):
        x, y = a[a_rows[sl]].double(), b[rows[sl]].double()
        gaa = x.T @ x if gaa is None else gaa.addmm_(x.T, x)
        gab = x.T @ y if gab is None else gab.addmm_(x.T, y)
        bb += float(y.square().sum())
    return gaa, gab, bb


def recomposition(h_t: torch.Tensor, h_s: torch.Tensor, rows: torch.Tensor, how: str = "lstsq",
                  ridge: float = 1e-6, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(R: d_s × d_t, report): the linear map that recomposes a teacher hidden state in the student's space,
    target = R h_t, from the vocabulary matrices ``h_t`` [V, d_t] and ``h_s`` [V, d_s] restricted to ``rows``;
    ``perm`` matches teacher row rows[i] with student row rows[perm[i]] (the null). The report's ``logit_fit``
    is the share of ‖H_t‖² that H_s R reproduces (1 − ‖H_s R − H_t‖²/‖H_t‖², lstsq only): how well the
    student's vocabulary can express the teacher's scores at all."""
    from pkt.transfer.transfer_solve import ridge_lambda, ridge_solve

    if h_t.shape[0] != h_s.shape[0]:
        raise PktError(f"semalign: the vocabulary matrices have {h_t.shape[0]} and {h_s.shape[0]} rows; teacher "
                       "and student must share one vocabulary")
    d_s = h_s.shape[1]
    if len(rows) < d_s:
        raise PktError(f"semalign: {len(rows)} basis tokens cannot span the student's {d_s} dimensions "
                       "(basis_tokens must be at least the hidden size)")
    g, c, tt = _grams(h_s, h_t, rows, perm)
    info = {"basis_tokens": len(rows), "recompose": how, "ridge": ridge}
    if how == "lstsq":
        lam = ridge_lambda(g, ridge) if ridge > 0 else 0.0
        # R = (G + λI)⁻¹ C with G = H_sᵀH_s, C = H_sᵀH_t: the least-squares solution of H_s R ≈ H_t
        r = ridge_solve(g, c, ridge) if ridge > 0 else torch.linalg.solve(g, c)
        # its residual ‖H_s R − H_t‖² = ‖H_t‖² − 2⟨R, C⟩ + ⟨R, G R⟩, from the statistics alone
        resid = tt - 2 * float((r * c).sum()) + float((r * (g @ r)).sum())
        info["logit_fit"] = round(1 - resid / tt, 6) if tt > 0 else None
        info["lambda"] = lam
    else:
        # pseudoinverse bases s_i = G⁻¹ h_i of each model over the same rows, unit-normalised, R = Σ ŝ_s,i ŝ_t,iᵀ
        g_t = _grams(h_t, h_t, rows, None)[0]
        inv_s, inv_t = torch.linalg.inv(g), torch.linalg.inv(g_t)
        s_rows = rows if perm is None else rows[perm]
        r = torch.zeros(d_s, h_t.shape[1], dtype=torch.float64)
        for sl in _chunks(len(rows)):
            bs = h_s[s_rows[sl]].double() @ inv_s
            bt = h_t[rows[sl]].double() @ inv_t
            bs = bs / bs.norm(dim=1, keepdim=True).clamp_min(1e-300)
            bt = bt / bt.norm(dim=1, keepdim=True).clamp_min(1e-300)
            r.addmm_(bs.T, bt)
        info["logit_fit"] = None
    info["r_norm"] = round(float(r.norm()), 6)
    return r, info


def vocab_derangement(n: int, seed: int) -> torch.Tensor:
    """The null's seeded permutation of the ``n`` basis tokens with no token left in place."""
    from pkt.draws import derangement

    return torch.tensor(derangement(n, seed * 7919 + 17))


# ---- layer pairing ---------------------------------------------------------------------------------------
def depth_pairing(n_student: int, n_teacher: int) -> list[int]:
    """S3's depth map, ℓ_t(k) = max(1, ⌊L_t k / L_s⌋) for the 1-based student layer k, returned 0-based: the
    last student layer takes the last teacher layer."""
    return [max(1, (n_teacher * k) // n_student) - 1 for k in range(1, n_student + 1)]


def pair_layers(teacher, student, sequences, cfg: SemAlignConfig) -> tuple[list[int], dict]:
    """Teacher layer of each student layer: S3's depth map, or function-transfer's monotone CKA pairing."""
    n_s, n_t = ArchSpec.from_model(student).num_layers, ArchSpec.from_model(teacher).num_layers
    if cfg.pairing == "depth":
        pairing = depth_pairing(n_s, n_t)
        return pairing, {"pairing": "depth", "teacher_layers": pairing}
    from pkt.transfer.function_transfer import TransferConfig, layer_cka, pair_layers as cka_pairing

    cka = layer_cka(teacher, student, sequences, cfg.cka_tokens, cfg.seed)
    pairing, info = cka_pairing(cka, TransferConfig(pairing="cka", seed=cfg.seed, cka_tokens=cfg.cka_tokens))
    info["cka"] = [[round(float(x), 4) for x in row] for row in cka]
    return pairing, info


# ---- activations -----------------------------------------------------------------------------------------
def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def teacher_states(teacher, sequences: list[torch.Tensor], layers: set[int]):
    """Yields per sequence {teacher layer: (its input, its output)} [tokens, d_t] in float32 on the CPU (one
    sequence at a time: the caller keeps only what it recomposes)."""
    from pkt.models.load import module_device

    spec = ArchSpec.from_model(teacher)
    got: dict = {}

    def hook(i):
        def fn(_mod, args, kwargs, output):
            got[i] = (_hidden_in(args, kwargs)[0].detach().float().cpu(), _hidden_out(output)[0].detach().float().cpu())
        return fn

    handles = [spec.layer(teacher, i).register_forward_hook(hook(i), with_kwargs=True) for i in sorted(layers)]
    try:
        for ids in sequences:
            got.clear()
            with torch.no_grad():
                teacher(input_ids=ids.view(1, -1).to(module_device(teacher.get_input_embeddings())), use_cache=False)
            yield dict(got)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def student_replay(student, sequences: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """(per sequence the input of layer 0 [1, tokens, d_s], per sequence and layer the keyword arguments the model
    passed to that layer): enough to run any layer alone on any hidden states of that sequence."""
    from pkt.models.load import module_device

    spec = ArchSpec.from_model(student)
    first, kwargs = [], []
    cur: dict = {}

    def pre(i):
        def fn(_mod, args, kw):
            if i == 0:
                cur["x"] = _hidden_in(args, kw).detach()
            cur[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        return fn

    handles = [spec.layer(student, i).register_forward_pre_hook(pre(i), with_kwargs=True)
               for i in range(spec.num_layers)]
    try:
        for ids in sequences:
            cur.clear()
            student(input_ids=ids.view(1, -1).to(module_device(student.get_input_embeddings())), use_cache=False)
            first.append(cur["x"])
            kwargs.append([cur[i] for i in range(spec.num_layers)])
    finally:
        for h in handles:
            h.remove()
    return first, kwargs


def run_layer(layer, x: torch.Tensor, kw: dict) -> torch.Tensor:
    return _hidden_out(layer(x, **kw))


# ---- the objective ---------------------------------------------------------------------------------------
def _aligned(y: torch.Tensor, x: torch.Tensor, cfg: SemAlignConfig) -> torch.Tensor:
    """What is compared with the target: the layer's output, or its own contribution (output − input)."""
    a = y[0] if cfg.target == "output" else (y - x)[0]
    return a[1:] if cfg.skip_first else a


def _trim(t: torch.Tensor, cfg: SemAlignConfig) -> torch.Tensor:
    return t[1:] if cfg.skip_first else t


def loss_terms(a: torch.Tensor, t: torch.Tensor, cfg: SemAlignConfig) -> tuple[torch.Tensor, float]:
    """(summed loss over the tokens, its normaliser's share): cosine: Σ (1 − cos), per token; mse: Σ‖a − t‖²,
    to be divided by Σ‖t‖² over the batch."""
    if cfg.loss == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(a, t, dim=-1, eps=1e-12)).sum(), float(a.shape[0])
    return (a - t).square().sum(), float(t.square().sum())


@torch.no_grad()
def mean_loss(layer, xs, kws, ts, cfg: SemAlignConfig) -> float | None:
    """The alignment loss of ``layer`` over sequences (inputs ``xs``, targets ``ts``): token mean of 1 − cos, or
    Σ‖a − t‖²/Σ‖t‖²."""
    num = den = 0.0
    for x, kw, t in zip(xs, kws, ts):
        n, d = loss_terms(_aligned(run_layer(layer, x, kw), x, cfg), _trim(t, cfg), cfg)
        num, den = num + float(n), den + d
    return num / den if den > 0 else None


def train_layer(layer, params: list[torch.Tensor], xs, kws, ts, cfg: SemAlignConfig, layer_index: int) -> list[float]:
    """``cfg.steps`` Adam steps on ``params`` (of ``layer``), each over ``cfg.batch_size`` sequences drawn in a
    seeded shuffled cycle; returns the per-step losses."""
    from pkt.align.guard import check_finite

    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + layer_index)
    order: list[int] = []
    losses = []
    for step in range(cfg.steps):
        batch = []
        while len(batch) < min(cfg.batch_size, len(xs)):
            if not order:
                order = torch.randperm(len(xs), generator=gen).tolist()
            batch.append(order.pop())
        # the normaliser first (mse: the targets' energy), so each sequence can go backward on its own
        den = sum(loss_terms(_trim(ts[i], cfg), _trim(ts[i], cfg), cfg)[1] if cfg.loss == "mse"
                  else float(_trim(ts[i], cfg).shape[0]) for i in batch)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in batch:
            n, _ = loss_terms(_aligned(run_layer(layer, xs[i], kws[i]), xs[i], cfg), _trim(ts[i], cfg), cfg)
            (n / den).backward()
            total += float(n.detach()) / den
        losses.append(check_finite(torch.tensor(total), step, f"semalign layer {layer_index}"))
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
    return losses


# ---- the whole transfer ----------------------------------------------------------------------------------
def build_targets(states: list[dict], pairing: list[int], layers: list[int], r: torch.Tensor,
                  cfg: SemAlignConfig) -> list[dict[int, torch.Tensor]]:
    """Per sequence, {student layer: its target [tokens, d_s]}: R applied to the paired teacher layer's output
    (or its contribution, output − input)."""
    rt = r.T.float()
    out = []
    for st in states:
        row = {}
        for l in layers:
            t_in, t_out = st[pairing[l]]
            row[l] = (t_out if cfg.target == "output" else t_out - t_in) @ rt
        out.append(row)
    return out


def semalign(teacher, student, train: list[torch.Tensor], heldout: list[torch.Tensor], cfg: SemAlignConfig,
             n_vocab: int | None = None, log=print) -> tuple[dict, dict]:
    """Train ``student``'s layers towards ``teacher``'s recomposed layer outputs on the ``train`` sequences;
    returns (ΔW per (student layer, kind), report) and leaves the student's weights as they were (merge with
    :func:`pkt.transfer.function_transfer.apply_deltas`). The report holds the pairing, the recomposition's figures
    and per trained layer the alignment loss before and after on ``train`` and on ``heldout``."""
    t0 = time.perf_counter()
    if not train:
        raise PktError("semalign: no training sequences")
    s_spec = ArchSpec.from_model(student)
    layers = list(range(s_spec.num_layers)) if cfg.layers is None else sorted(set(cfg.layers))
    if any(not 0 <= l < s_spec.num_layers for l in layers):
        raise PktError(f"semalign: layers {cfg.layers} outside the student's 0..{s_spec.num_layers - 1}")
    h_t, h_s = vocab_matrix(teacher, cfg.basis), vocab_matrix(student, cfg.basis)
    n_vocab = min(n_vocab or h_s.shape[0], h_s.shape[0], h_t.shape[0])
    rows = basis_rows(train, n_vocab, cfg.basis_tokens)
    perm = vocab_derangement(len(rows), cfg.seed) if cfg.vocab_shuffle else None
    r, rinfo = recomposition(h_t, h_s, rows, cfg.recompose, cfg.ridge, perm)
    rinfo.update(basis=cfg.basis, vocab_shuffle=cfg.vocab_shuffle,
                 moved_tokens=None if perm is None else int((perm != torch.arange(len(rows))).sum()))
    pairing, info = pair_layers(teacher, student, train, cfg)  # held-out inputs stay out of every fit
    t_pair = time.perf_counter() - t0
    log(f"semalign: R {tuple(r.shape)} over {len(rows)} tokens, pairing {pairing}")
    need = {pairing[l] for l in layers}
    targets = {name: [build_targets([st], pairing, layers, r, cfg)[0] for st in teacher_states(teacher, seqs, need)]
               for name, seqs in (("train", train), ("heldout", heldout))}
    t_targets = time.perf_counter() - t0 - t_pair

    was_training = student.training
    student.eval()  # no dropout: the targets and the replay are deterministic
    originals = {(l, k): s_spec.linear(student, l, k).weight.detach().clone() for l in layers for k in cfg.kinds}
    frozen = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    xs, kws = {}, {}
    for name, seqs in (("train", train), ("heldout", heldout)):
        xs[name], kws[name] = student_replay(student, seqs)
    rows_out = []
    try:
        for l in range(max(layers) + 1):
            layer = s_spec.layer(student, l)
            kw = {name: [k[l] for k in kws[name]] for name in xs}
            if l in layers:
                ts = {name: [t[l] for t in targets[name]] for name in xs}
                before = {name: mean_loss(layer, xs[name], kw[name], ts[name], cfg) for name in xs}
                params = [s_spec.linear(student, l, k).weight for k in cfg.kinds]
                for p in params:
                    p.requires_grad_(True)
                curve = train_layer(layer, params, xs["train"], kw["train"], ts["train"], cfg, l)
                for p in params:
                    p.requires_grad_(False)
                after = {name: mean_loss(layer, xs[name], kw[name], ts[name], cfg) for name in xs}
                rows_out.append({"layer": l, "teacher_layer": pairing[l],
                                 **{f"{name}_before": _r(before[name]) for name in xs},
                                 **{f"{name}_after": _r(after[name]) for name in xs},
                                 "loss_curve": [round(v, 6) for v in curve]})
                log(f"semalign: layer {l} ← teacher {pairing[l]}: loss {_r(before['train'])} → {_r(after['train'])}"
                    f" (held-out {_r(before['heldout'])} → {_r(after['heldout'])})")
            with torch.no_grad():  # the next layer reads this layer's (trained) output
                for name in xs:
                    xs[name] = [run_layer(layer, x, k) for x, k in zip(xs[name], kw[name])]
    finally:
        for p, g in frozen:
            p.requires_grad_(g)
        student.train(was_training)
    deltas = {}
    with torch.no_grad():  # ΔW out, the student back as it was: the caller merges (and measures) the deltas
        for key, w in originals.items():
            trained = s_spec.linear(student, *key).weight
            deltas[key] = trained.detach().float() - w.float()
            trained.copy_(w)
    info.update(recomposition=rinfo, layers=layers, kinds=list(cfg.kinds), target=cfg.target, loss=cfg.loss,
                per_layer=rows_out, n_train=len(train), n_heldout=len(heldout),
                n_tokens=int(sum(len(s) for s in train)), teacher_layers=pairing,
                seconds={"pairing_and_basis": round(t_pair, 1), "targets": round(t_targets, 1),
                         "training": round(time.perf_counter() - t0 - t_pair - t_targets, 1)})
    return deltas, info


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 6) + 0.0  # no "-0.0" in the record


def tuned_teacher(teacher, adapter_dir):
    """The teacher with a teacher-lora adapter merged into its weights (peft computes the delta)."""
    from pathlib import Path

    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise PktError(f"{adapter_dir}: no LoRA adapter there (adapter_config.json); semalign's fine-tuned "
                       "teacher is read from a teacher-lora run's adapter/")
    return PeftModel.from_pretrained(teacher, str(adapter_dir)).merge_and_unload()

