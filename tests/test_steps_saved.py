"""Held-out loss by optimizer step (`pkt study steps-saved`, docs/steps-saved.md).

The probe of the shared training loop changes nothing of the training (weights and per-step losses equal bit for
bit with and without it, for SFT and GKD, with dropout on); its step 0 is the untrained model's answer loss; the
study's arms see the same batches; a tiny study runs, resumes without stage work, restores from its records on
another machine and re-derives its report byte for byte; a bad config is one line naming the setting.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pkt.align.finetune import FinetuneConfig, Heldout, finetune, heldout_probe
from pkt.align.lora_init import make_lora_model
from pkt.data.chat import tokenize_example
from pkt.data.jsonl import ChatExample
from pkt.evaluate.generate import response_nll

TRAIN = [ChatExample(f"What is {a} + {b}?" + " Think." * (a % 3), f"{a} + {b} = {a + b}. The answer is {a + b}")
         for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1)]]
HELD = [ChatExample(f"What is {a} times {b}?", f"{a} * {b} = {a * b}. The answer is {a * b}")
        for a, b in [(2, 3), (4, 5), (6, 7)]]


def _lora(student, seed=0):
    torch.manual_seed(seed)  # the LoRA A init draws from torch's global RNG
    return make_lora_model(copy.deepcopy(student), "lora", r=4, alpha=8, dropout=0.1)


def _lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _cfg(**over) -> FinetuneConfig:
    return FinetuneConfig(**{"r": 4, "alpha": 8, "dropout": 0.1, "lr": 1e-2, "batch_size": 2, "micro_batch_size": 1,
                             "epochs": 2, "max_length": 64, "warmup_ratio": 0.25, "report_to": "none", **over})


TRAINING = ("step", "epoch", "loss", "lr", "grad_norm")


def test_the_probe_changes_no_training_bit(qwen_pair):
    """Dropout on, micro-batches, two epochs (a reshuffle): with the probe at 0, 1, 2, 4 and the last step the
    LoRA weights and every per-step training number are equal to those of a run without it, bit for bit."""
    _, student, tok = qwen_pair
    cfg = _cfg()
    plain_model, probed_model = _lora(student), _lora(student)
    plain = finetune(plain_model, tok, TRAIN, cfg, progress=False)
    plain_rng = torch.get_rng_state()
    probe = heldout_probe(Heldout(HELD, (0, 1, 2, 4, 8), batch_size=2), tok, cfg.style)
    probed = finetune(probed_model, tok, TRAIN, cfg, progress=False, probe=probe)
    assert len(plain) == 8  # 4 steps per epoch (7 examples by 2), 2 epochs
    assert [{k: r[k] for k in TRAINING} for r in probed] == [{k: r[k] for k in TRAINING} for r in plain]
    a, b = _lora_state(probed_model), _lora_state(plain_model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # the global RNG is where the run without the probe left it
    assert torch.equal(torch.get_rng_state(), plain_rng)
    assert [r["step"] for r in probe.records] == [0, 1, 2, 4, 8]
    assert [r.get("heldout_loss") for r in probed] == [None if k not in (1, 2, 4, 8) else
                                                         probe.records[[1, 2, 4, 8].index(k) + 1]["loss"]
                                                         for k in range(1, 9)]
    assert probe.records[-1]["loss"] != probe.records[0]["loss"]  # training moved the held-out loss
    # each step's examples, as indices into TRAIN: every epoch a permutation of all seven
    assert len(probe.batches) == 8 and sorted(sum(probe.batches[:4], [])) == list(range(7))
    assert sorted(sum(probe.batches[4:], [])) == list(range(7)) and probe.batches[:4] != probe.batches[4:]
    assert not probed_model.training and not any(m.training for m in probed_model.modules())


def test_the_probe_changes_no_gkd_bit(qwen_pair):
    """GKD samples the student's continuations from torch's RNG and draws its on-policy coin from the loop's: the
    probe leaves both where they were."""
    from pkt.align.gkd import GKDConfig, gkd_finetune

    teacher, student, tok = qwen_pair
    ft = _cfg(batch_size=4, micro_batch_size=2)
    gcfg = GKDConfig(lmbda=0.5, max_new_tokens=6)
    plain_model, probed_model = _lora(student), _lora(student)
    plain = gkd_finetune(plain_model, teacher, tok, TRAIN, ft, gcfg, progress=False)
    probe = heldout_probe(Heldout(HELD, (0, 2, 3)), tok, ft.style)
    probed = gkd_finetune(probed_model, teacher, tok, TRAIN, ft, gcfg, progress=False, probe=probe)
    keys = (*TRAINING, "on_policy")
    assert [{k: r[k] for k in keys} for r in probed] == [{k: r[k] for k in keys} for r in plain]
    a, b = _lora_state(probed_model), _lora_state(plain_model)
    assert all(torch.equal(a[n], b[n]) for n in a) and [r["step"] for r in probe.records] == [0, 2, 3]


def test_step_zero_is_the_untrained_models_answer_loss(qwen_pair):
    """A LoRA starts as the student (B = 0): the probe's step 0 is the plain student's response_nll on the same
    examples, tokenised as `pkt eval`'s answer loss tokenises them."""
    _, student, tok = qwen_pair
    held = Heldout(HELD, (0,), batch_size=2, max_length=1024)
    probe = heldout_probe(held, tok, "chat")
    finetune(_lora(student), tok, TRAIN, _cfg(epochs=1), progress=False, probe=probe)
    feats = [tokenize_example(e, tok, "chat", max_length=1024) for e in HELD]
    student.eval()
    ref = response_nll(student, feats, tok.pad_token_id, batch_size=2, progress=False)
    got = probe.records[0]
    assert [n for _, n in got["per_example"]] == [n for _, n in ref]
    assert [s for s, _ in got["per_example"]] == pytest.approx([s for s, _ in ref], rel=1e-6)
    assert got["loss"] == pytest.approx(sum(s for s, _ in ref) / sum(n for _, n in ref), rel=1e-6)
    assert got["tokens"] == sum(n for _, n in ref) > 0


def test_a_step_the_run_never_reaches_fails_before_training(qwen_pair):
    from pkt.errors import PktError

    _, student, tok = qwen_pair
    model = _lora(student)
    before = _lora_state(model)
    with pytest.raises(PktError, match=r"heldout_at 9: the run has 4 optimizer steps"):
        finetune(model, tok, TRAIN, _cfg(epochs=1), progress=False,
                 probe=heldout_probe(Heldout(HELD, (0, 9)), tok, "chat"))
    assert all(torch.equal(before[n], p) for n, p in _lora_state(model).items())
