"""LoRA initialisation from external factors (Seeking), PiSSA and plain LoRA, on stock peft.

Seeking factorises a teacher block W_blk = UΣVᵀ at rank r into B = U_rΣ_r, A = V_rᵀ (docs/methods.md §4.4)
and starts the student's LoRA from (B, A). To keep the student's function unchanged at init, the base
weight becomes W − BA (a "mutated init", like PiSSA's residual, docs/methods.md §6.2) so that
W − BA + BA = W. The reference does this with a hand-made "delta" adapter and two manual merges; here it
is one peft model, which peft can later convert into an ordinary LoRA (``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``).

peft multiplies the adapter by ``scaling = lora_alpha / r``; the factors are divided by it on the way in
so that scaling·B·A equals the rank-r teacher block for any α (with α = r it is 1, as in the reference).

LoRA dropout acts on the adapter's input, so it is a regulariser of the *update* only while the adapter
starts at zero (LoRA). A PiSSA adapter holds the student's own top-r components: dropout there perturbs
the model itself, and the first training step no longer sees the function it is meant to preserve. Each init
therefore has its authors' default (:data:`INIT_DROPOUT`): 0 for PiSSA (its authors' scripts), 0.05 for LoRA
and for Seeking (the Seeking reference's adapter config; its adapter starts non-zero too, but that is the
method as published, and its controls share it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pkt.errors import PktError
from pkt.models.arch import LINEAR_KINDS, PEFT_NAMES, ArchSpec

INITS = ("seeking", "pissa", "lora")
DEFAULT_KINDS = LINEAR_KINDS  # q, k, v, o, gate, up, down
VOCAB_KINDS = ("embed", "lm_head")
ADAPTER = "default"
# the dropout each init gets when none is given (see the module docstring)
INIT_DROPOUT = {"lora": 0.05, "seeking": 0.05, "pissa": 0.0}


def init_dropout(init: str, dropout: float | None = None) -> float:
    """The LoRA dropout of ``init``: ``dropout`` when given, else the init's own default."""
    if init not in INITS:
        raise PktError(f"init {init!r}: expected one of {', '.join(INITS)}")
    return INIT_DROPOUT[init] if dropout is None else dropout


def parse_kinds(kinds: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'q,k,v,o' or a list → validated tuple of module kinds (q k v o gate up down embed lm_head)."""
    items = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    items = [k.removesuffix("_proj") for k in items if k]
    bad = [k for k in items if k not in LINEAR_KINDS + VOCAB_KINDS]
    if bad or not items:
        raise PktError(f"module kinds {bad or items}: expected some of {', '.join(LINEAR_KINDS + VOCAB_KINDS)}")
    return tuple(dict.fromkeys(items))


def module_names(spec: ArchSpec, kinds: tuple[str, ...]) -> list[str]:
    """Fully qualified module names of every (layer, kind) the LoRA covers, in the plain model."""
    names = [spec.module_name(i, k) for i in range(spec.num_layers) for k in kinds if k in LINEAR_KINDS]
    names += [spec.paths[k] for k in kinds if k in VOCAB_KINDS]
    return names


def peft_targets(spec: ArchSpec, kinds: tuple[str, ...]) -> list[str]:
    """peft ``target_modules`` for the kinds (last path components, e.g. 'q_proj', 'embed_tokens')."""
    return [PEFT_NAMES[k] if k in LINEAR_KINDS else spec.paths[k].split(".")[-1] for k in kinds]


def svd_factors(w: torch.Tensor, rank: int, return_spectrum: bool = False):
    """Rank-r truncated SVD of ``w`` (fp32): B = U_rΣ_r [out×r], A = V_rᵀ [r×in] (and all singular values)."""
    if not 1 <= rank <= min(w.shape):
        raise PktError(f"LoRA rank {rank} must be between 1 and {min(w.shape)} for a {tuple(w.shape)} block")
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    b, a = (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()
    return (b, a, s) if return_spectrum else (b, a)


def lora_config(spec: ArchSpec, init: str, kinds, r: int = 16, alpha: float = 16, dropout: float | None = None,
                pissa_niter: int | None = None):
    from peft import LoraConfig

    kinds = parse_kinds(kinds)
    dropout = init_dropout(init, dropout)
    if init == "pissa":
        if any(k in VOCAB_KINDS for k in kinds):
            raise PktError("PiSSA init covers linear projections only; drop embed/lm_head from the targets")
        how = "pissa" if not pissa_niter else f"pissa_niter_{pissa_niter}"
    else:
        # seeking: random factors that are overwritten at once (False = peft's "random A and B")
        how = True if init == "lora" else False
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=peft_targets(spec, kinds),
                      init_lora_weights=how, task_type="CAUSAL_LM")


def make_lora_model(student: nn.Module, init: str, kinds=DEFAULT_KINDS, r: int = 16, alpha: float = 16,
                    dropout: float | None = None,
                    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    pissa_niter: int | None = None):
    """Wrap ``student`` in a peft LoRA with the given init; for ``seeking`` apply ``factors`` (see
    :func:`apply_factors`). The student's output is unchanged at init for all three inits. ``dropout``: None =
    the init's default (:data:`INIT_DROPOUT`)."""
    from accelerate.utils import has_offloaded_params
    from peft import get_peft_model

    spec = ArchSpec.from_model(student)
    kinds = parse_kinds(kinds)
    if init in ("seeking", "pissa"):
        # Both rewrite the base weights (W -> W - BA); accelerate reloads offloaded weights from its store on
        # every forward and cannot take the rewrite back, so the change would be silently lost.
        for name in module_names(spec, kinds):
            if has_offloaded_params(student.get_submodule(name)):
                raise PktError(f"init {init!r} rewrites {name}, whose weights accelerate offloaded (device_map "
                               "'disk'/'cpu' offload): load the student without offloading")
    if init == "seeking" and not factors:
        raise PktError("init 'seeking' needs extracted factors (run `pkt extract sensitivity` or give --teacher)")
    if init == "lora" and any(k in VOCAB_KINDS for k in kinds) and spec.tied_embeddings:
        raise PktError("LoRA on embed/lm_head of a student with tied embeddings is not supported")
    model = get_peft_model(student, lora_config(spec, init, kinds, r, alpha, dropout, pissa_niter))
    if init == "seeking":
        apply_factors(model, factors, spec, kinds)
    return model


@torch.no_grad()
def apply_factors(peft_model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: ArchSpec,
                  kinds) -> None:
    """Set every LoRA module to (B/scaling, A) and its base weight to W − B·A (fp32 arithmetic).

    ``factors`` maps plain-model module names (``ArchSpec.module_name``) to (B [out×r], A [r×in]) in the
    student's weight layout (embeddings too: [vocab×r], [r×hidden]). Every LoRA module must have factors:
    a module left at peft's random init would change the student's output.
    """
    from peft.tuners.lora import LoraLayer

    kinds = parse_kinds(kinds)
    if spec.tied_embeddings and any(k in VOCAB_KINDS for k in kinds):
        raise PktError("embed/lm_head transfer needs a student with untied embeddings: mutating a tied base "
                       "weight would also change the other end")
    root = peft_model.get_base_model()
    expected = set(module_names(spec, kinds))
    missing = expected - set(factors)
    if missing:
        raise PktError(f"no extracted factors for {len(missing)} student modules, e.g. {sorted(missing)[0]}")
    for name in sorted(expected):
        m = root.get_submodule(name)
        if not isinstance(m, LoraLayer):
            raise PktError(f"{name} carries no LoRA adapter (targets {kinds})")
        b, a = (t.detach().float() for t in factors[name])
        base = m.get_base_layer()
        w = base.weight
        scaling = m.scaling[ADAPTER]
        if ADAPTER in m.lora_A:
            la, lb = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
            if (lb.shape, la.shape) != (b.shape, a.shape):
                raise PktError(f"{name}: factors {tuple(b.shape)}·{tuple(a.shape)} do not fit LoRA "
                               f"{tuple(lb.shape)}·{tuple(la.shape)}")
            lb.copy_((b / scaling).to(lb))
            la.copy_(a.to(la))
        else:  # peft Embedding LoRA: delta = (B_e A_e)ᵀ·scaling with A_e [r×vocab], B_e [hidden×r]
            ea, eb = m.lora_embedding_A[ADAPTER], m.lora_embedding_B[ADAPTER]
            if (ea.shape, eb.shape) != (b.T.shape, a.T.shape):
                raise PktError(f"{name}: factors {tuple(b.shape)}·{tuple(a.shape)} do not fit the embedding LoRA")
            ea.copy_((b / scaling).T.to(ea))
            eb.copy_(a.T.to(eb))
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise PktError(f"{name}: factors give {b.shape[0]}×{a.shape[1]}, base weight is {tuple(w.shape)}")
        w.copy_((w.float() - (b @ a).to(w.device)).to(w.dtype))
