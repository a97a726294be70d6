"""Faithful, slow re-implementation of LaTen's neuron attribution (docs/methods.md §2.2 step 1, §7.1 items 3–5).

Written from the description in docs/methods.md; a benchmark baseline and a test oracle. Its cost profile is
the reference's:

1. **List conversion** (``transfer_output``): every layer's recorded tensors become Python lists —
   layer input, attention output, post-attention residual, FFN output, layer output ([T, d] each),
   attention sub-values [H, T, head_dim] and FFN coefficients [T, d_ffn] — with ``.tolist()``, and are
   rebuilt with ``torch.tensor(list)`` when a layer is scored.
2. **Per-neuron loop**: for each FFN neuron i, the sub-value ``m_i · W_down[:, i]`` is added to the
   post-attention residual, normalised with LaTen's final-norm scale (``rsqrt(sqrt(Var(h_L)+1e-5)+1e-6)``
   times the norm weight, §7.1 item 3), sent through ``lm_head`` and ``log_softmax``; the score goes
   through ``.item()`` (rounded to 4 decimals) and a fresh full-vocabulary fp16 copy of the logits
   (``.cpu()`` of an fp16 model's output in the reference) is appended to a Python list with a
   ``"layer_neuron"`` string key. Attention neurons work the same way against the layer input.
3. **Python sort**: the FFN list is sorted per layer; the attention candidate list is never reset
   across layers and is re-sorted at every layer (quadratic, §7.1 item 4). Keys are parsed back from the
   ``"layer_neuron"`` strings.

Deliberate deviation (does not change the cost): attention neuron (h, j) is the o_proj input
``z[h·head_dim+j] · W_O[:, h·head_dim+j]`` at the last position — the neuron pkt scores — rather than
LaTen's last *source* position's weighted value, so that scores are comparable with pkt's.

``layers`` / ``max_neurons`` restrict the work to a subset (benchmarks time that subset and extrapolate
linearly per layer and per neuron); ``keep_logits=False`` drops the per-neuron logit copies (for tests).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from pkt.models.arch import ArchSpec, unwrap


@torch.no_grad()
def record(model, input_ids: torch.Tensor, spec: ArchSpec) -> dict:
    """One forward pass recording, per layer, the full-sequence tensors the forked model keeps."""
    n = spec.num_layers
    rec = {k: [None] * n for k in ("layer_in", "attn_out", "mid", "ffn_out", "layer_out", "heads", "coeff")}
    final = [None]
    hs = []

    def keep(key, i, which):
        def hook(mod, args, out=None):
            t = args[0] if which == "in" else (out[0] if isinstance(out, tuple) else out)
            rec[key][i] = t[0].detach().float()
        return hook

    for i, layer in enumerate(spec.layers(model)):
        hs.append(layer.get_submodule(spec.paths["input_norm"]).register_forward_pre_hook(keep("layer_in", i, "in")))
        hs.append(layer.get_submodule(spec.paths["post_attn_norm"]).register_forward_pre_hook(keep("mid", i, "in")))
        hs.append(layer.get_submodule(spec.paths["o"]).register_forward_hook(keep("attn_out", i, "out")))
        hs.append(layer.get_submodule(spec.paths["o"]).register_forward_pre_hook(keep("heads", i, "in")))
        hs.append(layer.get_submodule(spec.paths["down"]).register_forward_hook(keep("ffn_out", i, "out")))
        hs.append(layer.get_submodule(spec.paths["down"]).register_forward_pre_hook(keep("coeff", i, "in")))
        hs.append(layer.register_forward_hook(keep("layer_out", i, "out")))
    hs.append(spec.final_norm(model).register_forward_pre_hook(lambda m, a: final.__setitem__(0, a[0][0].float())))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    rec["final"] = final[0]
    return rec


def transfer_output(rec: dict, spec: ArchSpec, layers) -> dict:
    """``.tolist()`` of every recorded per-layer tensor (sub-values reshaped [H, T, head_dim])."""
    out = {}
    for i in layers:
        T = rec["layer_in"][i].shape[0]
        heads = rec["heads"][i].view(T, spec.num_heads, spec.head_dim).permute(1, 0, 2)
        out[i] = {k: rec[k][i].tolist() for k in ("layer_in", "attn_out", "mid", "ffn_out", "layer_out", "coeff")}
        out[i]["heads"] = heads.tolist()
    return out


class LatenScorer:
    """LaTen's readout: log_softmax(lm_head(u · rsqrt(sqrt(Var(h_L)+1e-5)+1e-6) · g))."""

    def __init__(self, model, spec: ArchSpec, final_last: torch.Tensor):
        self.head = spec.lm_head(model)
        self.g = spec.final_norm(model).weight.detach().float()
        final_var = torch.sqrt(final_last.float().var(unbiased=False) + 1e-5)
        self.scale = torch.rsqrt(final_var + 1e-6)

    def logits(self, u: torch.Tensor) -> torch.Tensor:
        x = (u * self.scale * self.g).to(self.head.weight.dtype)
        return F.linear(x, self.head.weight, self.head.bias).float()


@torch.no_grad()
def reference_attribute(model, input_ids: torch.Tensor, target: int, layers=None, max_neurons: int | None = None,
                        keep_logits: bool = True) -> dict:
    """LaTen-style attribution of ``target`` after ``input_ids`` (see the module docstring).

    Returns ``{"ffn": {(layer, i): score}, "attn": {...}, "ffn_layers": {layer: score}, "attn_layers": {...},
    "ffn_order": [...], "attn_order": [...], "seconds": {...}, "n": {...}}``: the orders are the sorted
    ``(layer, neuron)`` keys as parsed from the strings; ``seconds`` splits the time by stage.
    """
    model = unwrap(model)
    spec = ArchSpec.from_model(model)
    layers = list(range(spec.num_layers)) if layers is None else list(layers)
    sec = {"forward": 0.0, "tolist": 0.0, "rebuild": 0.0, "ffn_loop": 0.0, "attn_loop": 0.0, "sort": 0.0}
    t = time.perf_counter()
    rec = record(model, input_ids.to(model.device), spec)
    sec["forward"] = time.perf_counter() - t
    t = time.perf_counter()
    lists = transfer_output(rec, spec, layers)
    sec["tolist"] = time.perf_counter() - t
    scorer = LatenScorer(model, spec, rec["final"][-1])
    ffn_all, attn_all = [], []  # attn_all is never reset per layer (as in the reference)
    res = {"ffn": {}, "attn": {}, "ffn_layers": {}, "attn_layers": {}, "ffn_order": [], "attn_order": []}
    n_ffn = n_attn = 0
    for layer in layers:
        t = time.perf_counter()
        L = lists[layer]
        layer_in = torch.tensor(L["layer_in"])[-1]
        attn_out = torch.tensor(L["attn_out"])[-1]
        mid = torch.tensor(L["mid"])[-1]
        ffn_out = torch.tensor(L["ffn_out"])[-1]
        heads = torch.tensor(L["heads"])  # [H, T, head_dim]
        coeff = torch.tensor(L["coeff"])[-1].tolist()  # last position, a Python list of floats
        z = heads[:, -1, :].reshape(-1).tolist()
        sec["rebuild"] += time.perf_counter() - t
        w_down = spec.linear(model, layer, "down").weight.detach().float()
        w_o = spec.linear(model, layer, "o").weight.detach().float()
        base_attn = torch.log_softmax(scorer.logits(layer_in), -1)
        base_ffn = torch.log_softmax(scorer.logits(mid), -1)
        res["attn_layers"][layer] = (torch.log_softmax(scorer.logits(layer_in + attn_out), -1)[target]
                                     - base_attn[target]).item()
        res["ffn_layers"][layer] = (torch.log_softmax(scorer.logits(mid + ffn_out), -1)[target]
                                    - base_ffn[target]).item()
        # FFN neurons, one at a time
        t = time.perf_counter()
        ffn_layer = []
        for i in range(len(coeff) if max_neurons is None else min(max_neurons, len(coeff))):
            cur_residual = mid + coeff[i] * w_down[:, i]
            cur_logits = scorer.logits(cur_residual)
            score = round((torch.log_softmax(cur_logits, -1)[target] - base_ffn[target]).item(), 4)
            ffn_layer.append([f"{layer}_{i}", score, cur_logits.half().cpu() if keep_logits else None])
            n_ffn += 1
        sec["ffn_loop"] += time.perf_counter() - t
        # attention neurons, one at a time
        t = time.perf_counter()
        for k in range(len(z) if max_neurons is None else min(max_neurons, len(z))):
            cur_residual = layer_in + z[k] * w_o[:, k]
            cur_logits = scorer.logits(cur_residual)
            score = round((torch.log_softmax(cur_logits, -1)[target] - base_attn[target]).item(), 4)
            attn_all.append([f"{layer}_{k}", score, cur_logits.half().cpu() if keep_logits else None])
            n_attn += 1
        sec["attn_loop"] += time.perf_counter() - t
        t = time.perf_counter()
        ffn_layer.sort(key=lambda e: e[1], reverse=True)
        ffn_all.extend(ffn_layer)
        attn_all.sort(key=lambda e: e[1], reverse=True)  # the whole list so far, every layer
        sec["sort"] += time.perf_counter() - t
    for entries, key in ((ffn_all, "ffn"), (attn_all, "attn")):
        for name, score, _ in entries:
            lay, idx = (int(p) for p in name.split("_"))
            res[key][(lay, idx)] = score
            res[f"{key}_order"].append((lay, idx))
    res["seconds"] = sec
    res["n"] = {"ffn": n_ffn, "attn": n_attn, "layers": len(layers), "logit_copies": len(ffn_all) + len(attn_all)}
    res["logit_copy_bytes"] = sum(e[2].numel() * e[2].element_size() for e in ffn_all + attn_all if e[2] is not None)
    return res
