"""benchmarks/bench_flops.py (P6/P7 of docs/benchmarks.md): its FLOP count is right, by hand and against
PyTorch's own FLOP counter on a real LoRA training step, its weight-byte count reads the config's tying, and
its ``--quick`` mode runs end to end on a tiny model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where benchmarks/ lives

from benchmarks import bench_flops as bf  # noqa: E402


def _config(tied: bool = False):
    from transformers import Qwen2Config

    # d 8, ffn 16, 2 layers, 2 heads × 4 (q 8 wide), 1 kv head × 4 (k, v 4 wide), vocab 100
    return Qwen2Config(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=4, tie_word_embeddings=tied,
                       max_position_embeddings=64)


def test_flops_per_token_hand_count():
    f = bf.lora_train_flops_per_token(_config(), r=2, seq=10)
    # per layer: q 8·8 + k 8·4 + v 8·4 + o 8·8 + gate 8·16 + up 8·16 + down 16·8 = 576; ×2 layers + lm_head 100·8
    assert f["params"] == 2 * 576 + 800 == 1952
    # LoRA r=2, r·(in+out): q 2·16 + k 2·12 + v 2·12 + o 2·16 + gate/up/down 3·2·24 = 256 per layer
    assert f["lora_params"] == 2 * 256 == 512
    assert f["forward"] == f["backward_input"] == 2 * 1952  # frozen base: no weight-gradient term
    assert f["lora"] == 6 * 512
    assert f["attention"] == 3 * 4 * 2 * 10 * 8  # ×3 fwd+bwd · 4·L·seq·(heads·head_dim)
    assert f["total"] == 3904 + 3904 + 3072 + 1920 == 12800
    # layer 0 q/k/v input gradients: base 2·8·(8+4+4) + lora_A 3·2·8·2
    assert f["autograd_skips"] == 256 + 96
    # tying does not change the matmuls (the lm_head is one matmul either way)
    assert bf.lora_train_flops_per_token(_config(tied=True), r=2, seq=10)["total"] == 12800


def test_flops_per_token_match_torch_flop_counter():
    """PyTorch counts the matmuls autograd really runs (eager attention, so its bmm are counted too): that is
    the formula minus the layer-0 input gradients autograd skips, exactly."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from pkt.align.lora_init import make_lora_model

    torch.manual_seed(0)
    model = make_lora_model(AutoModelForCausalLM.from_config(_config(), attn_implementation="eager"), "lora",
                            r=2, alpha=2, dropout=0.0)
    model.train()
    batch, seq = 3, 10
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=torch.randint(0, 100, (batch, seq)), use_cache=False).logits.float().sum().backward()
    f = bf.lora_train_flops_per_token(_config(), r=2, seq=seq)
    assert counter.get_total_flops() == batch * seq * (f["total"] - f["autograd_skips"])


def test_decode_weight_bytes_counts_the_embedding_once():
    from transformers import AutoModelForCausalLM

    untied = AutoModelForCausalLM.from_config(_config(tied=False))
    b = bf.decode_weight_bytes(untied)
    emb = 100 * 8 * 4
    assert not b["tied"] and b["read"] == b["all_params"] - emb  # a step reads a few embedding rows, not the table
    tied = AutoModelForCausalLM.from_config(_config(tied=True))
    t = bf.decode_weight_bytes(tied)
    assert t["tied"] and t["read"] == t["all_params"] == b["all_params"] - emb  # one table, read as lm_head
    assert bf.decode_weight_bytes(tied.to(torch.bfloat16))["read"] == t["read"] // 2


def test_quick_mode_end_to_end(tmp_path):
    out = tmp_path / "p6p7.json"
    res = bf.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["seconds"] == res["seconds"]
    assert set(saved["peak_gflops"]) == {"float32", "bfloat16"} and saved["copy_gb_s"] > 0
    train = saved["train"]
    assert set(train["variants"]) == {"none", "bf16"}
    for v in train["variants"].values():
        assert len(v["loss"]) == 2 and all(math.isfinite(x) for x in v["loss"])
        assert v["tokens_per_s"] > 0 and v["of_peak"] > 0
    assert train["loss_max_rel_diff"] < 0.01 and train["autocast_speedup"] > 0
    assert [(r["dtype"], r["batch"]) for r in saved["decode"]] == [
        ("bfloat16", 1), ("bfloat16", 2), ("float32", 1), ("float32", 2)]
    # a rate is positive, or absent when load noise outweighed the few tiny steps (never negative)
    assert all(r["bound_tokens_per_s"] > 0 and min(r["t1_seconds"] + r["tn_seconds"]) > 0 for r in saved["decode"])
    assert all(x is None or x > 0 for r in saved["decode"] for x in (r["tokens_per_s"], r["tokens_per_s_best"]))
