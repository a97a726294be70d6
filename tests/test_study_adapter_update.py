"""pkt.studies.adapter_update (`pkt study adapter-update`) against the obvious oracle: the merged model minus the base,
on a tiny model, for a plain LoRA and for a PiSSA adapter saved converted (the form pkt saves a non-zero init in)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pkt import testing
from pkt.studies.adapter_update import base_tensors, main, summarise, update_norms

ROOT = Path(__file__).resolve().parents[1]

TARGETS = ["q_proj", "v_proj", "up_proj"]


def trained(model, init, tmp_path):
    """A peft model at `init`, its adapter moved as training would, saved as pkt saves it."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                  init_lora_weights=init))
    kw = {}
    if init == "pissa":
        peft_model.save_pretrained(tmp_path / "adapter_init")
        kw["path_initial_model_for_weight_conversion"] = str(tmp_path / "adapter_init")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "adapter", **kw)
    return peft_model


@pytest.mark.parametrize("init", [True, "pissa"])
def test_update_equals_merged_minus_base(tmp_path, tiny_tok, init):
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    model.save_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merged = trained(model, init, tmp_path).merge_and_unload().state_dict()
    expect = {k: (float((merged[k] - base[k]).pow(2).sum()), float(base[k].pow(2).sum()))
              for k in base if k.endswith(".weight") and k.split(".")[-2] in TARGETS}
    got = update_norms(tmp_path / "adapter", base_tensors(tmp_path / "base"))
    assert set(got) == set(expect)
    for k in expect:
        assert got[k][0] == pytest.approx(expect[k][0], rel=1e-4)
        assert got[k][1] == pytest.approx(expect[k][1], rel=1e-6)
    s = summarise(got)
    assert s["all"] == pytest.approx(math.sqrt(sum(d for d, _ in expect.values()) / sum(w for _, w in expect.values())),
                                     rel=1e-4)
    assert set(s) == {"all", *TARGETS} and s["all"] > 0


def test_table_and_bad_input(tmp_path, tiny_tok, capsys):
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    model.save_pretrained(tmp_path / "base")
    trained(model, True, tmp_path / "stage" / "run")
    assert main([str(tmp_path / "stage"), "--base", str(tmp_path / "base")]) == 0
    assert "| stage | all | q_proj | up_proj | v_proj |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no adapter_config.json"):
        main([str(tmp_path), "--base", str(tmp_path / "base")])
    with pytest.raises(SystemExit, match="no \\*.safetensors"):
        main([str(tmp_path / "stage"), "--base", str(tmp_path)])
