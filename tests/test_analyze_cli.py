"""`pkt analyze params | representations | behaviour` end to end on tiny saved models (seconds)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

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


def test_params_pissa_and_seeking(saved, tmp_path):
    t, s, _ = saved
    res = pkt("analyze", "params", "--init", "pissa", "--init", "seeking", "--student", s, "--teacher", t,
              "--rank", "4", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "params.json").read_text())
    assert set(out["records"]) == {"pissa", "seeking"}
    assert abs(out["summary"]["pissa"]["up_proj"]["cos_BA_remaining"]["mean"]) < 1e-4
    assert len(out["seeking_blocks"]) == 2 * 3
    assert (tmp_path / "params.png").stat().st_size > 1000


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


def test_representations_and_behaviour(saved, tmp_path):
    t, s, data = saved
    res = pkt("analyze", "representations", "--teacher", t, "--student", s, "--data", data, "--max-tokens", "24",
              "--dtype", "float32", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "representations.json").read_text())
    assert rep["n_tokens"] == 24 and set(rep["modules"]) == {"up", "down", "v", "o", "residual"}
    assert len(rep["modules"]["up"]["rsa"]["matrix"]) == 3 and len(rep["modules"]["residual"]["cka"]["matrix"]) == 4
    for m in ("cka", "dcka", "rsa"):
        assert (tmp_path / f"representations_{m}.png").stat().st_size > 1000
    res = pkt("analyze", "behaviour", "--teacher", t, "--student", s, "--data", data, "--dtype", "float32",
              "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    beh = json.loads((tmp_path / "behaviour.json").read_text())
    assert beh["summary"]["n_examples"] == 3 and 0 <= beh["summary"]["top1_agreement"] <= 1
    assert (tmp_path / "behaviour.png").stat().st_size > 1000


def test_bad_input_is_one_line_error(saved, tmp_path):
    _, s, _ = saved
    r = subprocess.run([sys.executable, "-m", "pkt.cli", "analyze", "params", "--init", "lora", "--student", s,
                        "--out", str(tmp_path)], capture_output=True, text=True, env=os.environ, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("pkt: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
