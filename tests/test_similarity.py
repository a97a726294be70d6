"""Property tests of the similarity measures (pure tensors, milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pkt.analyse import similarity as S


def _acts(n=40, d=12, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + offset


def _orth(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _np_cka(x, y):
    """Kornblith et al.'s feature-space linear CKA in NumPy (independent reference)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(40, 12), (10, 30)])
def test_cka_self_is_one(shape, debiased):
    x = _acts(*shape)
    assert S.linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cka_invariant_to_orthogonal_and_isotropic_scaling(seed, debiased):
    x, y = _acts(50, 16, seed), _acts(50, 9, seed + 10)
    y = y + 0.5 * x[:, :9]  # related, so the score is not ~0
    base = S.linear_cka(x, y, debiased=debiased)
    q1, q2 = _orth(16, seed + 20), _orth(9, seed + 30)
    assert S.linear_cka(x @ q1, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert S.linear_cka(x @ q1, y @ q2, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert S.linear_cka(3.7 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    # Translation (the features are centred) also leaves it unchanged.
    assert S.linear_cka(x + 5.0, y - 2.0, debiased=debiased) == pytest.approx(base, abs=1e-9)


def test_cka_in_unit_interval_and_matches_numpy_reference():
    for seed in range(5):
        x, y = _acts(30, 7, seed), _acts(30, 11, seed + 100)
        v = S.linear_cka(x, y)
        assert 0.0 <= v <= 1.0
        assert v == pytest.approx(_np_cka(x.numpy(), y.numpy()), abs=1e-12)
        # Gram form == feature form.
        assert S.cka_from_grams(x @ x.T, y @ y.T) == pytest.approx(v, abs=1e-12)


def test_debiased_centring_equals_song_unbiased_hsic():
    x, y = _acts(25, 6, 3), _acts(25, 8, 4)
    k, l = x @ x.T, y @ y.T
    n = 25
    packed = (S.unbiased_centre_gram(k) * S.unbiased_centre_gram(l)).sum()
    assert float(packed) == pytest.approx(n * (n - 3) * S.hsic_unbiased(k, l), rel=1e-10)
    # Debiased CKA of independent data is near 0 (biased CKA is not, for n ~ d).
    xi, yi = _acts(60, 40, 5), _acts(60, 40, 6)
    assert abs(S.linear_cka(xi, yi, debiased=True)) < 0.1
    assert S.linear_cka(xi, yi) > 0.3


def test_rsa_bounds_and_identities():
    for seed in range(6):
        x, y = _acts(20, 5, seed, offset=1.0), _acts(20, 9, seed + 50, offset=-0.5)
        r = S.rsa(x, y)
        assert -1.0 - 1e-12 <= r <= 1.0 + 1e-12
    x = _acts(20, 5, 1, offset=1.0)
    assert S.rsa(x, x) == pytest.approx(1.0, abs=1e-12)
    # Cosine matrices are invariant to rotations and to per-token rescaling.
    scale = torch.linspace(0.5, 3.0, 20, dtype=torch.float64)[:, None]
    assert S.rsa(x, (x @ _orth(5, 2)) * scale) == pytest.approx(1.0, abs=1e-10)
    # RSA can be negative: y's cosine structure is the mirror image of x's.
    a = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], dtype=torch.float64)
    assert S.rsa(a, b) < 0


def test_flat_cosine_matches_direct():
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    direct = float(torch.dot(a.flatten().double(), b.flatten().double()) / (a.double().norm() * b.double().norm()))
    assert S.flat_cosine(a, b) == pytest.approx(direct, abs=1e-12)
    assert S.flat_cosine(a, -2 * a) == pytest.approx(-1.0)
    assert S.flat_cosine(a, torch.zeros_like(a)) == 0.0
    with pytest.raises(ValueError):
        S.flat_cosine(a, b.T)


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
def test_layer_vectors_pairwise_match_direct(out_dtype):
    xs = [_acts(24, d, s, offset=o) for d, s, o in [(6, 0, 0.0), (10, 1, 3.0), (4, 2, -1.0)]]
    ys = [_acts(24, d, s) + 0.3 * xs[0][:, :1] for d, s in [(8, 5), (3, 6)]]
    vx = [S.layer_vectors(x, out_dtype=out_dtype) for x in xs]
    vy = [S.layer_vectors(y, out_dtype=out_dtype) for y in ys]
    tol = 1e-10 if out_dtype == torch.float64 else 1e-5
    for m, fn in [("cka", lambda a, b: S.linear_cka(a, b)), ("dcka", lambda a, b: S.linear_cka(a, b, debiased=True)),
                  ("rsa", S.rsa)]:
        mat = S.pairwise([v[m] for v in vx], [v[m] for v in vy])
        assert mat.shape == (3, 2) and mat.dtype == torch.float64
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                assert float(mat[i, j]) == pytest.approx(fn(x, y), abs=tol), (m, i, j)
    assert torch.allclose(S.similarity_matrix(xs, xs, "cka").diagonal(), torch.ones(3, dtype=torch.float64))


def test_pack_symmetric_is_frobenius():
    a, b = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    a, b = a + a.T, b + b.T
    assert float(S.pack_symmetric(a) @ S.pack_symmetric(b)) == pytest.approx(float((a * b).sum()), abs=1e-10)


def test_mismatched_samples_rejected():
    with pytest.raises(ValueError):
        S.linear_cka(torch.randn(5, 3), torch.randn(6, 3))
