"""Seeking's glue, from teacher sensitivity maps to the student's LoRA factors, against a slow oracle.

``pkt.postpkt.extract_factors`` decides three things that no other test pins down: which teacher layer
feeds which student layer, which sensitivity map chooses the block of which weight, and (for the
``neuron`` structure) which axis of a weight holds its neurons (rows of q/k/v/gate/up, columns of o/down).
The expected values here are rebuilt by obvious loops written from docs/methods.md §4, sharing nothing with
the library but torch: a layer's score is the sum of its sensitivities; the student's number of
top-scoring teacher layers is kept, re-sorted, and the i-th kept teacher layer feeds student layer i;
each teacher weight's *own* map picks the contiguous block of the student weight's shape with the
largest sum (the first corner in row-major order); B·A is that block's rank-r truncated SVD.
Two kinds of input: real sensitivity maps of the tiny teachers (whose ranking happens to keep teacher
layers 0-2, so they cannot tell the layer mapping from the identity) and planted maps whose answer is
known by construction (a ranking that drops an inner layer, a different hot block in every weight).
"""

from __future__ import annotations

import json

import pytest
import torch

from pkt import testing
from pkt.data.jsonl import ChatExample
from pkt.locate.sensitivity import compute_sensitivity, tokenize_samples
from pkt.models.arch import ArchSpec
from pkt.postpkt import SeekingConfig, extract_factors

# Written out by hand (not read from pkt.models.arch): where each kind lives in a Llama/Qwen2 layer.
PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
VOCAB_PATHS = {"embed": "model.embed_tokens", "lm_head": "lm_head"}
LINEAR = tuple(PATHS)
EXAMPLES = [
    ChatExample("What is 2 + 3?", "2 + 3 = 5. The answer is 5"),
    ChatExample("Write a function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ChatExample("The capital of France?", "Paris"),
]


# ---- the oracle -----------------------------------------------------------------------------------

def _teacher_weight_name(teacher, layer: int | None, kind: str) -> str:
    if layer is not None:
        return f"model.layers.{layer}.{PATHS[kind]}.weight"
    tied = teacher.lm_head.weight is teacher.model.embed_tokens.weight
    # a tied lm_head *is* the embedding parameter: named_parameters() lists it once, under the embedding
    return "model.embed_tokens.weight" if kind == "embed" or tied else "lm_head.weight"


def _student_module(layer: int | None, kind: str) -> str:
    return f"model.layers.{layer}.{PATHS[kind]}" if layer is not None else VOCAB_PATHS[kind]


def oracle_layers(sens: dict[str, torch.Tensor], n_teacher: int, n_student: int) -> list[int]:
    scores = [0.0] * n_teacher
    for name, s in sens.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            scores[int(parts[2])] += float(s.double().sum())
    ranked = sorted(range(n_teacher), key=lambda i: (-scores[i], i))  # ties to the lower index
    return sorted(ranked[:n_student])


def oracle_corner(s: torch.Tensor, x: int, y: int) -> tuple[int, int]:
    best, corner = None, None
    for i in range(s.shape[0] - x + 1):
        for j in range(s.shape[1] - y + 1):
            v = float(s[i:i + x, j:j + y].double().sum())
            if best is None or v > best:
                best, corner = v, (i, j)
    return corner


def rank_r(block: torch.Tensor, r: int) -> torch.Tensor:
    u, sv, vh = torch.linalg.svd(block.double(), full_matrices=False)
    return (u[:, :r] * sv[:r]) @ vh[:r]


def oracle_extraction(teacher, student, sens, kinds, rank: int) -> tuple[list[int], dict]:
    """(chosen teacher layers, {student module: (teacher weight name, row0, col0, expected B·A)})."""
    n_t, n_s = len(teacher.model.layers), len(student.model.layers)
    chosen = oracle_layers(sens, n_t, n_s)
    jobs = [(chosen[j], j, k) for j in range(n_s) for k in kinds if k in PATHS]
    jobs += [(None, None, k) for k in kinds if k in VOCAB_PATHS]
    want = {}
    for t_layer, s_layer, kind in jobs:
        t_name = _teacher_weight_name(teacher, t_layer, kind)
        s_name = _student_module(s_layer, kind)
        x, y = student.get_submodule(s_name).weight.shape
        r0, c0 = oracle_corner(sens[t_name], x, y)
        w = teacher.get_parameter(t_name).detach()
        want[s_name] = (t_name, r0, c0, rank_r(w[r0:r0 + x, c0:c0 + y], rank))
    return chosen, want


def _assert_factor(b: torch.Tensor, a: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = b.double() @ a.double()
    # svd_factors works in fp32: agreement to a few fp32 roundings of the block's scale (another block, layer
    # or rank would differ by the order of the block itself)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4 * float(want.abs().max()), msg=lambda m: f"{what}: {m}")


# ---- real sensitivity maps of the tiny teachers ---------------------------------------------------

@pytest.mark.parametrize("kinds", [LINEAR + ("embed", "lm_head"), ("o", "down")])
def test_factors_from_real_sensitivity_match_the_oracle(tiny_pair, kinds):
    teacher, student, tok = tiny_pair
    sens = compute_sensitivity(teacher, tokenize_samples(EXAMPLES, tok), progress=False)
    rank = 4
    cfg = SeekingConfig(rank=rank, targets=list(kinds))
    factors, extra, manifest = extract_factors(teacher, sens, ArchSpec.from_model(student), cfg, progress=False)
    chosen, want = oracle_extraction(teacher, student, sens, kinds, rank)
    assert manifest["teacher_layers"] == chosen
    assert manifest["layer_map"] == {str(j): i for j, i in enumerate(chosen)}
    assert set(factors) == set(want) and extra == {}
    blocks = {b["student"]: b for b in manifest["blocks"]}
    for s_name, (t_name, r0, c0, ba) in want.items():
        b, a = factors[s_name]
        x, y = student.get_submodule(s_name).weight.shape
        assert (tuple(b.shape), tuple(a.shape)) == ((x, rank), (rank, y)), s_name
        _assert_factor(b, a, ba, s_name)
        blk = blocks[s_name]
        assert blk["teacher"] + ".weight" == t_name or (blk["kind"] == "lm_head" and t_name.startswith("model.embed"))
        assert (blk["rows"], blk["cols"]) == ({"start": r0, "stop": r0 + x}, {"start": c0, "stop": c0 + y}), s_name


# ---- planted maps: the answer is known by construction -------------------------------------------

LAYER_HEAT = [1.0, 0.01, 3.0, 2.0]  # the 4-layer teachers: layer 1 is the coldest, so keep [0, 2, 3]


def _planted_corner(li: int, ki: int, X: int, Y: int, x: int, y: int) -> tuple[int, int]:
    """A different corner for every (layer, kind), inside the range a block can start at."""
    return (3 * li + 5 * ki + 1) % (X - x + 1), (7 * li + 2 * ki + 3) % (Y - y + 1)


def _planted_block_maps(teacher, student):
    sens, corners = {}, {}
    for li in range(len(teacher.model.layers)):
        for ki, kind in enumerate(LINEAR):
            t_name = _teacher_weight_name(teacher, li, kind)
            X, Y = teacher.get_parameter(t_name).shape
            x, y = student.get_submodule(_student_module(0, kind)).weight.shape
            r0, c0 = _planted_corner(li, ki, X, Y, x, y)
            s = torch.zeros(X, Y)
            s[r0:r0 + x, c0:c0 + y] = LAYER_HEAT[li]  # every shifted window loses part of it: a unique max
            sens[t_name] = s
            corners[(li, kind)] = (r0, c0)
    return sens, corners


def test_planted_blocks_pick_layers_and_maps(tiny_pair):
    teacher, student, _ = tiny_pair
    sens, corners = _planted_block_maps(teacher, student)
    rank = 3
    factors, _, manifest = extract_factors(teacher, sens, ArchSpec.from_model(student),
                                           SeekingConfig(rank=rank, targets=list(LINEAR)), progress=False)
    assert manifest["teacher_layers"] == [0, 2, 3]
    for j, li in enumerate([0, 2, 3]):  # student layer j is filled from teacher layer li
        for kind in LINEAR:
            s_name = _student_module(j, kind)
            x, y = student.get_submodule(s_name).weight.shape
            r0, c0 = corners[(li, kind)]
            w = teacher.get_parameter(_teacher_weight_name(teacher, li, kind)).detach()
            _assert_factor(*factors[s_name], rank_r(w[r0:r0 + x, c0:c0 + y], rank), f"{s_name} <- layer {li}")


def _hot_neuron_maps(teacher, student, seed: int = 0):
    """Per weight: a random set of hot neurons on the non-residual axis (exactly as many as the student
    has) and, across them, a hot contiguous window of the residual axis."""
    g = torch.Generator().manual_seed(seed)
    sens, want = {}, {}
    for li in range(len(teacher.model.layers)):
        for kind in LINEAR:
            t_name = _teacher_weight_name(teacher, li, kind)
            X, Y = teacher.get_parameter(t_name).shape
            x, y = student.get_submodule(_student_module(0, kind)).weight.shape
            columns = kind in ("o", "down")  # these read the neurons (heads' outputs, FFN units) as inputs
            n_axis, n_keep, res_len, res_keep = (Y, y, X, x) if columns else (X, x, Y, y)
            hot = torch.sort(torch.randperm(n_axis, generator=g)[:n_keep]).values
            start = int(torch.randint(0, res_len - res_keep + 1, (1,), generator=g))
            s = torch.zeros(X, Y)
            if columns:
                s[:, hot] = 1.0
                s[start:start + res_keep, hot] = 2.0
            else:
                s[hot] = 1.0
                s[hot, start:start + res_keep] = 2.0
            sens[t_name] = s * LAYER_HEAT[li]
            want[(li, kind)] = (columns, hot, start)
    return sens, want


def test_neuron_structure_takes_neurons_on_the_right_axis(tiny_pair):
    teacher, student, _ = tiny_pair
    sens, planted = _hot_neuron_maps(teacher, student)
    rank = 3
    factors, extra, manifest = extract_factors(teacher, sens, ArchSpec.from_model(student),
                                               SeekingConfig(rank=rank, targets=list(LINEAR), structure="neuron"),
                                               progress=False)
    assert manifest["teacher_layers"] == [0, 2, 3]
    for j, li in enumerate([0, 2, 3]):
        for kind in LINEAR:
            s_name = _student_module(j, kind)
            x, y = student.get_submodule(s_name).weight.shape
            columns, hot, start = planted[(li, kind)]
            w = teacher.get_parameter(_teacher_weight_name(teacher, li, kind)).detach()
            if columns:
                assert torch.equal(extra[f"{s_name}.cols"], hot) and f"{s_name}.rows" not in extra, s_name
                block = w[start:start + x][:, hot]
            else:
                assert torch.equal(extra[f"{s_name}.rows"], hot) and f"{s_name}.cols" not in extra, s_name
                block = w[hot][:, start:start + y]
            _assert_factor(*factors[s_name], rank_r(block, rank), s_name)


# ---- end to end: pkt.postpkt.run_extraction on saved models, then the student's LoRA ------------------

def test_run_extraction_and_seeking_init_follow_the_oracle(tmp_path, monkeypatch, tiny_tok):
    from pkt.align.lora_init import make_lora_model
    from pkt.models.load import load_tokenizer
    from pkt.postpkt import load_extraction, run_extraction

    split = tmp_path / "data" / "pkt_splits" / "gsm"
    split.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": e.user}, {"role": "assistant", "content": e.assistant}]}
            for e in EXAMPLES]
    (split / "extract.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("PKT_DATA_DIR", str(tmp_path / "data"))
    v = len(tiny_tok)
    teacher, student = testing.tiny_model("qwen2", "teacher", v), testing.tiny_model("qwen2", "student", v)
    t_dir = testing.save_tiny(teacher, tiny_tok, tmp_path / "teacher")
    s_dir = testing.save_tiny(student, tiny_tok, tmp_path / "student")
    kinds, rank = ("q", "v", "o", "up", "down"), 4
    cfg = SeekingConfig(n_samples=2, rank=rank, targets=list(kinds))
    run_extraction(t_dir, s_dir, "gsm8k", cfg, tmp_path / "ext", progress=False, log=lambda s: None)
    factors, manifest = load_extraction(tmp_path / "ext")

    # the oracle's input: sensitivity of the first two seed examples, on the targeted teacher weights only,
    # tokenized by the saved teacher's tokenizer (reloaded as Qwen2Tokenizer, it splits text differently from
    # the in-memory tiny tokenizer)
    tok = load_tokenizer(t_dir)
    full = compute_sensitivity(teacher, tokenize_samples(EXAMPLES[:2], tok, cfg.style, cfg.max_length),
                               progress=False)
    targeted = {n: s for n, s in full.items() if any(n.endswith(PATHS[k] + ".weight") for k in kinds)}
    chosen, want = oracle_extraction(teacher, student, targeted, kinds, rank)
    assert manifest["teacher_layers"] == chosen and manifest["n_samples"] == 2
    assert set(factors) == set(want)
    for s_name, (_, _, _, ba) in want.items():
        _assert_factor(*factors[s_name], ba, s_name)

    # the student: every targeted module's effective LoRA update (scaling·B·A, α ≠ r) is the teacher block's
    # rank-r part, and base + update is the student's original weight
    original = {n: student.get_submodule(n).weight.detach().clone() for n in want}
    model = make_lora_model(student, "seeking", kinds, r=rank, alpha=2 * rank, dropout=0.0, factors=factors)
    root = model.get_base_model()
    for s_name, (_, _, _, ba) in want.items():
        m = root.get_submodule(s_name)
        update = m.scaling["default"] * (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())
        torch.testing.assert_close(update, ba, rtol=1e-3, atol=2e-4 * float(ba.abs().max()))
        torch.testing.assert_close(m.get_base_layer().weight.double() + update, original[s_name].double(),
                                   rtol=1e-5, atol=1e-5)
