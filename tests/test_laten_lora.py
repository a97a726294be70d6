"""The laten-lora arm fine-tunes the LaTen-injected student: with a zero learning rate its merged model is
exactly student + Δ (an oracle built by hand from the delta file), and without the deltas exactly the student.
"""

from __future__ import annotations

import torch

from pkt.align.finetune import FinetuneConfig
from pkt.inject import save_deltas
from pkt.models.arch import ArchSpec
from pkt.models.load import load_model
from pkt.postpkt import SeekingConfig, run_postpkt
from pkt.testing import save_tiny


def test_laten_lora_starts_from_the_injected_student(tmp_path, qwen_pair, shared_data):
    _, student, tok = qwen_pair
    sdir = save_tiny(student, tok, tmp_path / "student")
    spec = ArchSpec.from_model(student)
    g = torch.Generator().manual_seed(0)
    out_f, in_f = spec.weight_shape("up")
    _, down_in = spec.weight_shape("down")
    deltas = {(1, "up"): (torch.tensor([0, 3, 5]), 0.5 * torch.randn(3, in_f, generator=g)),
              (0, "down"): (torch.tensor([2, 7]), 0.5 * torch.randn(2, spec.weight_shape("down")[0], generator=g))}
    assert down_in > 7 and out_f > 5
    save_deltas(deltas, tmp_path / "laten_deltas.safetensors")
    ft = FinetuneConfig(r=2, alpha=2, lr=0.0, epochs=1, batch_size=2, micro_batch_size=2, max_length=128, n_train=2,
                        dropout=0.0)
    run_postpkt(None, sdir, "gsm8k", "lora", tmp_path / "ll", ft, SeekingConfig(), progress=False, log=lambda s: None,
                base_deltas=tmp_path / "laten_deltas.safetensors")
    run_postpkt(None, sdir, "gsm8k", "lora", tmp_path / "plain", ft, SeekingConfig(), progress=False,
                log=lambda s: None)
    merged, plain = load_model(tmp_path / "ll" / "merged"), load_model(tmp_path / "plain" / "merged")
    base = load_model(sdir)
    for name, w in base.state_dict().items():
        expect = w.clone()
        for (layer, kind), (idx, val) in deltas.items():
            if name == spec.module_name(layer, kind) + ".weight":
                if kind == "up":
                    expect[idx] += val
                else:
                    expect[:, idx] += val.T
        assert torch.equal(merged.state_dict()[name], expect), name
        assert torch.equal(plain.state_dict()[name], w), name
    changed = [n for n, w in base.state_dict().items() if not torch.equal(merged.state_dict()[n], w)]
    assert sorted(changed) == sorted(spec.module_name(layer, kind) + ".weight" for layer, kind in deltas)
