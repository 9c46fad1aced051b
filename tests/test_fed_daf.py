import numpy as np
import pytest

from federation import (
    BANKS,
    DAF,
    RULES,
    BankRule,
    DAFConfig,
    QuorumNotMet,
    aggregate,
    default_rules,
)
from federation.aggregators import max_f, pairwise_sq_distances
from federation.attacks import honest_updates


def round_updates(rng, attacker_scale=None, n=10, d=30):
    updates = {}
    for bank in BANKS:
        x = honest_updates(n, d, rng)
        if attacker_scale is not None:
            x[-1] *= attacker_scale
        updates[bank] = {f"node{i}": x[i] for i in range(n)}
    return updates


def test_default_rules_per_bank():
    rules = DAFConfig().rules
    assert (rules["coarse"].rule, rules["domain"].rule, rules["fine"].rule) == (
        "multikrum",
        "trimmed_mean",
        "median",
    )
    assert rules["domain"].weight_by_gain


def test_merged_banks_match_their_rules_for_a_clean_round():
    rng = np.random.default_rng(0)
    updates = round_updates(rng)
    gains = {node: 1.0 for node in updates["fine"]}
    result = DAF(DAFConfig(f=2)).aggregate(updates, gains)
    assert result.f == {bank: 2 for bank in BANKS}
    for bank, rule in DAFConfig().rules.items():
        x = np.stack([updates[bank][node] for node in sorted(updates[bank])])
        options = dict(rule.options)
        expected = aggregate(
            x, rule.rule, f=2, weights=np.ones(10) if rule.rule != "median" else None, **options
        )
        np.testing.assert_allclose(result.merged[bank], expected)
    assert not any(score.flagged for score in result.scores.values()) and not result.excluded


def test_repeat_offender_is_flagged_down_weighted_then_excluded():
    rng = np.random.default_rng(1)
    daf = DAF(DAFConfig(f=2))
    gains = {f"node{i}": 1.0 for i in range(10)}
    reputations = []
    for _ in range(3):
        result = daf.aggregate(round_updates(rng, attacker_scale=50.0), gains)
        assert result.scores["node9"].flagged and result.scores["node9"].norm_z["coarse"] > 3.5
        reputations.append(result.reputations["node9"])
    assert reputations[0] < 1.0 and reputations == sorted(reputations, reverse=True)
    assert result.excluded == ["node9"]
    assert all(result.reputations[f"node{i}"] == 1.0 for i in range(9))


def test_gain_weighting_favours_nodes_that_report_a_gain():
    # two groups of distinct updates (identical ones would count once: redundant)
    updates = {"domain": {f"n{i}": np.array([float(i >= 3) + 0.01 * (i + 1)]) for i in range(6)}}
    config = DAFConfig(rules={"domain": BankRule("mean", weight_by_gain=True)})
    low = (
        DAF(config)
        .aggregate(updates, {f"n{i}": 1.0 if i < 3 else 0.1 for i in range(6)})
        .merged["domain"]
    )
    high = (
        DAF(config)
        .aggregate(updates, {f"n{i}": 0.1 if i < 3 else 1.0 for i in range(6)})
        .merged["domain"]
    )
    assert low[0] < 0.5 < high[0]
    with pytest.raises(ValueError, match="gain"):
        DAF(config).aggregate(updates)


def test_configuration_errors_and_quorum():
    with pytest.raises(ValueError, match="unknown rule"):
        BankRule("average")
    with pytest.raises(ValueError, match="does not take weights"):
        BankRule("median", weight_by_gain=True)
    daf = DAF(DAFConfig(f=2))
    with pytest.raises(ValueError, match="no aggregation rule"):
        daf.aggregate({"other": {"a": np.zeros(2)}})
    with pytest.raises(ValueError, match="same nodes"):
        daf.aggregate({"fine": {"a": np.zeros(2)}, "coarse": {"b": np.zeros(2)}})
    distinct = {n: np.array([1.0, float(k)]) for k, n in enumerate("abcd")}
    with pytest.raises(QuorumNotMet):  # f = 2 needs 5 updates
        daf.aggregate({"fine": distinct})
    with pytest.raises(QuorumNotMet):  # four empty updates: none left to aggregate
        DAF().aggregate({"fine": {n: np.zeros(2) for n in "abcd"}})


def test_max_f_is_the_largest_f_each_rule_accepts_under_n_at_least_3f_plus_1():
    rng = np.random.default_rng(2)
    for rule in RULES:
        for n in range(1, 16):
            x = rng.normal(size=(n, 4))
            f = max_f(rule, n)
            assert 0 <= f <= (n - 1) // 3, (rule, n)
            if n >= 3 or rule not in ("krum", "multikrum", "bulyan"):
                aggregate(x, rule, f=f)
            if f + 1 <= (n - 1) // 3:  # below the classic bound: the rule itself refuses f + 1
                with pytest.raises((ValueError, QuorumNotMet)):
                    aggregate(x, rule, f=f + 1)
    assert {rule: max_f(rule, 10) for rule in RULES} == {
        rule: 1 if rule == "bulyan" else 3 for rule in RULES
    }
    assert (max_f("multikrum", 4), max_f("multikrum", 5), max_f("bulyan", 7)) == (0, 1, 1)
    assert max_f("krum", 2) == max_f("median", 0) == 0
    with pytest.raises(ValueError, match="unknown rule"):
        max_f("average", 10)


def test_automatic_f_is_the_default_and_is_3_for_10_nodes_with_the_default_rules():
    # docs/robustness.md: the attack matrix measured DAF at f = 3 with 10 nodes, the default.
    assert DAFConfig().f is None
    assert {bank: max_f(rule.rule, 10) for bank, rule in default_rules().items()} == {
        bank: 3 for bank in BANKS
    }
    rng = np.random.default_rng(3)
    result = DAF().aggregate(round_updates(rng), {f"node{i}": 1.0 for i in range(10)})
    assert result.f == {bank: 3 for bank in BANKS}
    with pytest.raises(ValueError, match="f must be >= 0"):
        DAFConfig(f=-1)


def test_automatic_f_follows_the_kept_nodes():
    rng = np.random.default_rng(4)
    daf = DAF(reputations={"node9": 0.3})  # flagged once more: 0.15, excluded, 9 nodes remain
    gains = {f"node{i}": 1.0 for i in range(10)}
    result = daf.aggregate(round_updates(rng, attacker_scale=50.0), gains)
    assert result.excluded == ["node9"] and result.f == {bank: 2 for bank in BANKS}


def test_automatic_f_keeps_three_scaled_updates_out_of_the_coarse_bank_where_f_0_does_not():
    rng = np.random.default_rng(5)
    x = honest_updates(10, 30, rng)
    x[7:] *= 100.0
    updates = {"coarse": {f"node{i}": x[i] for i in range(10)}}
    honest_mean = x[:7].mean(axis=0)
    auto = DAF().aggregate(updates).merged["coarse"]
    np.testing.assert_allclose(auto, honest_mean)  # Multi-Krum keeps the 7 honest updates
    fixed = DAF(DAFConfig(f=0)).aggregate(updates).merged["coarse"]
    assert np.linalg.norm(fixed - honest_mean) > 10 * np.linalg.norm(honest_mean)


def test_redundant_updates_count_once_and_are_not_scored():
    """Copies (Sybils, or the one vector ALIE/IPM attackers share) and empty updates are set
    aside before scoring: the merge is that of the distinct updates alone."""
    rng = np.random.default_rng(5)
    honest = {f"h{i}": rng.normal(1.0, 0.1, size=8) for i in range(6)}
    crafted = -5.0 * np.mean(list(honest.values()), axis=0)
    sybils = {f"s{i}": crafted * (1 + 1e-4 * i) for i in range(3)}  # within duplicate_tol
    updates = {"coarse": {**honest, **sybils, "free": np.zeros(8)}}
    # the opposed-update screen is off here: the crafted vector also points against the rest
    result = DAF(DAFConfig(rules={"coarse": BankRule("mean")}, opposed_z=None)).aggregate(
        updates)
    assert result.redundant == {"s1": "repeats s0's update", "s2": "repeats s0's update",
                                "free": "empty update"}
    assert set(result.scores) == {*honest, "s0"}
    kept = {**honest, "s0": sybils["s0"]}  # weighted by reputation: s0's norm flags it
    expected = np.average(list(kept.values()), axis=0,
                          weights=[result.reputations[n] for n in kept])
    np.testing.assert_allclose(result.merged["coarse"], expected)
    # honest nodes on different data are never near-identical: nothing set aside
    assert DAF(DAFConfig(rules={"coarse": BankRule("mean")})).aggregate(
        {"coarse": honest}).redundant == {}
    with pytest.raises(ValueError, match="duplicate_tol"):
        DAFConfig(duplicate_tol=1.0)


def _sparse_honest(rng: np.random.Generator, n: int, d: int = 4000, keep: float = 0.05
                   ) -> list[np.ndarray]:
    """Top-k honest updates: a shared direction under 3x node noise, each keeping its
    largest 5 % of coordinates, so each keeps different ones and they are nearly orthogonal
    (as after the delta codec)."""
    shared = rng.normal(size=d)
    out = []
    for _ in range(n):
        x = shared + 3.0 * rng.normal(size=d)
        x[np.argsort(np.abs(x))[: int(d * (1 - keep))]] = 0.0
        out.append(x)
    return out


def test_sign_flipped_sparse_updates_are_set_aside_as_opposed():
    """Three of ten nodes reverse their own sparse update: as far from the rest as honest
    updates are, so Multi-Krum keeps them, but they point against the others' sum."""
    rng = np.random.default_rng(8)
    x = _sparse_honest(rng, 10)
    dist = np.sqrt(pairwise_sq_distances(np.stack(x)))
    honest_gap, flipped_gap = dist[0, 1:7].mean(), np.linalg.norm(-x[7] - x[0])
    assert abs(flipped_gap / honest_gap - 1) < 0.1  # indistinguishable by distance
    flipped = {f"h{i}": x[i] for i in range(7)} | {f"a{i}": -x[i] for i in range(7, 10)}
    rules = {"coarse": BankRule("multikrum")}
    result = DAF(DAFConfig(rules=rules)).aggregate({"coarse": flipped})
    assert set(result.opposed) == {"a7", "a8", "a9"}
    assert all(c < 0 for c in result.opposed.values())
    assert set(result.scores) == {f"h{i}" for i in range(7)}
    clean = DAF(DAFConfig(rules=rules)).aggregate(
        {"coarse": {f"h{i}": x[i] for i in range(7)}})
    np.testing.assert_allclose(result.merged["coarse"], clean.merged["coarse"])
    kept_in = DAF(DAFConfig(rules=rules, opposed_z=None)).aggregate({"coarse": flipped})
    assert kept_in.opposed == {}
    honest_mean = np.mean(x[:7], axis=0)
    cos = float(kept_in.merged["coarse"] @ honest_mean / np.linalg.norm(
        kept_in.merged["coarse"]) / np.linalg.norm(honest_mean))
    assert cos < 0.9  # without the screen the flipped updates pull the merge away


def test_opposed_screen_keeps_honest_updates_and_respects_f():
    rng = np.random.default_rng(9)
    aligned = {f"h{i}": v for i, v in enumerate(_sparse_honest(rng, 10))}
    assert DAF().aggregate({"coarse": aligned, "domain": aligned, "fine": aligned},
                           {n: 1.0 for n in aligned}).opposed == {}
    noise = {f"r{i}": rng.normal(size=4000) for i in range(10)}  # no shared direction at all
    assert DAF(DAFConfig(rules={"coarse": BankRule("mean")})).aggregate(
        {"coarse": noise}).opposed == {}
    x = _sparse_honest(np.random.default_rng(8), 10)
    flipped = {f"h{i}": x[i] for i in range(7)} | {f"a{i}": -x[i] for i in range(7, 10)}
    capped = DAF(DAFConfig(rules={"coarse": BankRule("mean")}, f=1)).aggregate(
        {"coarse": flipped})
    assert len(capped.opposed) == 1 and set(capped.opposed) < {"a7", "a8", "a9"}  # at most f
    with pytest.raises(ValueError, match="opposed_z"):
        DAFConfig(opposed_z=0.0)
