"""Hypernetwork: shapes, inits, checkpoints, penalty and the paper's schedule."""

from __future__ import annotations

import pytest
import torch

from pkt.align.hypernet import HyperNet, one_cycle, optimizer, penalty
from pkt.errors import PktError


def test_shapes_init_and_no_bias():
    net = HyperNet(64, 48, init_std=1e-5, seed=0)
    assert net.kinds == ["up", "down", "v", "o"]
    out = net("up", torch.randn(7, 64))
    assert out.shape == (7, 48)
    for t in net.nets.values():
        assert t.fc1.weight.shape == (64, 64) and t.fc2.weight.shape == (48, 64)
        assert t.fc1.bias is None and t.fc2.bias is None
        assert 0.5e-5 < float(t.fc1.weight.detach().std()) < 2e-5
    assert float(out.detach().abs().max()) < 1e-6  # tiny init: the student is nearly unchanged at step 0
    zero = HyperNet(64, 48, init="zeros", seed=0)
    assert torch.equal(zero("o", torch.randn(3, 64)), torch.zeros(3, 48))
    with pytest.raises(PktError):
        zero("o", torch.randn(3, 65))
    with pytest.raises(PktError):
        HyperNet(64, 48, kinds=("q",))
    with pytest.raises(PktError):
        HyperNet(64, 48, init="uniform")


def test_seeded_init_is_reproducible_and_does_not_touch_global_rng():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = HyperNet(16, 8, seed=5), HyperNet(16, 8, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k in a.kinds:
        assert torch.equal(a.nets[k].fc1.weight, b.nets[k].fc1.weight)


def test_checkpoint_roundtrip(tmp_path):
    net = HyperNet(16, 8, kinds=("gate", "up"), init="kaiming", seed=1)
    net.save(tmp_path / "h.pt", extra={"step": 3})
    back = HyperNet.load(tmp_path / "h.pt")
    assert back.meta == net.meta
    x = torch.randn(4, 16)
    assert torch.equal(back("gate", x), net("gate", x))
    with pytest.raises(PktError):
        HyperNet.load(tmp_path / "missing.pt")


def test_penalty_gradient_and_schedule():
    net = HyperNet(16, 8, init="kaiming", seed=2)
    out = net.translate({"up": torch.randn(5, 16), "o": torch.randn(3, 16)})
    p = penalty(out)
    torch.testing.assert_close(p, out["up"].pow(2).mean() + out["o"].pow(2).mean())
    p.backward()
    for k in ("up", "o"):
        assert net.nets[k].fc1.weight.grad is not None and net.nets[k].fc2.weight.grad is not None
    opt = optimizer(net, lr=3e-4)
    assert opt.defaults["weight_decay"] == 0.05 and opt.defaults["betas"] == (0.9, 0.95)
    sched = one_cycle(opt, 3e-4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(3e-4, rel=1e-3) and lrs[0] < lrs[2]
    assert lrs[-1] > 3e-4 / 25 * 0.99  # final_div_factor 1: ends at the initial lr, not near 0
    with pytest.raises(PktError):
        one_cycle(opt, 3e-4, 0)
