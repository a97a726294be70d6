"""Similarity measures as pure tensor functions: flattened cosine, linear CKA, debiased CKA and RSA.

Conventions: activations are ``[n, d]`` (n samples = tokens, d features); two activations compared with
each other must have the same n (the same tokens) but may have any widths. All reductions run in float64
unless a ``dtype`` is given.

* **Linear CKA** (Kornblith et al. 2019): with centred features X, Y,
  ``CKA = <K_c, L_c>_F / (||K_c||_F ||L_c||_F)``, ``K_c = X_c X_cᵀ``. In [0, 1]; invariant to orthogonal
  transforms and isotropic scaling of either side.
* **Debiased CKA**: the same ratio with the unbiased HSIC estimator of Song et al. (2012) (used for CKA by
  Nguyen, Raghu & Kornblith 2021). ``unbiased_centre_gram`` turns a Gram matrix into ``K_u`` such that
  ``<K_u, L_u>_F = n(n-3)·HSIC_1(K, L)``. It can be (slightly) negative.
* **RSA**: Pearson correlation of the strict upper triangles of the token-by-token cosine matrices of X
  and Y. In [-1, 1].

Comparing many layers with many layers only needs each layer's n×n matrix once: ``layer_vectors``
reduces one activation matrix to three *unit* vectors (one per measure) so that every score of a
teacher-layer × student-layer matrix is one dot product (``pairwise``). Symmetric n×n matrices are
packed as ``[diag, √2·strict-upper]`` so that the dot product of two packed vectors is the Frobenius
inner product of the matrices, at half the memory.
"""

from __future__ import annotations

import math

import torch

MEASURES = ("cka", "dcka", "rsa")
MEASURE_LABELS = {"cka": "linear CKA", "dcka": "debiased linear CKA", "rsa": "RSA (Pearson of cosine matrices)"}


# ---- single pairs -------------------------------------------------------------------------------

def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(vec(a), vec(b)) in float64 (0.0 when either is all zeros)."""
    if a.shape != b.shape:
        raise ValueError(f"flat_cosine: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    a = a.detach().reshape(-1).to(torch.float64)
    b = b.detach().reshape(-1).to(torch.float64)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def centre(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Subtract the per-feature mean over samples."""
    x = x.detach().to(dtype)
    return x - x.mean(0, keepdim=True)


def gram(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Linear Gram matrix of the *centred* features, ``X_c X_cᵀ`` (n×n)."""
    xc = centre(_as_2d(x), dtype)
    return xc @ xc.T


def centre_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/n."""
    k = k - k.mean(0, keepdim=True)
    return k - k.mean(1, keepdim=True)


def unbiased_centre_gram(k: torch.Tensor) -> torch.Tensor:
    """The U-centring of Song et al.: zero diagonal, then remove the (n−2)-normalised row/column means.

    For symmetric K, L: ``<U(K), U(L)>_F = n(n−3)·HSIC_1(K, L)`` (the unbiased HSIC estimator).
    """
    n = k.shape[0]
    if n < 4:
        raise ValueError("debiased CKA needs at least 4 samples")
    k = k.clone()
    k.fill_diagonal_(0)
    means = k.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    k = k - means[:, None] - means[None, :]
    k.fill_diagonal_(0)
    return k


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> float:
    """Song et al. (2012) HSIC_1, written out directly (a test oracle for ``unbiased_centre_gram``)."""
    n = k.shape[0]
    kt, lt = k.clone(), l.clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    one = torch.ones(n, dtype=k.dtype)
    term = (kt * lt).sum() + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float(term / (n * (n - 3)))


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, debiased: bool = False) -> float:
    """CKA of two (uncentred or centred) linear Gram matrices over the same samples."""
    if debiased:
        kc, lc = unbiased_centre_gram(k), unbiased_centre_gram(l)
    else:
        kc, lc = centre_gram(k), centre_gram(l)
    den = kc.norm() * lc.norm()
    return float((kc * lc).sum() / den) if den > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA between activations x [n, d1] and y [n, d2] (same samples, any widths)."""
    x, y = _as_2d(x), _as_2d(y)
    _same_n(x, y)
    if not debiased and x.shape[0] > max(x.shape[1], y.shape[1]):
        # Feature-space form: no n×n matrices (‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖) on centred features).
        xc, yc = centre(x), centre(y)
        den = (xc.T @ xc).norm() * (yc.T @ yc).norm()
        return float((yc.T @ xc).norm() ** 2 / den) if den > 0 else float("nan")
    return cka_from_grams(gram(x), gram(y), debiased=debiased)


def cosine_matrix(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Token-by-token cosine similarities of the raw (uncentred) rows of x."""
    x = _as_2d(x).detach().to(dtype)
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return xn @ xn.T


def rsa(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of the strict upper triangles of the cosine matrices of x and y."""
    x, y = _as_2d(x), _as_2d(y)
    _same_n(x, y)
    a, b = _upper(cosine_matrix(x)), _upper(cosine_matrix(y))
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else float("nan")


# ---- many layers at once ------------------------------------------------------------------------

def pack_symmetric(k: torch.Tensor) -> torch.Tensor:
    """[diag, √2·strict upper] of a symmetric matrix: packed·packed = Frobenius inner product."""
    n = k.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    return torch.cat([k.diagonal(), math.sqrt(2.0) * k[iu[0], iu[1]]])


def _unit(v: torch.Tensor) -> torch.Tensor:
    nrm = v.norm()
    return v / nrm if nrm > 0 else torch.full_like(v, float("nan"))


def layer_vectors(x: torch.Tensor, measures=MEASURES, compute_dtype: torch.dtype = torch.float64,
                  out_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Reduce activations x [n, d] to one unit vector per measure (see ``pairwise``).

    One n×n Gram matrix of the centred features serves all three measures: the raw Gram needed for the
    cosine matrix is recovered as ``K_c + a1ᵀ + 1aᵀ + ‖μ‖²11ᵀ`` with ``a = X_c μ`` (no second n×n×d
    product, no loss of precision from a large common offset).
    """
    x = _as_2d(x).detach()
    mu = x.to(compute_dtype).mean(0)
    xc = x.to(compute_dtype) - mu
    kc = xc @ xc.T  # already centred (rows and columns of X_c sum to zero)
    out: dict[str, torch.Tensor] = {}
    if "cka" in measures:
        out["cka"] = _unit(pack_symmetric(kc)).to(out_dtype)
    if "dcka" in measures:
        out["dcka"] = _unit(pack_symmetric(unbiased_centre_gram(kc))).to(out_dtype)
    if "rsa" in measures:
        a = xc @ mu
        raw = kc + a[:, None] + a[None, :] + mu @ mu
        d = raw.diagonal().clamp_min(torch.finfo(compute_dtype).tiny).sqrt()
        cos = raw / d[:, None] / d[None, :]
        u = _upper(cos)
        out["rsa"] = _unit(u - u.mean()).to(out_dtype)
    return out


def pairwise(a: list[torch.Tensor] | torch.Tensor, b: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Score matrix [len(a), len(b)] of unit vectors from ``layer_vectors`` (dot products), as float64."""
    a = torch.stack(list(a)) if not isinstance(a, torch.Tensor) else a
    b = torch.stack(list(b)) if not isinstance(b, torch.Tensor) else b
    if a.dtype != b.dtype:
        a, b = a.to(torch.float64), b.to(torch.float64)
    return (a @ b.T).to(torch.float64)


def similarity_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor], measure: str = "cka") -> torch.Tensor:
    """[len(xs), len(ys)] matrix of one measure between every pair of activations (convenience API)."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {', '.join(MEASURES)}")
    va = [layer_vectors(x, (measure,), out_dtype=torch.float64)[measure] for x in xs]
    vb = [layer_vectors(y, (measure,), out_dtype=torch.float64)[measure] for y in ys]
    return pairwise(va, vb)


# ---- helpers ------------------------------------------------------------------------------------

def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x
    return x.reshape(-1, x.shape[-1])


def _same_n(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"activations must cover the same samples: {x.shape[0]} vs {y.shape[0]} rows")


def _upper(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    return m[iu[0], iu[1]]
