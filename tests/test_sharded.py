"""Sensitivity, analysis and injection on a model that accelerate spreads over devices and offloads.

Why: a teacher larger than one device is loaded with a ``device_map``; modules accelerate *offloads*
(``"disk"`` entries, ``"cpu"`` next to a GPU, ``accelerate.cpu_offload``) keep their parameters on the
``meta`` device and an AlignDevicesHook brings the weights in for each forward pass. Code that reads
``module.weight`` or takes the device of ``next(model.parameters())`` then sees a meta tensor, and
gradients land on the per-pass copy instead of the parameter. A CPU-only machine exercises exactly that
mechanism: each tiny model is saved, then reloaded with ``pkt.models.load.load_model`` and a device_map
that offloads the embedding, every other decoder layer and the lm_head to disk (``offload_folder``);
sensitivity also runs under ``accelerate.cpu_offload`` (every module offloaded to CPU RAM). Every result
is compared with the same checkpoint loaded plainly. All of it runs on the CPU, so the offloaded and plain
computations do the same arithmetic: results are required equal to rtol 1e-6 (float32), and the
offloaded layers are checked to have non-zero sensitivity (the silent failure is all-zero or meta).
"""

from __future__ import annotations

import pytest
import torch

from pkt import testing
from pkt.analyse import behaviour as B
from pkt.analyse import params as P
from pkt.analyse import representations as R
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.inject import Injector, fuse
from pkt.locate.sensitivity import compute_sensitivity, tokenize_samples
from pkt.models.arch import ArchSpec
from pkt.models.load import load_model

EXAMPLES = [
    ChatExample("What is 2 + 3?", "2 + 3 = 5. The answer is 5"),
    ChatExample("def add(a, b):", "    return a + b"),
    ChatExample("The capital of France?", "The capital of France is Paris."),
]
RTOL, ATOL = 1e-6, 1e-9  # same CPU arithmetic on both sides; see the module docstring
OFFLOADED_LAYERS = (1, 3)  # decoder layers sent to disk (the student has 3 layers: only layer 1 there)


def _save(model, tok, path) -> str:
    return testing.save_tiny(model, tok, path)


def _disk_offloaded(path: str, tmp_path):
    """The checkpoint at ``path`` with the embedding, odd decoder layers and the lm_head on disk."""
    n_layers = ArchSpec.from_model(load_model(path)).num_layers
    device_map = {"model.embed_tokens": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    device_map |= {f"model.layers.{i}": "disk" if i in OFFLOADED_LAYERS else "cpu" for i in range(n_layers)}
    model = load_model(path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    # the precondition of every test here: these weights really are meta tensors
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cpu"
    return model


def _cpu_offloaded(path: str):
    from accelerate import cpu_offload

    model = cpu_offload(load_model(path), execution_device="cpu")
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


def _close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


# llama: tied embeddings, which offloading splits into two tensors; qwen2: GQA, biases, untied lm_head.
@pytest.mark.parametrize("kind,offload", [("llama", "disk"), ("qwen2", "disk"), ("llama", "cpu_offload")])
def test_sensitivity_offloaded_equals_plain(kind, offload, tiny_tok, tmp_path):
    tok = tiny_tok
    path = _save(testing.tiny_model(kind, "teacher", len(tok)), tok, tmp_path / "teacher")
    samples = tokenize_samples(EXAMPLES[:2], tok)
    plain = load_model(path)
    want = compute_sensitivity(plain, samples, progress=False)
    model = _disk_offloaded(path, tmp_path) if offload == "disk" else _cpu_offloaded(path)
    ids = torch.tensor([samples[0]["input_ids"]])
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
    got = compute_sensitivity(model, samples, progress=False)
    assert set(got) == set(want)
    for n in want:
        assert got[n].device.type == "cpu" and got[n].dtype == torch.float32, n
        _close(got[n], want[n], n)
    # the offloaded layers really were measured (hooks on meta parameters would leave zeros)
    for i in OFFLOADED_LAYERS:
        assert got[f"model.layers.{i}.mlp.down_proj.weight"].sum() > 0
    # the model is left as it was: still offloaded, accelerate's own hooks back, no gradients, same output
    from accelerate.hooks import AlignDevicesHook

    assert type(model.model.layers[1].mlp.up_proj._hf_hook) is AlignDevicesHook
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits_before)


def test_seeking_factors_from_offloaded_teacher(tiny_pair, tmp_path):
    teacher, student, tok = tiny_pair
    path = _save(teacher, tok, tmp_path / "teacher")
    plain, off = load_model(path), _disk_offloaded(path, tmp_path)
    # blocks chosen by |W| of the teacher weight, then factored: both read the offloaded weights
    f_want, b_want = P.seeking_factors(plain, student, rank=4, kinds=("up",))
    f_got, b_got = P.seeking_factors(off, student, rank=4, kinds=("up",))
    assert b_got == b_want
    assert {b.teacher_layer for b in b_got} & set(OFFLOADED_LAYERS)
    assert set(f_got) == set(f_want)
    for name, (b, a) in f_want.items():
        _close(f_got[name][0], b, name)
        _close(f_got[name][1], a, name)


def test_delta_similarity_on_offloaded_student(tiny_pair, tmp_path):
    _, student, tok = tiny_pair
    path = _save(student, tok, tmp_path / "student")
    plain, off = load_model(path), _disk_offloaded(path, tmp_path)
    spec = ArchSpec.from_model(plain)
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    for layer in (0, 1):  # layer 1 is on disk
        d = torch.zeros(spec.weight_shape("up"))
        d[:5, 3:9] = torch.randn(5, 6, generator=gen)
        deltas[spec.module_name(layer, "up")] = d
    want, got = P.delta_similarity(plain, deltas), P.delta_similarity(off, deltas)
    assert [r["name"] for r in got] == [r["name"] for r in want]
    for g, w in zip(got, want):
        nums = [k for k, v in w.items() if isinstance(v, float)]
        assert {k: g[k] for k in nums} == pytest.approx({k: w[k] for k in nums}, rel=RTOL, abs=ATOL)
        assert {k: g[k] for k in w if k not in nums} == {k: w[k] for k in w if k not in nums}
    assert all(r["norm_located"] > 0 for r in got)


def test_representation_and_behaviour_on_offloaded_teacher(tiny_pair, tmp_path):
    teacher, student, tok = tiny_pair
    path = _save(teacher, tok, tmp_path / "teacher")
    plain, off = load_model(path), _disk_offloaded(path, tmp_path)
    cfg = R.RepConfig(tokens="all", max_tokens=40, compute_dtype="float64")
    want = R.representation_similarity(plain, student, tok, EXAMPLES, cfg)
    got = R.representation_similarity(off, student, tok, EXAMPLES, cfg)
    assert got["n_tokens"] == want["n_tokens"] and got["layers"] == want["layers"]
    for kind, per in want["modules"].items():
        for measure, res in per.items():
            _close(torch.tensor(got["modules"][kind][measure]["matrix"]), torch.tensor(res["matrix"]),
                   f"{kind}/{measure}")
    kl_want = B.token_kl(plain, student, tok, EXAMPLES)
    kl_got = B.token_kl(off, student, tok, EXAMPLES)
    assert kl_got["teacher_top1"] == kl_want["teacher_top1"]
    _close(torch.tensor(kl_got["kl"]), torch.tensor(kl_want["kl"]), "kl")


def _deltas(spec, gen):
    out = {}
    for layer in range(spec.num_layers):
        for kind in ("up", "down", "v", "o"):
            out_f, in_f = spec.weight_shape(kind)
            n_axis, length = (out_f, in_f) if kind not in ("o", "down") else (in_f, out_f)
            idx = torch.randperm(n_axis, generator=gen)[: max(1, n_axis // 4)]
            out[(layer, kind)] = (idx, torch.randn(idx.numel(), length, generator=gen) * 0.5)
    return out


@torch.no_grad()
def test_injection_into_offloaded_student(tiny_pair, tmp_path):
    _, student, tok = tiny_pair
    path = _save(student, tok, tmp_path / "student")
    plain, off = load_model(path), _disk_offloaded(path, tmp_path)
    spec = ArchSpec.from_model(plain)
    deltas = _deltas(spec, torch.Generator().manual_seed(0))
    ids = torch.tensor([tok("Question: 48 clips in April, half in May. Answer: 72")["input_ids"]])
    ref = off(input_ids=ids).logits
    with Injector(plain, spec).set(deltas):
        want = plain(input_ids=ids).logits
    with Injector(off, spec).set(deltas):
        got = off(input_ids=ids).logits
    assert not torch.allclose(want, ref)  # the deltas do change the output
    _close(got, want, "injected logits")
    # Fusing would have to write into accelerate's offload store, which has no API for it: a clear
    # error before any weight is touched, rather than a fuse that silently does nothing.
    with pytest.raises(PktError, match="offloaded"):
        fuse(off, deltas, spec)
    assert torch.equal(off(input_ids=ids).logits, ref)


@pytest.mark.parametrize("kind,offload", [("llama", "disk"), ("qwen2", "disk"), ("qwen2", "cpu_offload")])
def test_attribution_on_offloaded_teacher(kind, offload, tiny_tok, tmp_path):
    """Layer and neuron scores (exact, top-vocabulary and certified top-n) equal the plain model's."""
    from pkt.locate.attribution import attribute, attribution_inputs

    path = _save(testing.tiny_model(kind, "teacher", len(tiny_tok)), tiny_tok, tmp_path / "teacher")
    plain = load_model(path)
    model = _disk_offloaded(path, tmp_path) if offload == "disk" else _cpu_offloaded(path)
    assert ArchSpec.from_model(model).tied_embeddings == ArchSpec.from_model(plain).tied_embeddings
    ids, target = attribution_inputs(EXAMPLES[0], tiny_tok)
    for kw in ({}, {"vocab_top": 16, "top": (3, 5)}):
        want, got = attribute(plain, ids, target, **kw), attribute(model, ids, target, **kw)
        assert got.logprob == pytest.approx(want.logprob, rel=RTOL)
        for field in ("attn_layers", "ffn_layers", "attn_neurons", "ffn_neurons"):
            _close(getattr(got, field), getattr(want, field), field)
        assert torch.isfinite(got.ffn_neurons).sum() > 0


def test_laten_locate_and_extract_from_offloaded_teacher(tiny_tok, tmp_path):
    """LaTen's pairing and the teacher vectors it reads come out the same from an offloaded teacher."""
    from pkt.laten import LatenConfig, locate, wrap_models
    from pkt.locate.pairing import extract

    t_path = _save(testing.tiny_model("qwen2", "teacher", len(tiny_tok)), tiny_tok, tmp_path / "teacher")
    student = testing.tiny_model("qwen2", "student", len(tiny_tok))
    cfg = LatenConfig(teacher="unused", student="unused", modules=["up", "down", "v", "o"], transfer_rate=0.25,
                      vocab_top=32, chunk=16, cutoff_len=64)
    out = []
    for teacher in (load_model(t_path), _disk_offloaded(t_path, tmp_path)):
        m = wrap_models(teacher, student, tiny_tok)
        p = locate(m, EXAMPLES[0], cfg, cfg.transfer_rate)
        out.append((p, extract(teacher, m.t_spec, m.s_spec, p, cfg.modules)[0]))
    (p0, src0), (p1, src1) = out
    assert p1.ffn_layers == p0.ffn_layers and p1.attn_layers == p0.attn_layers
    for (a, b), (c, d) in zip(p0.ffn + p0.attn, p1.ffn + p1.attn):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert src1.keys() == src0.keys()
    for kind in src0:
        _close(src1[kind], src0[kind], kind)
        assert src1[kind].abs().sum() > 0


@pytest.mark.parametrize("init", ["pissa", "seeking"])
def test_weight_rewriting_lora_inits_refuse_an_offloaded_student(init, tiny_tok, tmp_path):
    """PiSSA/Seeking rewrite the base weights; on offloaded ones that would be silently lost, so: an error."""
    from pkt.align.lora_init import make_lora_model

    path = _save(testing.tiny_model("qwen2", "student", len(tiny_tok)), tiny_tok, tmp_path / "student")
    model = _disk_offloaded(path, tmp_path)
    factors = {"unused": (torch.zeros(1, 1), torch.zeros(1, 1))}
    with pytest.raises(PktError, match="offloaded"):
        make_lora_model(model, init, ("up", "down"), r=2, alpha=2, factors=factors)
    make_lora_model(load_model(path), "pissa", ("up", "down"), r=2, alpha=2)  # the plain student is fine


def test_device_map_auto_with_max_memory_offloads_and_matches(tiny_tok, tmp_path):
    """What a user with a too-large teacher writes: ``device_map="auto"`` and a ``max_memory`` budget the model
    does not fit in. accelerate's planner puts the overflow on disk; sensitivity and attribution still equal
    the plain model's."""
    from pkt.locate.attribution import attribute, attribution_inputs

    path = _save(testing.tiny_model("qwen2", "teacher", len(tiny_tok)), tiny_tok, tmp_path / "teacher")
    plain = load_model(path)
    weight_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    model = load_model(path, device_map="auto", max_memory={"cpu": weight_bytes // 3},
                       offload_folder=str(tmp_path / "offload"))
    placed = set(model.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed, model.hf_device_map
    samples = tokenize_samples(EXAMPLES[:2], tiny_tok)
    want, got = (compute_sensitivity(m, samples, progress=False) for m in (plain, model))
    assert got.keys() == want.keys()
    for k in want:
        _close(got[k], want[k], k)
    ids, target = attribution_inputs(EXAMPLES[1], tiny_tok)
    a, b = (attribute(m, ids, target, vocab_top=16, top=(3, 5)) for m in (plain, model))
    _close(b.ffn_neurons, a.ffn_neurons, "ffn_neurons")
    _close(b.attn_layers, a.attn_layers, "attn_layers")
