"""The attacks of federation.attacks do what their papers say; the attack-matrix runner runs."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from bench.common import BenchContext
from bench.report import parse_name
from federation import aggregate, decode_delta, encode_delta, generate_key
from federation.attacks import (
    ATTACKS,
    DELTA_ATTACKS,
    alie,
    alie_z,
    free_rider,
    gaussian,
    ipm,
    scaling,
    sign_flip,
    sybil,
)

BANKS = {"coarse": {"a": (6, 4), "b": (3,)}, "fine": {"a": (6, 4)}}


def delta(rng, shift=0.0):
    return {bank: {name: (shift + rng.normal(size=shape)).astype(np.float32)
                   for name, shape in tensors.items()} for bank, tensors in BANKS.items()}


def flat(d):
    return np.concatenate([np.ravel(d[b][n]) for b in sorted(d) for n in sorted(d[b])])


@pytest.fixture
def honest():
    rng = np.random.default_rng(0)
    return [delta(rng, shift=1.0) for _ in range(7)]


def test_sign_flip_scaling_free_rider_keep_the_layout(honest):
    own = honest[0]
    for attacked in (sign_flip(own), scaling(own), free_rider(own)):
        assert {b: {n: t.shape for n, t in ts.items()} for b, ts in attacked.items()} == BANKS
    np.testing.assert_allclose(flat(sign_flip(own)), -flat(own))
    np.testing.assert_allclose(flat(scaling(own)), 100 * flat(own), rtol=1e-6)
    assert not flat(free_rider(own)).any()


def test_alie_z_matches_baruch_et_al():
    # n = 10: s = 6 - f nodes must be "behind" the attackers, z = Φ⁻¹((n - s) / n)
    assert alie_z(10, 1) == pytest.approx(0.0)
    assert alie_z(10, 3) == pytest.approx(NormalDist().inv_cdf(0.7))
    assert alie_z(10, 4) == pytest.approx(NormalDist().inv_cdf(0.8))
    with pytest.raises(ValueError):
        alie_z(10, 0)


def test_alie_stays_inside_the_honest_std_band_and_moves_the_median(honest):
    x = np.stack([flat(h) for h in honest])
    mu, sigma = x.mean(axis=0), x.std(axis=0)
    attack = flat(alie(honest, n=10, f=3))
    assert np.all(np.abs(attack - mu) <= sigma + 1e-6)  # hides inside one std of the mean
    np.testing.assert_allclose(attack, mu - alie_z(10, 3) * sigma, rtol=1e-5)
    # three copies pull every coordinate's median below the honest one
    with_attack = np.median(np.vstack([x, np.tile(attack, (3, 1))]), axis=0)
    assert np.all(with_attack <= np.median(x, axis=0) + 1e-9)
    assert np.mean(with_attack < np.median(x, axis=0)) > 0.9


def test_ipm_has_negative_inner_product_with_the_honest_mean(honest):
    mu = np.mean([flat(h) for h in honest], axis=0)
    attack = flat(ipm(honest, epsilon=0.5))
    assert attack @ mu < 0
    np.testing.assert_allclose(attack, -0.5 * mu, rtol=1e-5)
    # the mean of 7 honest + 3 IPM updates keeps descending, but more slowly (ε = 0.5 < 7/3)
    merged = np.mean(np.vstack([[flat(h) for h in honest], np.tile(attack, (3, 1))]), axis=0)
    assert 0 < merged @ mu < 0.7 * mu @ mu
    with pytest.raises(ValueError):
        ipm(honest, epsilon=0.0)


def test_gaussian_noise_scale_and_seed(honest):
    spread = np.std(np.stack([h["coarse"]["a"] for h in honest]))
    noise = [gaussian(honest, np.random.default_rng(s))["coarse"]["a"] for s in range(200)]
    assert np.std(noise) == pytest.approx(10 * spread, rel=0.05)
    assert abs(np.mean(noise)) < 0.1 * spread * 10
    np.testing.assert_array_equal(gaussian(honest, np.random.default_rng(1))["fine"]["a"],
                                  gaussian(honest, np.random.default_rng(1))["fine"]["a"])


def test_sybil_copies_are_identical_but_independent(honest):
    clones = sybil(sign_flip(honest[0]), 3)
    assert len(clones) == 3
    for c in clones[1:]:
        np.testing.assert_array_equal(flat(c), flat(clones[0]))
    clones[1]["coarse"]["a"][0, 0] = 123.0
    assert clones[0]["coarse"]["a"][0, 0] != 123.0
    with pytest.raises(ValueError):
        sybil(honest[0], 0)


@pytest.mark.parametrize("name", sorted(DELTA_ATTACKS))
def test_every_attack_sends_f_valid_deltas_through_the_codec(name, honest):
    own, rest = honest[:3], honest[3:]
    bad = DELTA_ATTACKS[name](own, rest, np.random.default_rng(0))
    assert len(bad) == 3
    key = generate_key()
    for d in bad:
        decoded = decode_delta(encode_delta(d, round=1, node_id="x", base_version=0,
                                            example_count=1, key=key))
        assert set(decoded.tensors) == set(BANKS)
        assert np.isfinite(flat(decoded.tensors)).all()


def test_vector_form_matches_delta_form():
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 0.5, size=(7, 20))
    np.testing.assert_allclose(ATTACKS["ipm"](x, 3, rng), np.tile(-0.5 * x.mean(axis=0), (3, 1)))
    np.testing.assert_allclose(ATTACKS["sign_flip"](x, 3, rng), -x[:3])
    sybils = ATTACKS["sybil"](x, 3, rng)
    assert np.all(sybils == -x[0])
    # a robust rule shrugs off what drags the mean: ×100 boosted updates
    boosted = np.vstack([x, ATTACKS["scaling_x100"](x, 3, rng)])
    one_node = np.linalg.norm(x[0] - x.mean(axis=0))  # an honest node's own noise
    assert np.linalg.norm(aggregate(boosted, "median", f=3) - x.mean(axis=0)) < one_node
    assert np.linalg.norm(aggregate(boosted, "mean") - x.mean(axis=0)) > 20 * one_node


def test_runner_ci_sized():
    """The attack-matrix runner on a tiny configuration: ×100 updates move the mean, not DAF.

    (With one training step, a ×100 honest update can even help the mean: the sign of the
    change is not the point, its size is.)
    """
    from bench import robustness

    rows = robustness.run({
        "nodes": 5, "attackers": [1], "goal_attackers": 1, "f": 1, "domains": ["pydocs"],
        "attacks": ["scaling_x100", "free_rider"], "aggregators": ["mean", "daf"],
        "chars": 800, "doc_chars": 400, "local_steps": 1, "seq_len": 16, "batch_size": 2,
        "eval_tokens": 64, "eval_seq_len": 32,
    }, BenchContext(), log=lambda _: None)
    values = {r.name: r.value for r in rows}
    change = {(lab["agg"], lab["attack"]): v for name, v in values.items()
              for base, lab in [parse_name(name)] if base == "change_pct"}
    assert set(change) == {(a, k) for a in ("mean", "daf") for k in ("scaling_x100", "free_rider")}
    assert all(math.isfinite(v) for v in values.values())
    assert abs(change[("mean", "scaling_x100")]) > 5.0
    assert abs(change[("daf", "scaling_x100")]) < 1.0
    assert values["daf_worst_change_pct"] == max(change[("daf", k)] for k in
                                                  ("scaling_x100", "free_rider"))
    table = robustness.markdown(rows)
    assert "| scaling_x100 |" in table and "| mean | daf |" in table
