"""Cross-check pkt's GKD against TRL's ``GKDTrainer`` (the LaTen authors' KD baseline) on the tiny pair.

pkt does not depend on TRL: its GKD (:mod:`pkt.align.gkd`) is the same loss in pkt's own fine-tuning loop.
This script checks the two agree where they overlap: TRL's ``generalized_jsd_loss`` against pkt's on random
logits (β = 0, 0.3, 1, masked positions), then one short ``GKDTrainer`` run (lmbda 1, beta 0, LoRA) on the
tiny random pair, to show that TRL's trainer runs with this project's pinned transformers and peft.

    pip install --target /tmp/trl_pkg --no-deps trl==1.16.0     # TRL's other requirements are already here
    PYTHONPATH=/tmp/trl_pkg python -m benchmarks.crosscheck_gkd_trl
"""

from __future__ import annotations

import os
import tempfile

import torch


def main() -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from pkt import testing
    from pkt.align.gkd import generalized_jsd_loss

    print(f"trl {trl.__version__}")
    tok = testing.tiny_tokenizer()
    v = len(tok)
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 7, v, generator=gen), 2 * torch.randn(2, 7, v, generator=gen)
    labels = torch.randint(0, v, (2, 7), generator=gen)
    labels[:, :3] = -100
    for beta in (0.0, 0.3, 1.0):
        ours = float(generalized_jsd_loss(s, t, labels, beta=beta, reduction="batchmean"))
        theirs = float(GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta))
        print(f"beta {beta}: trl {theirs:.6f}  pkt {ours:.6f}  |diff| {abs(ours - theirs):.2e}")
        assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i + 1}"}]} for i in range(8)]
    args = GKDConfig(output_dir=tempfile.mkdtemp(), lmbda=1.0, beta=0.0, max_new_tokens=8,
                     per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", max_length=64)
    trainer = GKDTrainer(model=testing.tiny_model("qwen2", "student", v),
                         teacher_model=testing.tiny_model("qwen2", "teacher", v), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"GKDTrainer: {result.global_step} steps, losses {losses}")


if __name__ == "__main__":
    main()
