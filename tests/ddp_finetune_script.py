"""Worker for tests/test_distributed.py: LoRA-fine-tune a tiny seeded model, write per-step losses and the
final LoRA weights (main process only). Run directly (one process) or under ``accelerate launch``."""

import json
import sys

import torch

from pkt.align.finetune import FinetuneConfig, finetune
from pkt.align.lora_init import make_lora_model
from pkt.data.jsonl import ChatExample
from pkt.testing import tiny_model, tiny_tokenizer

out = sys.argv[1]
torch.set_num_threads(1)
tok = tiny_tokenizer()
tok.padding_side = "right"
examples = [ChatExample(f"Question: what is {i} plus {i + 3}?", f"Answer: {2 * i + 3}") for i in range(10)]
model = make_lora_model(tiny_model("qwen2", "student", len(tok), seed=3), "lora", ("q", "v", "down"), r=4, alpha=8,
                        dropout=0.0)
with torch.no_grad():  # a non-zero B so that every LoRA factor gets gradients from step 1
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
# global batch 6 over micro-batches of 2: with 2 processes each takes 3 examples per step (2 + 1)
cfg = FinetuneConfig(r=4, alpha=8, lr=1e-2, epochs=2, batch_size=6, micro_batch_size=2, warmup_ratio=0.0,
                     max_length=64, seed=5, dropout=0.0)
logs = finetune(model, tok, examples, cfg, progress=False)
from accelerate import PartialState  # noqa: E402

if PartialState().is_main_process:
    lora = {n: p.detach().double().sum().item() for n, p in model.named_parameters() if "lora_" in n}
    json.dump({"losses": [r["loss"] for r in logs], "lora": lora, "world": PartialState().num_processes},
              open(out, "w"))
