"""`pkt analyze params | representations | behaviour` end to end on tiny saved models (seconds)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pkt import testing

ROWS = [
    ("Natalia sold 48 clips in April and half as many in May. How many?", "48 + 24 = 72. Answer: 72"),
    ("def add(a, b):", "    return a + b"),
    ("What is the capital of France?", "The capital of France is Paris."),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tok = testing.tiny_tokenizer()
    t = testing.save_tiny(testing.tiny_model("qwen2", "teacher", len(tok)), tok, root / "teacher")
    s = testing.save_tiny(testing.tiny_model("qwen2", "student", len(tok)), tok, root / "student")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for u, a in ROWS))
    return t, s, str(data)


def pkt(*args):
    return testing.invoke_cli(args, catch_exceptions=False)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * sv[:r]) @ vh[:r]


def _max_abs_corner(w: torch.Tensor, x: int, y: int) -> tuple[int, int]:
    """The contiguous x×y block with the largest Σ|W|, first corner in row-major order (a plain loop)."""
    a = w.abs().double()
    sums = {(i, j): float(a[i:i + x, j:j + y].sum()) for i in range(a.shape[0] - x + 1) for j in range(a.shape[1] - y + 1)}
    best = max(sums.values())
    return min(k for k, v in sums.items() if v == best)


def test_params_pissa_and_seeking(saved, tmp_path):
    from pkt.models.load import load_model

    t, s, _ = saved
    r = 4
    res = pkt("analyze", "params", "--init", "pissa", "--init", "seeking", "--student", s, "--teacher", t,
              "--rank", str(r), "--teacher-dtype", "float32", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "params.json").read_text())
    assert set(out["records"]) == {"pissa", "seeking"}
    assert (tmp_path / "params.png").stat().st_size > 1000
    teacher, student = load_model(t), load_model(s)
    w_s = {(i, m): student.model.layers[i].mlp.get_submodule(m).weight.detach() for i in range(3)
           for m in ("up_proj", "down_proj")}
    # PiSSA: B·A is W's own top-r part, so cos(BA, W) = sqrt(top-r energy) (plain LoRA would give 0) and
    # cos(BA, W - BA) = 0.
    pissa = {(x["layer"], x["module"]): x for x in out["records"]["pissa"]}
    assert set(pissa) == set(w_s)
    for key, w in w_s.items():
        sv = torch.linalg.svdvals(w.double())
        assert pissa[key]["cos_BA_original"] == pytest.approx(float((sv[:r].square().sum() / sv.square().sum()).sqrt()),
                                                              abs=1e-5)
        assert abs(pissa[key]["cos_BA_remaining"]) < 1e-4
    # Seeking (no seeds): evenly spaced teacher layers 0, 2, 3 for the 3 student layers; in each teacher
    # weight the student-shaped block with the largest Σ|W|; B·A its rank-r part.
    blocks = {(b["student_layer"], b["module"]): b for b in out["seeking_blocks"]}
    seeking = {(x["layer"], x["module"]): x for x in out["records"]["seeking"]}
    assert set(blocks) == set(seeking) == set(w_s)
    for (i, m), w in w_s.items():
        tl = [0, 2, 3][i]
        tw = teacher.model.layers[tl].mlp.get_submodule(m).weight.detach()
        r0, c0 = _max_abs_corner(tw, *w.shape)
        assert (blocks[(i, m)]["teacher_layer"], blocks[(i, m)]["row0"], blocks[(i, m)]["col0"]) == (tl, r0, c0)
        ba = _rank_r(tw[r0:r0 + w.shape[0], c0:c0 + w.shape[1]], r)
        assert seeking[(i, m)]["cos_BA_original"] == pytest.approx(_cos(ba, w), abs=1e-5)
        assert seeking[(i, m)]["cos_BA_remaining"] == pytest.approx(_cos(ba, w.double() - ba), abs=1e-5)
        assert seeking[(i, m)]["norm_ratio"] == pytest.approx(float(ba.norm() / w.double().norm()), rel=1e-5)


def test_params_from_saved_adapter(saved, tmp_path):
    from pkt.analyse.params import lora_similarity, pissa_init
    from pkt.models.load import load_model

    _, s, _ = saved
    model = pissa_init(load_model(s), rank=4, kinds=("down",))
    model.save_pretrained(tmp_path / "adapter")
    want = lora_similarity(model)
    copy.deepcopy(model).unload().save_pretrained(tmp_path / "residual_base")  # the mutated (W - BA) base
    res = pkt("analyze", "params", "--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "residual_base"),
              "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "o" / "params.json").read_text())["records"]["adapter"]
    assert [round(r["cos_BA_original"], 5) for r in got] == [round(r["cos_BA_original"], 5) for r in want]
    # The same adapter on the *original* student with --base-is original gives the same numbers.
    res = pkt("analyze", "params", "--adapter", str(tmp_path / "adapter"), "--base", s, "--base-is", "original",
              "--out", str(tmp_path / "o2"))
    assert res.exit_code == 0, res.output
    got2 = json.loads((tmp_path / "o2" / "params.json").read_text())["records"]["adapter"]
    assert [round(r["cos_BA_remaining"], 4) for r in got2] == [round(r["cos_BA_remaining"], 4) for r in want]


def test_params_seeking_chooses_layers_and_blocks_by_teacher_sensitivity(saved, tmp_path, monkeypatch):
    """--seeds: the teacher's |w·∇w| on the first extract examples (computed here by plain autograd, one
    backward per example) picks the student's teacher layers (top layer sums, in order) and each block
    (the largest Σ sensitivity)."""
    from pkt.data.chat import tokenize_example
    from pkt.data.jsonl import ChatExample
    from pkt.data.tasks import get_task
    from pkt.models.load import load_model, load_tokenizer

    t, s, data = saved
    split = tmp_path / "data" / "pkt_splits" / get_task("gsm8k").split_dir
    split.mkdir(parents=True)
    (split / "extract.jsonl").write_text(open(data).read())
    monkeypatch.setenv("PKT_DATA_DIR", str(tmp_path / "data"))
    res = pkt("analyze", "params", "--init", "seeking", "--student", s, "--teacher", t, "--seeds", "2",
              "--rank", "2", "--teacher-dtype", "float32", "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "o" / "params.json").read_text())
    assert out["inits"]["seeking"].startswith("teacher sensitivity on 2 gsm8k extract seeds")

    teacher, tok = load_model(t), load_tokenizer(t)
    sens = {}
    for u, a in ROWS[:2]:
        f = tokenize_example(ChatExample(u, a), tok)
        teacher.zero_grad()
        teacher(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss.backward()
        for i, layer in enumerate(teacher.model.layers):
            for m in ("up_proj", "down_proj"):
                w = layer.mlp.get_submodule(m).weight
                sens[(i, m)] = sens.get((i, m), 0) + (w.detach() * w.grad).abs()
    layer_sum = [float(sum(sens[(i, m)].sum() for m in ("up_proj", "down_proj"))) for i in range(4)]
    top = sorted(sorted(range(4), key=lambda i: -layer_sum[i])[:3])
    student = load_model(s)
    for b in out["seeking_blocks"]:
        i, m = b["student_layer"], b["module"]
        assert b["teacher_layer"] == top[i]
        shape = student.model.layers[i].mlp.get_submodule(m).weight.shape
        assert (b["row0"], b["col0"]) == _max_abs_corner(sens[(top[i], m)], *shape)


def test_analyze_settings_defaults_then_config_then_flags(saved, tmp_path):
    """--config's `params:` section sets the options by name (one value of a repeatable option included), a
    flag on the command line overrides it; a key no option has is one error naming the file and key."""
    _, s, _ = saved
    cfg = tmp_path / "analyze.yaml"
    cfg.write_text(f"params:\n  init: pissa\n  student: {s}\n  rank: 2\n  modules: down\n")
    res = pkt("analyze", "params", "--config", cfg, "--rank", "3", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "o" / "params.json").read_text())
    assert (list(out["records"]), out["modules"], out["rank"], out["dtype"]) == (["pissa"], ["down"], 3, "float32")
    cfg.write_text("params:\n  rnak: 2\n")
    bad = testing.invoke_cli(["analyze", "params", "--config", cfg, "--out", tmp_path / "o2"])
    assert bad.exit_code != 0 and f"{cfg}: params.rnak: unknown setting" in str(bad.exception)
    assert not (tmp_path / "o2").exists()


def _np_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_representations_and_behaviour(saved, tmp_path):
    import torch.nn.functional as F

    from pkt.data.chat import IGNORE, tokenize_example
    from pkt.data.jsonl import ChatExample
    from pkt.models.load import load_model, load_tokenizer

    t, s, data = saved
    res = pkt("analyze", "representations", "--teacher", t, "--student", s, "--data", data, "--tokens", "all",
              "--max-tokens", "10000", "--dtype", "float32", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "representations.json").read_text())
    assert set(rep["modules"]) == {"up", "down", "v", "o", "residual"}
    for m in ("cka", "dcka", "rsa"):
        assert (tmp_path / f"representations_{m}.png").stat().st_size > 1000
    res = pkt("analyze", "behaviour", "--teacher", t, "--student", s, "--data", data, "--dtype", "float32",
              "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    beh = json.loads((tmp_path / "behaviour.json").read_text())
    assert (tmp_path / "behaviour.png").stat().st_size > 1000

    # The oracle: every example's tokens through each model, unbatched.
    tok = load_tokenizer(s)
    teacher, student = load_model(t), load_model(s)
    feats = [tokenize_example(ChatExample(u, a), tok) for u, a in ROWS]
    hs, kl, agree = {"t": [], "s": []}, [], []
    for f in feats:
        ids = torch.tensor([f["input_ids"]])
        with torch.no_grad():
            ot, os_ = (m(input_ids=ids, output_hidden_states=True) for m in (teacher, student))
        hs["t"].append(ot.hidden_states)
        hs["s"].append(os_.hidden_states)
        lt, ls = F.log_softmax(ot.logits[0].double(), -1), F.log_softmax(os_.logits[0].double(), -1)
        for pos in range(1, len(f["input_ids"])):
            if f["labels"][pos] != IGNORE:
                kl.append(float((lt[pos - 1].exp() * (lt[pos - 1] - ls[pos - 1])).sum()))
                agree.append(int(lt[pos - 1].argmax()) == int(ls[pos - 1].argmax()))
    # residual stream: the CLI's [student layer][teacher layer] CKA over all tokens of the three examples;
    # output_hidden_states gives the same states except the last one (taken after the final norm there)
    states = {k: [torch.cat([h[layer][0] for h in v]).double().numpy() for layer in range(len(v[0]) - 1)]
              for k, v in hs.items()}
    cka = rep["modules"]["residual"]["cka"]["matrix"]
    assert rep["n_tokens"] == sum(len(f["input_ids"]) for f in feats) and len(cka) == 4 and len(cka[0]) == 5
    for i, x in enumerate(states["s"]):
        for j, y in enumerate(states["t"]):
            assert cka[i][j] == pytest.approx(_np_cka(x, y), abs=1e-4), (i, j)
    summ = beh["summary"]
    assert (summ["n_examples"], summ["n_tokens"]) == (3, len(kl))
    assert summ["kl_mean"] == pytest.approx(sum(kl) / len(kl), rel=1e-4)  # KL(teacher ‖ student), not reversed
    assert summ["top1_agreement"] == pytest.approx(sum(agree) / len(agree))


def test_bad_input_is_one_line_error(saved, tmp_path):
    _, s, _ = saved
    r = subprocess.run([sys.executable, "-m", "pkt.cli", "analyze", "params", "--init", "lora", "--student", s,
                        "--out", str(tmp_path)], capture_output=True, text=True, env=os.environ, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("pkt: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
