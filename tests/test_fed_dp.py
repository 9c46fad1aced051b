import math
from statistics import NormalDist

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import brentq

from federation import RDPAccountant, clip_update, noisy_mean, subsampled_gaussian_rdp


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of a Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018, Thm 8)."""
    phi = NormalDist().cdf

    def excess(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2) - delta

    return brentq(excess, 0.0, 500.0)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 10), (4.0, 100), (10.0, 1000)])
def test_full_batch_rdp_closed_form_and_bounds(sigma, rounds):
    accountant = RDPAccountant(sigma)
    accountant.step(rounds)
    np.testing.assert_allclose(accountant.rdp(), rounds * accountant.orders / (2 * sigma**2))
    delta = 1e-5
    eps = accountant.epsilon(delta)
    # T Gaussian rounds compose to one Gaussian with noise σ/√T: its exact ε is a lower bound,
    exact = exact_gaussian_epsilon(math.sqrt(rounds) / sigma, delta)
    # and Mironov's conversion at the continuous optimum α* is an upper bound up to the order grid.
    rho = rounds / (2 * sigma**2)
    mironov = rho + 2 * math.sqrt(rho * math.log(1 / delta))
    assert exact <= eps <= 1.02 * mironov
    assert eps <= 1.3 * exact


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"), [(0.01, 4.0, 8), (0.1, 1.1, 4), (0.3, 2.0, 12), (0.05, 0.8, 3)]
)
def test_subsampled_rdp_matches_numerical_integral(q, sigma, alpha):
    """Binomial sum = E_{z~N(0,σ²)}[((1−q) + q·exp((2z−1)/(2σ²)))^α] (Mironov et al. 2019)."""

    def integrand(z: float) -> float:
        density = math.exp(-(z**2) / (2 * sigma**2)) / math.sqrt(2 * math.pi * sigma**2)
        return density * ((1 - q) + q * math.exp((2 * z - 1) / (2 * sigma**2))) ** alpha

    integral, _ = quad(integrand, -50 * sigma, 50 * sigma, limit=500)
    assert subsampled_gaussian_rdp(sigma, q, alpha) == pytest.approx(
        math.log(integral) / (alpha - 1), rel=1e-6
    )


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    def eps(sigma, q, rounds):
        a = RDPAccountant(sigma, q)
        a.step(rounds)
        return a.epsilon(1e-5)

    assert eps(1.0, 0.1, 10) < eps(1.0, 0.1, 100)
    assert eps(2.0, 0.1, 100) < eps(1.0, 0.1, 100)
    assert eps(1.0, 0.01, 100) < eps(1.0, 0.1, 100) < eps(1.0, 1.0, 100)
    assert RDPAccountant(1.0).epsilon(1e-5) == 0.0


def test_clipping_and_noise_scale():
    rng = np.random.default_rng(0)
    assert np.linalg.norm(clip_update(np.full(4, 10.0), 1.0)) == pytest.approx(1.0)
    np.testing.assert_array_equal(clip_update(np.array([0.1, 0.2]), 1.0), [0.1, 0.2])
    updates = np.zeros((10, 20000))
    noise = noisy_mean(updates, clip_norm=2.0, noise_multiplier=1.5, rng=rng)
    assert np.std(noise) == pytest.approx(1.5 * 2.0 / 10, rel=0.03)
    big = np.vstack([np.full((1, 3), 100.0), np.zeros((3, 3))])
    assert np.linalg.norm(
        noisy_mean(big, clip_norm=1.0, noise_multiplier=0.0, rng=rng)
    ) == pytest.approx(0.25)


def test_refuses_bad_parameters():
    with pytest.raises(ValueError):
        RDPAccountant(0.0)
    with pytest.raises(ValueError):
        RDPAccountant(1.0, sampling_rate=1.5)
    with pytest.raises(ValueError):
        RDPAccountant(1.0, orders=[1.5])
    with pytest.raises(ValueError):
        RDPAccountant(1.0).epsilon(0.0)
    with pytest.raises(ValueError):
        clip_update(np.ones(2), 0.0)
