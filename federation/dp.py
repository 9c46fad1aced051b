"""Client-level differential privacy: clipping, Gaussian noise, and an RDP accountant.

DP-FedAvg (McMahan et al. 2018): each node's update is clipped to L2 norm C, the coordinator
averages the n clipped updates and adds N(0, (σC/n)² I). Adding or removing one node moves
the clipped sum by at most C, so each round is the Gaussian mechanism with noise multiplier
σ, subsampled when each node takes part with probability q. The guarantee holds for the
`mean` rule (any rule whose per-node sensitivity is at most C/n); robust rules are not
covered by it.

Accounting in Rényi DP (Mironov 2017). For an integer order α ≥ 2, the Poisson-subsampled
Gaussian has (Mironov, Talwar & Zhang 2019, §3.3)

    RDP(α) = 1/(α−1) · log Σ_{k=0}^{α} C(α,k) (1−q)^{α−k} q^k exp((k² − k) / (2σ²)),

which for q = 1 is α/(2σ²). T rounds compose additively, T · RDP(α), and are converted to
(ε, δ) with Canonne, Kamath & Steinke 2020 (Prop. 12), tighter than Mironov's
ε = RDP + log(1/δ)/(α−1):

    ε = min_α  T·RDP(α) + log(1 − 1/α) − (log δ + log α)/(α − 1).
"""

from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 160, 192, 256, 384, 512, 1024)


def clip_update(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale `update` down to L2 norm at most `clip_norm` (unchanged if already within)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = float(np.linalg.norm(update))
    return update * min(1.0, clip_norm / norm) if norm > 0 else update.copy()


def noisy_mean(
    updates: np.ndarray, *, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """Mean of the clipped (n, d) updates plus N(0, (σ·C/n)²) per coordinate (DP-FedAvg)."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    x = np.asarray(updates, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"updates must be a non-empty (n, d) array, got shape {x.shape}")
    clipped = np.stack([clip_update(row, clip_norm) for row in x])
    std = noise_multiplier * clip_norm / len(x)
    return clipped.mean(axis=0) + rng.normal(0.0, std, size=x.shape[1])


def subsampled_gaussian_rdp(noise_multiplier: float, sampling_rate: float, order: int) -> float:
    """RDP at integer `order` of one Poisson-subsampled Gaussian round (formula above)."""
    sigma, q = noise_multiplier, sampling_rate
    if q == 1.0:
        return order / (2 * sigma**2)
    k = np.arange(order + 1)
    log_binom = gammaln(order + 1) - gammaln(k + 1) - gammaln(order - k + 1)
    terms = log_binom + (order - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * sigma**2)
    return float(logsumexp(terms)) / (order - 1)


class RDPAccountant:
    """Tracks the rounds of a DP-FedAvg run and reports ε for a given δ."""

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float = 1.0,
        orders: Sequence[int] = DEFAULT_ORDERS,
    ) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier}")
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
        if not orders or any(int(a) != a or a < 2 for a in orders):
            raise ValueError("orders must be integers >= 2")
        self.orders = np.array(orders, dtype=np.float64)
        self._per_round = np.array(
            [subsampled_gaussian_rdp(noise_multiplier, sampling_rate, int(a)) for a in orders]
        )
        self.rounds = 0

    def step(self, rounds: int = 1) -> None:
        """Account for `rounds` more rounds."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.rounds += rounds

    def rdp(self) -> np.ndarray:
        """Total RDP at each order after the rounds so far."""
        return self.rounds * self._per_round

    def epsilon(self, delta: float) -> float:
        """Smallest ε over the orders such that the run so far is (ε, δ)-DP."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if self.rounds == 0:
            return 0.0
        a = self.orders
        eps = self.rdp() + np.log1p(-1 / a) - (np.log(delta) + np.log(a)) / (a - 1)
        return float(max(0.0, np.min(eps)))
