"""Byzantine attacks on federated updates, to measure the aggregators against.

An update is a node's delta as the codec takes it, ``{bank: {tensor name: array}}``. The
attacks are pure functions of the attackers' own benign updates (``own``: what their honest
training produced) and of the n − f honest nodes' updates (``honest``: the omniscient
attacker, the standard worst case of the papers below). Per coordinate, μ̂ and σ̂ are the
mean and standard deviation of the honest updates.

    sign_flip     −own_i                                    (each attacker reverses its update)
    gaussian      N(0, (10·σ_t)²) per coordinate, σ_t the spread of the honest values of
                  tensor t (Blanchard et al. 2017, "Machine learning with adversaries", §5)
    scaling       100·own_i: a boosted update (Bhagoji et al. 2019, "Analyzing federated
                  learning through an adversarial lens"; Bagdasaryan et al. 2020)
    alie          μ̂ − z·σ̂, z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f: the largest per-coordinate
                  shift that still leaves the attackers inside the honest spread ("A little is
                  enough", Baruch, Baruch & Goldberg, NeurIPS 2019)
    ipm           −ε·μ̂, ε = 0.5: negative inner product with the honest mean, so the aggregate
                  no longer descends (inner-product manipulation, "Fall of empires", Xie,
                  Koyejo & Gupta, UAI 2019 / PMLR 115, 2020)
    free_rider    0: the node claims its share without training (Lin et al. 2019, "Free-riders
                  in federated learning: attacks and defenses")
    sybil         f identical copies of one malicious update, the sign flip of the first
                  attacker's: colluding clones look like a tight cluster to distance-based rules
                  (Fung, Yoon & Beschastnikh 2020, "The limitations of federated learning in
                  sybil settings", FoolsGold)

Data poisoning (training on shuffled text) changes the training, not the update, so it is
done by the attack-matrix runner (`bench/robustness.py`), not here.

`DELTA_ATTACKS` holds these as ``(own, honest, rng) -> f malicious updates`` (ALIE and IPM
attackers all send the same crafted update, as in the papers); `ATTACKS` is
the same attacks on flat vectors, ``(honest (h, d), f, rng) -> (f, d)``, where the attackers'
own updates are honest rows (``python -m federation.report`` and the aggregator tests).
"""

from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import numpy as np

Delta = Mapping[str, Mapping[str, np.ndarray]]
Update = dict[str, dict[str, np.ndarray]]
DeltaAttack = Callable[[Sequence[Delta], Sequence[Delta], np.random.Generator], list[Update]]
Attack = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

GAUSSIAN_MULTIPLIER = 10.0
SCALE_FACTOR = 100.0
IPM_EPSILON = 0.5


def _map(fn: Callable[[np.ndarray], np.ndarray], delta: Delta) -> Update:
    """Apply ``fn`` to every tensor of ``delta`` (computed in float64)."""
    return {
        bank: {name: fn(np.asarray(t, np.float64)) for name, t in tensors.items()}
        for bank, tensors in delta.items()
    }


def _stack(deltas: Sequence[Delta], bank: str, name: str) -> np.ndarray:
    """The tensor ``bank/name`` of every delta, stacked on a new first axis (float64)."""
    return np.stack([np.asarray(d[bank][name], np.float64) for d in deltas])


def _per_tensor(fn: Callable[[np.ndarray], np.ndarray], honest: Sequence[Delta]) -> Update:
    """One update built tensor by tensor from the honest stack of that tensor."""
    if not honest:
        raise ValueError("this attack needs at least one honest update")
    return {
        bank: {name: fn(_stack(honest, bank, name)) for name in tensors}
        for bank, tensors in honest[0].items()
    }


def sign_flip(own: Delta) -> Update:
    """The attacker's own update reversed."""
    return _map(np.negative, own)


def scaling(own: Delta, factor: float = SCALE_FACTOR) -> Update:
    """The attacker's own update multiplied by ``factor`` (boosting, Bhagoji et al. 2019)."""
    return _map(lambda t: factor * t, own)


def free_rider(own: Delta) -> Update:
    """A zero update of the right shapes: contributes nothing, claims a share."""
    return _map(np.zeros_like, own)


def gaussian(
    honest: Sequence[Delta], rng: np.random.Generator, multiplier: float = GAUSSIAN_MULTIPLIER
) -> Update:
    """Pure noise, N(0, (multiplier·σ_t)²) per coordinate of tensor t, σ_t = std(honest t)."""
    return _per_tensor(
        lambda x: rng.normal(0.0, multiplier * float(np.std(x)), size=x.shape[1:]), honest
    )


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: s = ⌊n/2 + 1⌋ − f honest nodes must be "behind" the attackers."""
    if not 0 < f < n:
        raise ValueError(f"ALIE needs 0 < f < n, got f={f}, n={n}")
    s = n // 2 + 1 - f
    return max(0.0, NormalDist().inv_cdf((n - s) / n))


def alie(honest: Sequence[Delta], n: int, f: int) -> Update:
    """μ̂ − z_max·σ̂ per coordinate ("A little is enough", Baruch et al. 2019)."""
    z = alie_z(n, f)
    return _per_tensor(lambda x: x.mean(axis=0) - z * x.std(axis=0), honest)


def ipm(honest: Sequence[Delta], epsilon: float = IPM_EPSILON) -> Update:
    """−ε times the honest mean (inner-product manipulation, Xie et al. 2020)."""
    if not epsilon > 0:
        raise ValueError(f"IPM epsilon must be positive, got {epsilon}")
    return _per_tensor(lambda x: -epsilon * x.mean(axis=0), honest)


def sybil(malicious: Delta, f: int) -> list[Update]:
    """``f`` identical copies of one malicious update (colluding Sybil nodes)."""
    if f < 1:
        raise ValueError(f"need at least one Sybil, got {f}")
    return [_map(np.copy, malicious) for _ in range(f)]


DELTA_ATTACKS: dict[str, DeltaAttack] = {
    "sign_flip": lambda own, honest, rng: [sign_flip(u) for u in own],
    "gaussian": lambda own, honest, rng: [gaussian(honest, rng) for _ in own],
    "scaling_x100": lambda own, honest, rng: [scaling(u) for u in own],
    "alie": lambda own, honest, rng: sybil(alie(honest, len(own) + len(honest), len(own)),
                                           len(own)),
    "ipm": lambda own, honest, rng: sybil(ipm(honest), len(own)),
    "free_rider": lambda own, honest, rng: [free_rider(u) for u in own],
    "sybil": lambda own, honest, rng: sybil(sign_flip(own[0]), len(own)),
}


def _on_vectors(attack: DeltaAttack) -> Attack:
    """``attack`` on rows of an (h, d) array; attacker i's own update is honest row i mod h."""

    def run(honest: np.ndarray, f: int, rng: np.random.Generator) -> np.ndarray:
        rows = [{"x": {"v": row}} for row in np.asarray(honest, np.float64)]
        own = [rows[i % len(rows)] for i in range(f)]
        return np.stack([np.asarray(u["x"]["v"], np.float64) for u in attack(own, rows, rng)])

    return run


ATTACKS: dict[str, Attack] = {name: _on_vectors(a) for name, a in DELTA_ATTACKS.items()}


def honest_updates(h: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """h synthetic honest updates: a shared direction μ ~ N(0, I) plus per-node N(0, 0.5² I)."""
    return rng.normal(0.0, 1.0, size=d) + rng.normal(0.0, 0.5, size=(h, d))
