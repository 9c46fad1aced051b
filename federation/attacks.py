"""Byzantine attacks used to evaluate the aggregators (tests and `python -m federation.report`).

Each attack sees the h honest updates H ∈ R^{h×d} (omniscient attacker, the standard worst
case) and returns the f malicious rows; μ̂ and σ̂ are the per-coordinate mean and std of H.

    sign_flip   −H_i for the attackers' own honest updates
    gaussian    N(0, (10·std(H))²) noise
    scaling     100·H_i (a boosted honest update)
    alie        μ̂ − z·σ̂, z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f ("A little is enough",
                Baruch et al. 2019): small per-coordinate shifts that stay inside the spread
    ipm         −ε·μ̂ with ε = 0.5 (inner-product manipulation, Xie et al. 2020)
    sybil       f identical copies of μ̂ + 5·σ̂·s, s a random ±1 pattern (colluding clones)
"""

from collections.abc import Callable
from statistics import NormalDist

import numpy as np

Attack = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def sign_flip(honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
    return -honest[np.arange(f) % len(honest)]


def gaussian(honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, 10.0 * float(np.std(honest)), size=(f, honest.shape[1]))


def scaling(honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
    return 100.0 * honest[np.arange(f) % len(honest)]


def alie(honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
    n = len(honest) + f
    s = n // 2 + 1 - f
    z = NormalDist().inv_cdf((n - s) / n)
    row = honest.mean(axis=0) - z * honest.std(axis=0)
    return np.tile(row, (f, 1))


def ipm(honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
    return np.tile(-0.5 * honest.mean(axis=0), (f, 1))


def sybil(honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
    pattern = rng.choice([-1.0, 1.0], size=honest.shape[1])
    return np.tile(honest.mean(axis=0) + 5.0 * honest.std(axis=0) * pattern, (f, 1))


ATTACKS: dict[str, Attack] = {
    "sign_flip": sign_flip,
    "gaussian": gaussian,
    "scaling_x100": scaling,
    "alie": alie,
    "ipm": ipm,
    "sybil": sybil,
}


def honest_updates(h: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """h honest updates: a shared direction μ ~ N(0, I) plus per-node noise N(0, 0.5² I)."""
    return rng.normal(0.0, 1.0, size=d) + rng.normal(0.0, 0.5, size=(h, d))
