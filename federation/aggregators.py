"""Byzantine-robust aggregation of n update vectors x_1..x_n ∈ R^d, f of them possibly adversarial.

    mean            Σ w_i x_i / Σ w_i                                    (not robust)
    trimmed_mean    per coordinate: drop the t = max(f, ⌊βn⌋) smallest and t largest values,
                    (weighted) mean of the rest (Yin et al. 2018)
    median          per-coordinate median (Yin et al. 2018)
    krum            x_i minimising Σ of its n−f−2 smallest ‖x_i − x_j‖²; n ≥ 2f+3
                    (Blanchard et al. 2017)
    multikrum       (weighted) mean of the m best Krum scores, m = n−f by default
    bulyan          θ = n−2f vectors chosen by repeated Krum, then per coordinate the mean of
                    the β = θ−2f values closest to their median; n ≥ 4f+3 (El Mhamdi et al. 2018)
    geomedian       argmin_z Σ w_i ‖x_i − z‖ by smoothed Weiszfeld iterations (Pillutla et al.
                    2022): z ← Σ c_i x_i / Σ c_i with c_i = w_i / max(ν, ‖x_i − z‖)
    centered_clip   v ← v + Σ w_i clip_τ(x_i − v) / Σ w_i, clip_τ(u) = u·min(1, τ/‖u‖), from the
                    coordinate median v_0, τ = median ‖x_i − v_0‖ by default (Karimireddy et al.
                    2021)

Quorum guard: fewer than 2f+1 updates raise `QuorumNotMet` and produce no new version, so a
median of one honest and one attacking node is never taken. Unlike Flower's
FedTrimmedAvg(β), which trims ⌊βn⌋ (nothing for n=3, β=0.2), trimmed_mean trims ≥ f per side.

`max_f(rule, n)` is the largest f a rule tolerates among n updates (DAF's automatic f).
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from federation.errors import QuorumNotMet

Rule = Callable[..., np.ndarray]


def _needs(n: int, minimum: int, rule: str, condition: str) -> None:
    if n < minimum:
        raise ValueError(
            f"{rule} needs {condition} (n={n}, so n >= {minimum}); lower f or add nodes"
        )


def _no_weights(w: np.ndarray | None, rule: str) -> None:
    if w is not None:
        raise ValueError(f"rule {rule!r} does not take weights")


def _mean(x: np.ndarray, f: int, w: np.ndarray | None) -> np.ndarray:
    return np.average(x, axis=0, weights=w)


def _trimmed_mean(x: np.ndarray, f: int, w: np.ndarray | None, beta: float = 0.1) -> np.ndarray:
    n = len(x)
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean beta must be in [0, 0.5), got {beta}")
    t = max(f, int(beta * n))
    _needs(n, 2 * t + 1, "trimmed_mean", f"n > 2·max(f, ⌊βn⌋) = {2 * t}")
    order = np.argsort(x, axis=0, kind="stable")[t : n - t]
    kept = np.take_along_axis(x, order, axis=0)
    weights = np.ones(n) if w is None else w
    kept_w = weights[order]
    return np.sum(kept * kept_w, axis=0) / np.sum(kept_w, axis=0)


def _median(x: np.ndarray, f: int, w: np.ndarray | None) -> np.ndarray:
    _no_weights(w, "median")
    return np.median(x, axis=0)


def pairwise_sq_distances(x: np.ndarray) -> np.ndarray:
    """‖x_i − x_j‖² for the rows of x (n, d), from one Gram matrix: (n, n)."""
    sq = np.sum(x * x, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)


def _krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    dist = pairwise_sq_distances(x)
    np.fill_diagonal(dist, np.inf)
    neighbours = max(1, len(x) - f - 2)
    return np.sum(np.sort(dist, axis=1)[:, :neighbours], axis=1)


def _krum(x: np.ndarray, f: int, w: np.ndarray | None) -> np.ndarray:
    _no_weights(w, "krum")
    _needs(len(x), 2 * f + 3, "krum", "n >= 2f+3")
    return x[np.argmin(_krum_scores(x, f))].copy()


def _multikrum(x: np.ndarray, f: int, w: np.ndarray | None, m: int | None = None) -> np.ndarray:
    n = len(x)
    _needs(n, 2 * f + 3, "multikrum", "n >= 2f+3")
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multikrum m must be in [1, {n}], got {m}")
    chosen = np.argsort(_krum_scores(x, f), kind="stable")[:m]
    return np.average(x[chosen], axis=0, weights=None if w is None else w[chosen])


def _bulyan(x: np.ndarray, f: int, w: np.ndarray | None) -> np.ndarray:
    _no_weights(w, "bulyan")
    n = len(x)
    _needs(n, 4 * f + 3, "bulyan", "n >= 4f+3")
    remaining = list(range(n))
    selected = []
    for _ in range(n - 2 * f):
        best = remaining[int(np.argmin(_krum_scores(x[remaining], f)))]
        selected.append(best)
        remaining.remove(best)
    s = x[selected]
    beta = len(selected) - 2 * f
    closest = np.argsort(np.abs(s - np.median(s, axis=0)), axis=0, kind="stable")[:beta]
    return np.mean(np.take_along_axis(s, closest, axis=0), axis=0)


def _geomedian(
    x: np.ndarray,
    f: int,
    w: np.ndarray | None,
    iters: int = 200,
    nu: float = 1e-8,
    tol: float = 1e-9,
) -> np.ndarray:
    weights = np.ones(len(x)) if w is None else w
    z = np.median(x, axis=0)
    for _ in range(iters):
        coef = weights / np.maximum(nu, np.linalg.norm(x - z, axis=1))
        new = coef @ x / np.sum(coef)
        done = np.linalg.norm(new - z) <= tol * (1.0 + np.linalg.norm(z))
        z = new
        if done:
            break
    return z


def _centered_clip(
    x: np.ndarray, f: int, w: np.ndarray | None, tau: float | None = None, iters: int = 3
) -> np.ndarray:
    weights = np.ones(len(x)) if w is None else w
    v = np.median(x, axis=0)
    if tau is None:
        tau = float(np.median(np.linalg.norm(x - v, axis=1)))
    if tau < 0 or iters < 1:
        raise ValueError(f"centered_clip needs tau >= 0 and iters >= 1, got {tau}, {iters}")
    for _ in range(iters):
        u = x - v
        norms = np.linalg.norm(u, axis=1)
        factor = np.minimum(1.0, tau / np.maximum(norms, np.finfo(float).tiny))
        v = v + (weights * factor) @ u / np.sum(weights)
    return v


WEIGHTED_RULES = frozenset({"mean", "trimmed_mean", "multikrum", "geomedian", "centered_clip"})
RULES: dict[str, Rule] = {
    "mean": _mean,
    "trimmed_mean": _trimmed_mean,
    "median": _median,
    "krum": _krum,
    "multikrum": _multikrum,
    "bulyan": _bulyan,
    "geomedian": _geomedian,
    "centered_clip": _centered_clip,
}


# The rules' own conditions, checked by `_needs` above: a rule accepts f among n updates when
# n >= a·f + b. Rules not listed need only the quorum, n >= 2f + 1.
_MIN_N_COEFFICIENTS: dict[str, tuple[int, int]] = {
    "krum": (2, 3),
    "multikrum": (2, 3),
    "bulyan": (4, 3),
}


def max_f(rule: str, n: int) -> int:
    """Largest f that `rule` tolerates among n updates: the automatic f of DAF.

    f is capped twice. First by the classic Byzantine bound n >= 3f + 1, f = ⌊(n−1)/3⌋
    (Lamport, Shostak & Pease 1982: no agreement is possible with a third or more of the
    parties faulty). Then by the rule's own condition: Krum and Multi-Krum need n >= 2f + 3
    (n > 2f + 2, Blanchard et al. 2017), Bulyan n >= 4f + 3 (El Mhamdi et al. 2018), every
    other rule the quorum n >= 2f + 1 (the trimmed mean keeps one value after trimming f per
    side). For 10 updates: 3 for every rule but Bulyan, which gets 1.

    Returns 0 when no f fits (Krum with n < 3, or n = 0): `aggregate` then raises the rule's
    own error or `QuorumNotMet`.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {sorted(RULES)}")
    a, b = _MIN_N_COEFFICIENTS.get(rule, (2, 1))
    return max(0, min((n - 1) // 3, (n - b) // a))


def aggregate(
    updates: np.ndarray, rule: str, *, f: int = 0, weights: np.ndarray | None = None, **options: Any
) -> np.ndarray:
    """Aggregate an (n, d) array of updates with `rule`, tolerating `f` Byzantine rows.

    `weights` (positive, length n) are taken by mean, trimmed_mean, multikrum, geomedian and
    centered_clip; `options` are the rule's parameters (beta, m, iters, nu, tol, tau).
    Raises ValueError for bad input or an unmet n/f condition, QuorumNotMet when n < 2f+1.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {sorted(RULES)}")
    x = np.asarray(updates, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"updates must be an (n, d) array with d >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("updates hold NaN or infinity; validate them first")
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")
    if len(x) < 2 * f + 1:
        raise QuorumNotMet(len(x), 2 * f + 1)
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(x),) or not np.isfinite(w).all() or (w <= 0).any():
            raise ValueError(f"weights must be {len(x)} positive finite numbers")
    return RULES[rule](x, f, w, **options)
