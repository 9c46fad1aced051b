"""DAF: per-bank aggregation rules for TALoRA's timestep banks, with node reputation.

The three banks see different noise: coarse (t ∈ (0.7, 1], mostly-masked steps) learns
generic structure, so Multi-Krum keeps the update vectors that agree; domain (t ∈ (0.3, 0.7])
carries each node's domain, so a trimmed mean weighted by the node's reported local quality
gain keeps useful specialisation; fine (t ∈ [0, 0.3]) edits few tokens and is the cheapest
place to poison, so it takes the coordinate median. Rules are configurable per bank.

Scoring, per bank b and node i, against the coordinate median c_b of all updates:

    dist_i  = ‖x_i − c_b‖ / median_j ‖x_j − c_b‖
    z_i     = (‖x_i‖ − m) / max(1.4826 · MAD_j ‖x_j‖, 0.1 · m),  m = median_j ‖x_j‖
    flagged = any bank with dist_i > distance_limit or z_i > z_limit
    rep_i  ← (1 − decay) · rep_i + decay · [not flagged]        (new nodes start at 1)

Only large norms are flagged (a small update cannot move the aggregate far), and the spread
has a floor of 10% of the median norm: in high dimension honest norms concentrate, so a bare
MAD z-score flags honest nodes (measured: |z| = 4.3 for an honest node among 10).
Nodes with rep_i < exclude_below are left out; the others are weighted by rep_i (× the capped
quality gain where the bank asks for it) in rules that take weights, so one bad round costs a
node little and repeat offenders fade out.

Before scoring, redundant updates are set aside for the round: an empty update (‖x‖ = 0, a
free rider) and any update within `duplicate_tol` of an earlier node's, over all banks,

    ‖x_i − x_j‖ ≤ duplicate_tol · max(‖x_i‖, ‖x_j‖),   j < i in node order,

keeping the first of each group. Colluding nodes that send one vector (Sybils, and the ALIE
and IPM attacks, whose attackers all send the same crafted update) then count once, so
Multi-Krum cannot be steered by copies that are each other's nearest neighbours and
coordinate-wise rules see at most one copy per group (the idea of FoolsGold, Fung et al.
2020: honest nodes on different data do not send near-identical updates). Two honest nodes
that trained on the same text with the same seed send the same update; keeping one of them
loses no information. Measured in docs/robustness.md.

Then opposed updates are set aside: updates that pull against the others. With top-k
sparsification each node keeps different coordinates, so honest updates are nearly
orthogonal and a node's update reversed (sign flip) is as far from the others as an honest
one, ‖−x_i − x_j‖ ≈ ‖x_i − x_j‖: distance-based rules (Multi-Krum) cannot tell it apart.
Its direction gives it away (the trust score of FLTrust, Cao et al. 2021, with the others'
sum in place of a server-side reference): with s_i = Σ_{j≠i} x_j / ‖x_j‖ over the other
remaining updates (unit vectors, so one large update cannot outvote the rest),

    c_i = cos(x_i, s_i),   set aside argmin_i c_i while  c_i < 0  and
    c_i < median_j c_j − opposed_z · max(1.4826 · MAD_j c_j, 1e-12),

recomputing s and the statistics after each, at most f updates (the automatic f below, over
the distinct updates). Both conditions: an update aligned with the rest is never set aside,
and among honest updates with no shared direction (cosines around 0) the outlier test
keeps the negative tail in. An opposed update counts as flagged in its node's reputation,
so a node that keeps pulling against the others fades out. Measured in docs/robustness.md.

The tolerated Byzantine count f is automatic by default: each round and bank takes
`aggregators.max_f(rule, n)` for the n kept updates, the largest f under n >= 3f + 1 that the
bank's rule accepts (3 of 10 for the default rules). A fixed f of 0 would make Multi-Krum keep
every update (the plain mean) and the trimmed mean trim only ⌊βn⌋, so the default would not be
Byzantine-robust; a fixed f larger than the round allows would make the rules refuse it.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from federation.aggregators import RULES, WEIGHTED_RULES, aggregate, max_f, pairwise_sq_distances

BANKS = ("coarse", "domain", "fine")


@dataclass(frozen=True)
class BankRule:
    """Aggregation rule of one bank: a name from `aggregators.RULES` and its options."""

    rule: str
    options: Mapping[str, Any] = field(default_factory=dict)
    weight_by_gain: bool = False

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {sorted(RULES)}")
        if self.weight_by_gain and self.rule not in WEIGHTED_RULES:
            raise ValueError(f"rule {self.rule!r} does not take weights, so cannot weight by gain")


def default_rules() -> dict[str, BankRule]:
    """coarse = Multi-Krum, domain = gain-weighted trimmed mean, fine = median."""
    return {
        "coarse": BankRule("multikrum"),
        "domain": BankRule("trimmed_mean", {"beta": 0.1}, weight_by_gain=True),
        "fine": BankRule("median"),
    }


@dataclass(frozen=True)
class DAFConfig:
    """Rules per bank, tolerated Byzantine count f, and the reputation parameters.

    `f = None` (the default) picks, per round and bank, the largest f the kept updates allow
    (`aggregators.max_f`); an int fixes f, and a round with fewer than 2f + 1 kept updates
    (or fewer than the rule needs) then makes no version.
    """

    rules: Mapping[str, BankRule] = field(default_factory=default_rules)
    f: int | None = None
    decay: float = 0.5
    distance_limit: float = 3.0
    z_limit: float = 3.5
    exclude_below: float = 0.2
    gain_cap: float = 3.0
    duplicate_tol: float = 0.01
    opposed_z: float | None = 3.0  # None: keep opposed updates

    def __post_init__(self) -> None:
        if self.f is not None and self.f < 0:
            raise ValueError(f"f must be >= 0 or None (automatic), got {self.f}")
        if not 0 < self.decay <= 1 or not 0 < self.exclude_below < 1 or self.gain_cap < 1:
            raise ValueError("need 0 < decay <= 1, 0 < exclude_below < 1 and gain_cap >= 1")
        if not 0 <= self.duplicate_tol < 1:
            raise ValueError(f"duplicate_tol must be in [0, 1), got {self.duplicate_tol}")
        if self.opposed_z is not None and not self.opposed_z > 0:
            raise ValueError(f"opposed_z must be > 0 or None (off), got {self.opposed_z}")


@dataclass(frozen=True)
class NodeScore:
    """Per-bank distance ratio and norm z-score of one node, and whether it was flagged."""

    distance: dict[str, float]
    norm_z: dict[str, float]
    flagged: bool


@dataclass(frozen=True)
class DAFResult:
    """Merged flat vector per bank, each node's scores, reputations after the round, exclusions
    by reputation, the f each bank's rule was run with, the redundant updates set aside
    (node → why: empty, or the node whose update it repeats) and the opposed ones (node → its
    cosine with the sum of the others' directions); neither of the last two is scored."""

    merged: dict[str, np.ndarray]
    scores: dict[str, NodeScore]
    reputations: dict[str, float]
    excluded: list[str]
    f: dict[str, int]
    redundant: dict[str, str] = field(default_factory=dict)
    opposed: dict[str, float] = field(default_factory=dict)


def redundant_updates(x: np.ndarray, tol: float) -> dict[int, int | None]:
    """Rows of x (n, d) that add nothing: row → the earlier row it repeats, or None if empty."""
    norms = np.linalg.norm(x, axis=1)
    dist = np.sqrt(pairwise_sq_distances(x))  # (n, n)
    out: dict[int, int | None] = {}
    for i in range(len(x)):
        if norms[i] == 0:
            out[i] = None
            continue
        for j in range(i):
            if j not in out and dist[i, j] <= tol * max(norms[i], norms[j]):
                out[i] = j
                break
    return out


def opposed_updates(x: np.ndarray, limit: int, z: float) -> dict[int, float]:
    """Rows of x (n, d), none zero, that pull against the others: row → its cosine with the
    sum of their directions."""
    out: dict[int, float] = {}
    rest = list(range(len(x)))
    while len(out) < limit and len(rest) > 2:
        unit = x[rest] / np.linalg.norm(x[rest], axis=1, keepdims=True)  # (m, d)
        others = unit.sum(axis=0) - unit  # (m, d): each row's others' sum of directions
        cos = np.einsum("md,md->m", unit, others) / np.maximum(
            np.linalg.norm(others, axis=1), 1e-300)
        centre = float(np.median(cos))
        spread = max(1.4826 * float(np.median(np.abs(cos - centre))), 1e-12)
        k = int(np.argmin(cos))
        if not (cos[k] < 0 and cos[k] < centre - z * spread):
            break
        out[rest.pop(k)] = float(cos[k])
    return out


def gain_weights(gains: np.ndarray, cap: float) -> np.ndarray:
    """Positive weights from quality gains: negatives count as 0, each capped at cap × median."""
    g = np.maximum(gains, 0.0)
    if not (g > 0).any():
        return np.ones_like(g)
    top = cap * float(np.median(g[g > 0]))
    return np.clip(g, 1e-3 * top, top)


class DAF:
    """Per-bank robust aggregation with reputation, kept across rounds by this object."""

    def __init__(
        self, config: DAFConfig | None = None, reputations: Mapping[str, float] | None = None
    ) -> None:
        self.config = config or DAFConfig()
        self.reputations: dict[str, float] = dict(reputations or {})

    def _update_reputation(self, node: str, flagged: bool) -> None:
        """rep ← (1 − decay) · rep + decay · [not flagged]; a new node starts at 1."""
        decay = self.config.decay
        previous = self.reputations.get(node, 1.0)
        self.reputations[node] = (1 - decay) * previous + decay * (0.0 if flagged else 1.0)

    def _score(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist = np.linalg.norm(x - np.median(x, axis=0), axis=1)
        norms = np.linalg.norm(x, axis=1)
        centre = float(np.median(norms))
        spread = max(1.4826 * float(np.median(np.abs(norms - centre))), 0.1 * centre, 1e-12)
        return dist / max(float(np.median(dist)), 1e-12), (norms - centre) / spread

    def aggregate(
        self,
        bank_updates: Mapping[str, Mapping[str, np.ndarray]],
        gains: Mapping[str, float] | None = None,
    ) -> DAFResult:
        """Score, update reputations, and aggregate each bank: {bank: {node_id: flat vector}}.

        Raises ValueError for banks without a rule or differing node sets (or too few nodes for
        a rule), and `QuorumNotMet` when fewer than 2f+1 nodes remain (keep the previous version
        then); with the automatic f that happens only when no node remains.
        """
        cfg = self.config
        if unknown := sorted(set(bank_updates) - set(cfg.rules)):
            raise ValueError(f"no aggregation rule for banks {unknown}")
        node_sets = {tuple(sorted(updates)) for updates in bank_updates.values()}
        if len(node_sets) != 1:
            raise ValueError("every bank must hold updates from the same nodes")
        nodes = list(node_sets.pop())
        stacked = {
            b: np.stack([np.asarray(u[i], np.float64) for i in nodes])
            for b, u in bank_updates.items()
        }
        whole = np.concatenate(list(stacked.values()), axis=1)  # (n, Σ bank sizes)
        repeats = redundant_updates(whole, cfg.duplicate_tol)
        redundant = {nodes[i]: "empty update" if j is None else f"repeats {nodes[j]}'s update"
                     for i, j in repeats.items()}
        unique = [k for k in range(len(nodes)) if k not in repeats]
        opposing = {} if cfg.opposed_z is None else opposed_updates(
            whole[unique], cfg.f if cfg.f is not None else (len(unique) - 1) // 3, cfg.opposed_z)
        opposed = {nodes[unique[k]]: c for k, c in opposing.items()}
        for node in opposed:
            self._update_reputation(node, flagged=True)
        unique = [u for k, u in enumerate(unique) if k not in opposing]
        nodes = [nodes[k] for k in unique]
        stacked = {b: x[unique] for b, x in stacked.items()}
        distance, norm_z = {}, {}
        for bank, x in stacked.items():
            distance[bank], norm_z[bank] = self._score(x)
        scores = {}
        for k, node in enumerate(nodes):
            d = {b: float(distance[b][k]) for b in stacked}
            z = {b: float(norm_z[b][k]) for b in stacked}
            flagged = any(d[b] > cfg.distance_limit or z[b] > cfg.z_limit for b in stacked)
            scores[node] = NodeScore(d, z, flagged)
            self._update_reputation(node, flagged)
        keep = np.array([self.reputations[node] >= cfg.exclude_below for node in nodes],
                        dtype=bool)
        kept_nodes = [node for node, k in zip(nodes, keep, strict=True) if k]
        rep = np.array([self.reputations[node] for node in kept_nodes])
        merged, used_f = {}, {}
        for bank, x in stacked.items():
            rule = cfg.rules[bank]
            used_f[bank] = max_f(rule.rule, len(kept_nodes)) if cfg.f is None else cfg.f
            weights = None
            if rule.rule in WEIGHTED_RULES:
                weights = rep
                if rule.weight_by_gain:
                    if gains is None or any(node not in gains for node in kept_nodes):
                        raise ValueError(
                            f"bank {bank!r} weights by gain: give a gain for every node"
                        )
                    weights = rep * gain_weights(
                        np.array([gains[node] for node in kept_nodes]), cfg.gain_cap
                    )
            merged[bank] = aggregate(
                x[keep], rule.rule, f=used_f[bank], weights=weights, **rule.options
            )
        excluded = [node for node, k in zip(nodes, keep, strict=True) if not k]
        return DAFResult(merged, scores, dict(self.reputations), excluded, used_f, redundant,
                         opposed)
