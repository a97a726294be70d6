"""LaTen's pairing of located neurons, and the teacher's vectors that feed them (steps 2-3 of
:mod:`pkt.laten`).

**Pair**: teacher layers = the top-L_student by layer score, sorted by index, the i-th feeding student layer i
(separately for attention and FFN; :func:`pkt.locate.layers.select_layers`). In each pair of layers the top-n
neurons of both models are rank-matched (teacher's j-th best → student's j-th best) with n = int(rate × the
student's FFN width) for FFN and int(rate × the student's attention width num_heads·head_dim) for attention.

**Extract** the teacher's raw vectors: up/gate rows, down columns (FFN neurons); o columns and v rows
(attention neurons); all of length d_T. Under grouped-query attention several attention neurons read one v
row: the teacher side keeps the neuron's own row (duplicates allowed), the student side injects each v row
once, paired with the best-ranked located neuron that reads it (:func:`pair_v`).

**The random-teacher null** (``vectors="random"``): the same located neurons, each extracted vector replaced by a
fixed random direction of its own norm. Each direction is drawn from a generator seeded by ``seed``, the teacher
layer, the module kind and the neuron, so one teacher neuron gets the same random vector at every hypernetwork step
and at the apply, as a real one does (:func:`null_vectors`). It keeps everything LaTen's training can use but the
teacher's content: the hypernetwork, the located sites, the vectors' sizes and their consistency across steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import align_module_device

from pkt.errors import PktError
from pkt.inject import Deltas, axis
from pkt.locate.attribution import Attribution
from pkt.locate.layers import select_layers
from pkt.models.arch import ArchSpec

FFN_KINDS = ("gate", "up", "down")
ATTN_KINDS = ("v", "o")


@dataclass
class Pairing:
    """Which teacher neurons feed which student neurons (rank-matched), per student layer."""

    ffn_layers: list[int]  # teacher FFN layer feeding student layer i
    attn_layers: list[int]  # teacher attention layer feeding student layer i
    ffn: list[tuple[torch.Tensor, torch.Tensor]]  # (teacher idx [n], student idx [n]) in rank order
    attn: list[tuple[torch.Tensor, torch.Tensor]]  # indices h*head_dim+j of the o_proj input

    def summary(self) -> dict:
        return {"ffn_layers": self.ffn_layers, "attn_layers": self.attn_layers,
                "ffn_per_layer": int(self.ffn[0][0].numel()) if self.ffn else 0,
                "attn_per_layer": int(self.attn[0][0].numel()) if self.attn else 0}


def save_pairing(pairing: Pairing, path) -> None:
    """Write a pairing (layer lists and index tensors only: kilobytes) so that a later step translates the same
    located neurons without attributing both models again."""
    torch.save({"ffn_layers": list(pairing.ffn_layers), "attn_layers": list(pairing.attn_layers),
                "ffn": [(t.cpu(), s.cpu()) for t, s in pairing.ffn],
                "attn": [(t.cpu(), s.cpu()) for t, s in pairing.attn]}, path)


def load_pairing(path) -> Pairing:
    d = torch.load(path, map_location="cpu", weights_only=True)
    return Pairing([int(x) for x in d["ffn_layers"]], [int(x) for x in d["attn_layers"]],
                   [tuple(x) for x in d["ffn"]], [tuple(x) for x in d["attn"]])


def counts(student: ArchSpec, teacher: ArchSpec, rate: float) -> tuple[int, int]:
    """(FFN neurons, attention neurons) per layer: rate × the student's FFN / attention width."""
    n_ffn, n_attn = int(rate * student.intermediate_size), int(rate * student.q_dim)
    if n_ffn < 1 or n_attn < 1:
        raise PktError(f"transfer rate {rate} selects no neurons (student FFN {student.intermediate_size}, "
                       f"attention {student.q_dim}); raise it")
    if n_ffn > teacher.intermediate_size or n_attn > teacher.q_dim:
        raise PktError(f"transfer rate {rate} needs {n_ffn} FFN / {n_attn} attention neurons per layer but the "
                       f"teacher has only {teacher.intermediate_size} / {teacher.q_dim}")
    return n_ffn, n_attn


def pair(t_att: Attribution, s_att: Attribution, teacher: ArchSpec, student: ArchSpec, rate: float,
         layer_strategy: str = "score", seed: int = 0) -> Pairing:
    n_ffn, n_attn = counts(student, teacher, rate)
    n_layers = student.num_layers
    ffn_layers = select_layers(t_att.ffn_layers, n_layers, layer_strategy, seed)
    attn_layers = select_layers(t_att.attn_layers, n_layers, layer_strategy, seed)
    # topk returns indices sorted by descending score: position = rank.
    t_ffn = torch.topk(t_att.ffn_neurons[ffn_layers], n_ffn, dim=-1).indices
    s_ffn = torch.topk(s_att.ffn_neurons, n_ffn, dim=-1).indices
    t_attn = torch.topk(t_att.attn_neurons[attn_layers], n_attn, dim=-1).indices
    s_attn = torch.topk(s_att.attn_neurons, n_attn, dim=-1).indices
    return Pairing(ffn_layers, attn_layers, list(zip(t_ffn, s_ffn)), list(zip(t_attn, s_attn)))


def v_rows(neurons: torch.Tensor, spec: ArchSpec) -> torch.Tensor:
    """v_proj row read by attention neuron h*head_dim+j: (h // gqa_group)*head_dim + j."""
    return (neurons // spec.head_dim) // spec.gqa_group * spec.head_dim + neurons % spec.head_dim


def pair_v(t_idx: torch.Tensor, s_idx: torch.Tensor, teacher: ArchSpec, student: ArchSpec):
    """(teacher v rows, student v rows): one per distinct student row, from its best-ranked neuron."""
    s_rows = v_rows(s_idx, student)
    uniq, inverse = torch.unique(s_rows, return_inverse=True)
    ranks = torch.arange(s_rows.numel())
    first = torch.full((uniq.numel(),), s_rows.numel(), dtype=torch.long).scatter_reduce(0, inverse, ranks, "amin")
    keep = torch.sort(first).values  # ranks of first occurrences, in rank order
    return v_rows(t_idx[keep], teacher), s_rows[keep]


# ---- extraction and translation ------------------------------------------------------------------

Sites = dict[str, list[tuple[int, torch.Tensor]]]  # kind -> [(student layer, student indices)] in stacking order


VECTORS = ("real", "random")  # what extract returns: the teacher's vectors, or the random-teacher null's


def _row_seed(seed: int, t_layer: int, kind: str, position: int) -> int:
    """A 32-bit generator seed for one teacher position (torch's CPU generator keeps only a seed's low 32 bits, so
    the four numbers are hashed into them rather than packed)."""
    import hashlib

    key = f"{int(seed)}/{int(t_layer)}/{kind}/{int(position)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def null_vectors(real: torch.Tensor, index: torch.Tensor, t_layer: int, kind: str, seed: int) -> torch.Tensor:
    """The random-teacher null of the vectors ``real`` [n, d] extracted at positions ``index`` of a teacher
    module: row i is a standard-normal direction drawn for position index[i] alone (its generator seeded by
    (seed, t_layer, kind, index[i]), so it does not depend on which other positions are located, nor on their
    order), scaled to real[i]'s norm."""
    g = torch.Generator()
    z = torch.stack([torch.randn(real.shape[1], generator=g.manual_seed(_row_seed(seed, t_layer, kind, j)))
                     for j in index.tolist()]) if len(index) else real.new_zeros(real.shape)
    return z * (real.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True))


@torch.no_grad()
def extract(teacher, t_spec: ArchSpec, s_spec: ArchSpec, pairing: Pairing, kinds, vectors: str = "real",
            seed: int = 0) -> tuple[dict, Sites]:
    """Teacher vectors per module kind, stacked [N, d_T] (fp32), and where each goes in the student; with
    ``vectors="random"`` the random-teacher null's (:func:`null_vectors`, seeded by ``seed``)."""
    if vectors not in VECTORS:
        raise PktError(f"teacher vectors {vectors!r}: expected one of {', '.join(VECTORS)}")
    sources: dict[str, torch.Tensor] = {}
    sites: Sites = {}
    for kind in kinds:
        vecs, where = [], []
        for i in range(s_spec.num_layers):
            if kind in FFN_KINDS:
                t_layer, (t_idx, s_idx) = pairing.ffn_layers[i], pairing.ffn[i]
            else:
                t_layer, (t_idx, s_idx) = pairing.attn_layers[i], pairing.attn[i]
                if kind == "v":
                    t_idx, s_idx = pair_v(t_idx, s_idx, t_spec, s_spec)
            mod = t_spec.linear(teacher, t_layer, kind)
            with align_module_device(mod):  # an offloaded teacher's weights are meta outside forward
                w = mod.weight
                t_idx = t_idx.to(w.device)
                real = (w.index_select(0, t_idx) if axis(kind) == 0 else w.index_select(1, t_idx).T).float().cpu()
                if vectors == "random":
                    real = null_vectors(real, t_idx, t_layer, kind, seed)
                vecs.append(real)
            where.append((i, s_idx.cpu()))
        sources[kind] = torch.cat(vecs)
        sites[kind] = where
    return sources, sites


def to_deltas(translated: dict[str, torch.Tensor], sites: Sites) -> Deltas:
    """Split each kind's stacked translated vectors back into per-layer deltas."""
    out: Deltas = {}
    for kind, where in sites.items():
        parts = torch.split(translated[kind], [idx.numel() for _, idx in where])
        for (layer, idx), val in zip(where, parts):
            out[(layer, kind)] = (idx, val)
    return out
