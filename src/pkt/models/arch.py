"""Architecture adapter: everything pkt needs to know about a decoder-only LM, read from the model.

``ArchSpec.from_model`` reads dimensions from ``model.config`` and checks them against the actual module
tree (biases, shapes, tied embeddings are *observed*, not assumed). Supporting a new family is data: an
entry in ``FAMILIES`` naming where the layers, attention/MLP projections and final norm live.
No size tables: a 0.5B and a 70B of the same family share one entry.

The projection-shape table (each projection's (out, in) as a function of the config's widths) lives here
once, in :func:`projection_shapes`: ``ArchSpec`` uses it for a loaded model, :class:`ConfigDims` for a bare
config (the pre-run checks and the plan, which build no model; the FLOP counts of the benchmarks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from pkt.errors import ModelError

# Module paths relative to the causal-LM object (after unwrapping peft).
_LLAMA_LIKE = {
    "layers": "model.layers",
    "final_norm": "model.norm",
    "embed": "model.embed_tokens",
    "lm_head": "lm_head",
    "attn": "self_attn",
    "mlp": "mlp",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "input_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
}
FAMILIES: dict[str, dict[str, str]] = {"llama": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "mistral": _LLAMA_LIKE}

ATTN_KINDS = ("q", "k", "v", "o")
MLP_KINDS = ("gate", "up", "down")
LINEAR_KINDS = ATTN_KINDS + MLP_KINDS
# peft target-module names for each kind (the last path component).
PEFT_NAMES = {k: _LLAMA_LIKE[k].split(".")[-1] for k in LINEAR_KINDS}


def projection_shapes(hidden_size: int, intermediate_size: int, q_dim: int, kv_dim: int) -> dict:
    """(out_features, in_features) of every decoder projection kind. Grouped-query attention makes k and v
    (``kv_dim`` = key/value heads x head_dim) narrower than q (``q_dim`` = query heads x head_dim)."""
    d, f = hidden_size, intermediate_size
    return {"q": (q_dim, d), "k": (kv_dim, d), "v": (kv_dim, d), "o": (d, q_dim),
            "gate": (f, d), "up": (f, d), "down": (d, f)}


@dataclass(frozen=True)
class ConfigDims:
    """The widths a config states, read without building the model (HF config attribute names).

    Multimodal configs keep the language model's widths in ``text_config``; that is what is read then.
    ``ArchSpec.from_model`` reads the same attributes and then checks them against the module tree.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool  # as the config states it (``tie_word_embeddings``)

    @classmethod
    def from_config(cls, config) -> "ConfigDims":
        c = getattr(config, "text_config", None) or config
        heads = c.num_attention_heads
        return cls(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab_size=c.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def shapes(self) -> dict:
        """kind -> (out_features, in_features), for every projection kind."""
        return projection_shapes(self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim)

    def weight_shape(self, kind: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection, from the config."""
        return self.shapes()[kind]


def _tied(head_w: torch.Tensor, embed_w: torch.Tensor, cfg) -> bool:
    """lm_head shares the embedding's storage. Offloaded weights are ``meta`` tensors (data_ptr 0 for both,
    whether tied or not), so for those the config's ``tie_word_embeddings`` has to be trusted instead."""
    if head_w.is_meta or embed_w.is_meta:
        return bool(getattr(cfg, "tie_word_embeddings", False))
    return head_w is embed_w or head_w.data_ptr() == embed_w.data_ptr()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model underneath a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def get_path(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


@dataclass(frozen=True)
class ArchSpec:
    family: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    bias: dict  # kind -> bool, observed on layer 0
    tied_embeddings: bool  # observed: lm_head.weight is embed.weight
    rms_norm_eps: float
    rope_theta: float | None
    paths: dict  # kind -> module path (see FAMILIES)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> "ArchSpec":
        model = unwrap(model)
        cfg = model.config
        family = getattr(cfg, "model_type", None)
        if family not in FAMILIES:
            arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
            raise ModelError(
                f"unsupported architecture {arch} (model_type={family!r}); supported families: {', '.join(FAMILIES)}"
            )
        paths = FAMILIES[family]
        dims = ConfigDims.from_config(cfg)
        layer0 = get_path(model, paths["layers"])[0]
        bias = {k: get_path(layer0, paths[k]).bias is not None for k in LINEAR_KINDS}
        embed = get_path(model, paths["embed"])
        head = get_path(model, paths["lm_head"])
        rope = getattr(cfg, "rope_parameters", None) or {}
        spec = cls(
            family=family,
            architecture=type(model).__name__,
            num_layers=dims.num_layers,
            hidden_size=dims.hidden_size,
            intermediate_size=dims.intermediate_size,
            num_heads=dims.num_heads,
            num_kv_heads=dims.num_kv_heads,
            head_dim=dims.head_dim,
            vocab_size=embed.weight.shape[0],  # observed on the module, like the biases and the tying
            bias=bias,
            tied_embeddings=_tied(head.weight, embed.weight, cfg),
            rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
            paths=dict(paths),
        )
        spec._check(model)
        return spec

    def _check(self, model: nn.Module) -> None:
        """The config must describe the modules actually present (it is read, so verify it)."""
        layers = self.layers(model)
        if len(layers) != self.num_layers:
            raise ModelError(f"config says {self.num_layers} layers, model has {len(layers)}")
        for kind in LINEAR_KINDS:
            got = tuple(self.linear(model, 0, kind).weight.shape)
            if got != self.weight_shape(kind):
                raise ModelError(f"{kind}_proj weight is {got}, config implies {self.weight_shape(kind)}")

    # ---- facts ----------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gqa_group(self) -> int:
        """Query heads per key/value head (1 = multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def weight_shape(self, kind: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection, from the config."""
        return projection_shapes(self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim)[kind]

    # ---- module access --------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_path(unwrap(model), self.paths["layers"])

    def layer(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i]

    def linear(self, model: nn.Module, layer: int, kind: str) -> nn.Linear:
        """The projection module (a peft LoraLayer's base layer is returned as the LoraLayer itself)."""
        if kind not in LINEAR_KINDS:
            raise ModelError(f"unknown projection kind {kind!r}; expected one of {', '.join(LINEAR_KINDS)}")
        return get_path(self.layer(model, layer), self.paths[kind])

    def module_name(self, layer: int, kind: str) -> str:
        """Fully qualified name in the plain model's ``named_modules()``."""
        return f"{self.paths['layers']}.{layer}.{self.paths[kind]}"

    def final_norm(self, model: nn.Module) -> nn.Module:
        return get_path(unwrap(model), self.paths["final_norm"])

    def embed(self, model: nn.Module) -> nn.Embedding:
        return get_path(unwrap(model), self.paths["embed"])

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return get_path(unwrap(model), self.paths["lm_head"])

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        b = ", ".join(k for k, v in self.bias.items() if v) or "none"
        return "\n".join(
            [
                f"architecture      {self.architecture} (family {self.family})",
                f"layers            {self.num_layers}",
                f"hidden size       {self.hidden_size}",
                f"FFN size          {self.intermediate_size} (gated: gate/up/down)",
                f"attention heads   {self.num_heads} query, {self.num_kv_heads} key/value "
                f"(GQA group {self.gqa_group}), head_dim {self.head_dim}",
                f"q/k/v/o shapes    {self.weight_shape('q')} {self.weight_shape('k')} "
                f"{self.weight_shape('v')} {self.weight_shape('o')}",
                f"biases            {b}",
                f"vocab             {self.vocab_size}",
                f"lm_head           {'tied to embeddings' if self.tied_embeddings else 'untied'}",
                f"rms_norm_eps      {self.rms_norm_eps}",
                f"rope_theta        {self.rope_theta}",
            ]
        )
