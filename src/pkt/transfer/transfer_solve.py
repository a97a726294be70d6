"""The closed-form fits of function transfer (docs/methods.md §9.2), in the primal or the dual (token) space.

Every fit of function transfer is a ridge regression on the n calibration tokens: the output map
M = (ỸₜᵀỸₜ + λI)⁻¹ ỸₜᵀỸₛ and the student update ΔWₛᵀ = (XₛᵀXₛ + λI)⁻¹ XₛᵀB. By the push-through identity
(XᵀX + λI)⁻¹Xᵀ = Xᵀ(XXᵀ + λI)⁻¹, the same solution needs only an n × n factorisation, the *dual* form: cheaper
whenever n is below the width d (the real pair's 8,960-wide FFN map on a few hundred tokens: n³ rather than d³
flops, n² rather than d² memory, and M itself is never formed: E M = (E Ỹₜᵀ) A). The *primal* form works
from the d × d Gram matrix, all that running statistics over many tokens keep. λ is the same in both forms:
``rel`` × tr(Gram) / d, with tr(XᵀX) = tr(XXᵀ) and d the width (never n).

Procrustes' polar factor of ỸₜᵀỸₛ is determined only on the spans of the calibration outputs (its rank is at
most n − 1 after centring): both forms keep the singular pairs above :data:`PROCRUSTES_RTOL` of the largest
and nothing else, the one partial isometry the data define, so that they agree whatever n is.
"""

from __future__ import annotations

import torch

# Procrustes keeps the singular pairs of ỸₜᵀỸₛ above this fraction of the largest: a null direction (the
# centring's, or any beyond n tokens) comes out at ~1e-13 of it in float64, from the statistics' centring too
PROCRUSTES_RTOL = 1e-10


def use_dual(n: int, width: int) -> bool:
    """The rule: a Gram matrix of ``width`` × ``width`` is factorised in the token space when the n tokens are
    fewer than its width (the n × n Gram is then the smaller of the two; equal widths stay primal)."""
    return n < width


def ridge_lambda(gram: torch.Tensor, rel: float, width: int | None = None) -> float:
    """λ = ``rel`` × tr(gram) / width, the width of the primal Gram (``gram``'s own size by default); the
    dual's n × n Gram has the same trace, so its λ names the primal width explicitly."""
    return rel * float(torch.trace(gram)) / (gram.shape[0] if width is None else width)


class Ridge:
    """(A + λI)⁻¹ applied to any number of right-hand sides after one factorisation. A + λI is symmetric
    positive definite once λ > 0 (Cholesky); a λ too small for float64 to see can leave it numerically
    indefinite: LU then. ``inplace`` adds λ to A's own diagonal (A is not used again)."""

    def __init__(self, a: torch.Tensor, lam: float, inplace: bool = False):
        g = a if inplace else a.clone()
        g.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(g)
        self.chol, self.lu = (chol, None) if int(info) == 0 else (None, torch.linalg.lu_factor(g))

    def __call__(self, rhs: torch.Tensor) -> torch.Tensor:
        if self.chol is not None:
            return torch.cholesky_solve(rhs, self.chol)
        return torch.linalg.lu_solve(*self.lu, rhs)


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, rel: float, inplace: bool = False) -> torch.Tensor:
    """(G + λI)⁻¹ rhs with λ = :func:`ridge_lambda`: the ridge solution given G = XᵀX and rhs = XᵀB."""
    return Ridge(gram, ridge_lambda(gram, rel), inplace)(rhs)


class TokenRidge:
    """W = argmin ‖XW − B‖² + λ‖W‖² with λ = ``rel`` × tr(XᵀX)/d, for any B on the tokens X (n × d): one
    factorisation, of XXᵀ + λI (dual) or XᵀX + λI (primal, ``dual`` None: by :func:`use_dual`)."""

    def __init__(self, x: torch.Tensor, rel: float, dual: bool | None = None):
        n, d = x.shape
        self.x, self.dual = x, use_dual(n, d) if dual is None else dual
        gram = x @ x.T if self.dual else x.T @ x
        self.lam = ridge_lambda(gram, rel, d)
        self.inv = Ridge(gram, self.lam, inplace=True)

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """W (d × b's columns): Xᵀ(XXᵀ + λI)⁻¹B = (XᵀX + λI)⁻¹XᵀB."""
        return self.x.T @ self.inv(b) if self.dual else self.inv(self.x.T @ b)


class OutputMap:
    """A fitted teacher → student output map M (Y_s ≈ Y_t M on centred outputs), kept as factors whose product
    is M: (M,) in the primal form; (Ỹₜᵀ, A) for the dual ridge map, (Q_t U, (Q_s V)ᵀ) for the dual Procrustes
    factor, so that the d_t × d_s matrix is never formed. ``r2``: the fit's R² (ridge), else None."""

    def __init__(self, factors: tuple[torch.Tensor, ...], r2: float | None, dual: bool):
        self.factors, self.r2, self.dual = factors, r2, dual

    def apply(self, e: torch.Tensor) -> torch.Tensor:
        """E M, for E with d_t columns (the teacher's effect on the tokens, or XₛᵀE)."""
        for f in self.factors:
            e = e @ f
        return e

    def matrix(self) -> torch.Tensor:
        """M itself (d_t × d_s; for tests and small maps)."""
        return self.apply(torch.eye(self.factors[0].shape[0], dtype=self.factors[0].dtype))


def _kept(s: torch.Tensor) -> int:
    return int((s > s[0] * PROCRUSTES_RTOL).sum()) if s.numel() and s[0] > 0 else 0


def primal_map(tt: torch.Tensor | None, ts: torch.Tensor, total: float, how: str, rel: float) -> OutputMap:
    """The map from the centred Grams C_tt = ỸₜᵀỸₜ (ridge only; overwritten) and C_ts = ỸₜᵀỸₛ, with
    total = ‖Ỹₛ‖². Procrustes: the polar factor U Vᵀ of C_ts on its kept singular pairs."""
    if how == "procrustes":
        u, s, vh = torch.linalg.svd(ts, full_matrices=False)
        r = _kept(s)
        return OutputMap((u[:, :r] @ vh[:r],), None, dual=False)
    lam = ridge_lambda(tt, rel)
    m = Ridge(tt, lam, inplace=True)(ts)
    # residual ‖Ỹ_s − Ỹ_t M‖² = tr(C_ss) − 2⟨M, C_ts⟩ + ⟨M, C_tt M⟩, and C_tt M = C_ts − λM at the ridge solution
    resid = total - float((m * ts).sum()) - lam * float(m.square().sum())
    return OutputMap((m,), 1 - resid / total if total > 0 else None, dual=False)


def token_map(yt: torch.Tensor, ys: torch.Tensor, how: str, rel: float, dual: bool | None = None) -> OutputMap:
    """The map fitted on the tokens' outputs Y_t (n × d_t) and Y_s (n × d_s), centred here; ``dual`` None: by
    :func:`use_dual` on d_t."""
    n, d_t = yt.shape
    dual = use_dual(n, d_t) if dual is None else dual
    yt, ys = yt - yt.mean(0), ys - ys.mean(0)
    total = float(ys.square().sum())
    if not dual:
        return primal_map(None if how == "procrustes" else yt.T @ yt, yt.T @ ys, total, how, rel)
    if how == "procrustes":
        # Ỹₜᵀ = Q_t R_t and Ỹₛᵀ = Q_s R_s, so C_ts = Q_t (R_t R_sᵀ) Q_sᵀ: the SVD of the small middle factor
        qt, rt = torch.linalg.qr(yt.T)
        qs, rs = torch.linalg.qr(ys.T)
        u, s, vh = torch.linalg.svd(rt @ rs.T, full_matrices=False)
        r = _kept(s)
        return OutputMap((qt @ u[:, :r], (qs @ vh[:r].T).T), None, dual=True)
    k = yt @ yt.T
    lam = ridge_lambda(k, rel, d_t)
    a = Ridge(k, lam, inplace=True)(ys)  # M = Ỹₜᵀ A
    # Ỹ_s − Ỹ_t M = Ỹ_s − K A = λA, since (K + λI) A = Ỹ_s
    resid = lam * lam * float(a.square().sum())
    return OutputMap((yt.T, a), 1 - resid / total if total > 0 else None, dual=True)
