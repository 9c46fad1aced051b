import numpy as np
import pytest

from federation import BANKS, DAF, BankRule, DAFConfig, QuorumNotMet, aggregate
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
    updates = {"domain": {f"n{i}": np.array([float(i >= 3)]) for i in range(6)}}
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
    with pytest.raises(QuorumNotMet):
        daf.aggregate({"fine": {n: np.zeros(2) for n in "abcd"}})
