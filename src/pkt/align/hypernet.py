"""LaTen's parameter translator: one small MLP per module type mapping teacher weight vectors to student ones.

What: ``H_m(u) = W2 · ReLU(W1 · u)`` with ``W1 ∈ R^{d_T×d_T}``, ``W2 ∈ R^{d_S×d_T}``, no bias, one per module
type m (up, down, v, o; gate optional). It is applied row-wise to each located teacher neuron's weight
vector (an up/gate/v row or a down/o column, all of length d_T = the teacher's hidden size) and returns
a vector of length d_S, the student's hidden size. It is shared across layers and neurons, as in the
reference (``knowledge_translator.py``): only the hidden width is translated; depth comes from layer
selection and FFN/attention width from top-k.

Why fp32 and tiny init: the reference initialises both matrices N(0, 1e-5), so the translated deltas
start ~0 and the student is almost unchanged at step 0 (docs/methods.md §7.1 item 7: this may also explain the
small effect). The init is configurable (``normal`` with a std, ``kaiming``, or ``zeros`` for W2 only,
which makes step 0 exactly the student).

Also here: the optimiser and schedule of the paper (AdamW wd 0.05, betas 0.9/0.95; OneCycle, 10%
warm-up, cosine, final_div_factor 1; a one-step cycle runs at the peak lr) and checkpoint save/load.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from pkt.errors import PktError

MODULE_KINDS = ("gate", "up", "down", "v", "o")
DEFAULT_KINDS = ("up", "down", "v", "o")
INITS = ("normal", "kaiming", "zeros")


class Translator(nn.Module):
    """d_in → d_in → d_out MLP with ReLU and no bias (the reference's hypernetwork for one module type)."""

    def __init__(self, d_in: int, d_out: int, init: str = "normal", init_std: float = 1e-5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_in, bias=False)
        self.fc2 = nn.Linear(d_in, d_out, bias=False)
        if init == "normal":
            nn.init.normal_(self.fc1.weight, std=init_std)
            nn.init.normal_(self.fc2.weight, std=init_std)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(self.fc1.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.fc2.weight, a=math.sqrt(5))
        elif init == "zeros":  # output exactly 0 at step 0, fc1 still random so gradients flow to fc2
            nn.init.normal_(self.fc1.weight, std=init_std)
            nn.init.zeros_(self.fc2.weight)
        else:
            raise PktError(f"hypernetwork init {init!r}: expected one of {', '.join(INITS)}")

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(u)))


class HyperNet(nn.Module):
    """One :class:`Translator` per transferred module type."""

    def __init__(self, d_teacher: int, d_student: int, kinds=DEFAULT_KINDS, init: str = "normal",
                 init_std: float = 1e-5, seed: int | None = None):
        super().__init__()
        bad = [k for k in kinds if k not in MODULE_KINDS]
        if bad or not kinds:
            raise PktError(f"hypernetwork module types {list(kinds)}: choose from {', '.join(MODULE_KINDS)}")
        self.meta = {"d_teacher": d_teacher, "d_student": d_student, "kinds": list(kinds), "init": init,
                     "init_std": init_std}
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            self.nets = nn.ModuleDict({k: Translator(d_teacher, d_student, init, init_std) for k in kinds})
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)

    @property
    def kinds(self) -> list[str]:
        return list(self.nets.keys())

    def forward(self, kind: str, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.shape[-1] != self.meta["d_teacher"]:
            raise PktError(f"{kind} vectors have length {vectors.shape[-1]}, hypernetwork expects "
                           f"{self.meta['d_teacher']} (the teacher's hidden size)")
        return self.nets[kind](vectors.float())

    def translate(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply H_m to each module type's stacked teacher vectors."""
        return {k: self(k, v) for k, v in sources.items()}

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Atomic ``torch.save`` of {meta, state_dict, extra}."""
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save({"meta": self.meta, "state_dict": self.state_dict(), "extra": extra or {}}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "HyperNet":
        path = Path(path)
        if not path.is_file():
            raise PktError(f"{path}: no such hypernetwork checkpoint")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        m = blob["meta"]
        net = cls(m["d_teacher"], m["d_student"], m["kinds"], m["init"], m["init_std"], seed=0)  # keeps global RNG
        net.load_state_dict(blob["state_dict"])
        return net


def penalty(translated: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_m mean(H_m(K_m)²): the reference's "MSE for constraint" (an L2 pull of the deltas towards 0)."""
    return sum(t.pow(2).mean() for t in translated.values())


def optimizer(net: HyperNet, lr: float = 3e-4, weight_decay: float = 0.05, betas=(0.9, 0.95)):
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, betas=tuple(betas))


def one_cycle(opt, lr: float, total_steps: int, pct_start: float = 0.1):
    """OneCycleLR as in train_LaTen.py (cosine anneal, final_div_factor 1).

    A one-step cycle has no room for warm-up or annealing, and torch's OneCycleLR would run its only step
    at lr/25 (its end point): that step runs at the peak ``lr`` instead.
    """
    if total_steps < 1:
        raise PktError(f"training needs at least one step, got {total_steps}")
    if total_steps == 1:
        for g in opt.param_groups:
            g["lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=pct_start,
                                               anneal_strategy="cos", final_div_factor=1.0)
