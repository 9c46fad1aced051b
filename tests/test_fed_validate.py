import numpy as np
import pytest

from federation import (
    BankLayout,
    Reason,
    Rejected,
    Validator,
    decode_delta,
    encode_delta,
    generate_key,
)

KEY = generate_key()
LAYOUT = {"fine": BankLayout({"b": (4, 2)}), "coarse": BankLayout({"b": (4, 2), "c": (3,)})}


def delta(tensors=None, *, round=2, base_version=1, node_id="a", example_count=5):
    tensors = tensors or {
        "fine": {"b": np.ones((4, 2))},
        "coarse": {"b": np.ones((4, 2)), "c": np.ones(3)},
    }
    return decode_delta(
        encode_delta(
            tensors,
            round=round,
            node_id=node_id,
            base_version=base_version,
            example_count=example_count,
            key=KEY,
            density=1.0,
        )
    )


def reason(validator, d):
    with pytest.raises(Rejected) as info:
        validator.check(d, round=2, base_version=1)
    return info.value.reason


def test_accepts_a_good_delta_once_per_node_and_round():
    v = Validator(LAYOUT, max_norm=10.0)
    v.check(delta(), round=2, base_version=1)
    v.check(delta(node_id="b"), round=2, base_version=1)
    assert reason(v, delta()) == Reason.DUPLICATE_UPDATE


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"round": 1}, Reason.WRONG_ROUND),
        ({"base_version": 0}, Reason.STALE_BASE_VERSION),
        ({"example_count": 0}, Reason.NO_EXAMPLES),
        (
            {
                "tensors": {
                    "fine": {"b": np.ones((4, 2)), "x": np.ones(1)},
                    "coarse": {"b": np.ones((4, 2)), "c": np.ones(3)},
                }
            },
            Reason.UNEXPECTED_TENSOR,
        ),
        ({"tensors": {"fine": {"b": np.ones((4, 2))}}}, Reason.MISSING_TENSOR),
        (
            {
                "tensors": {
                    "fine": {"b": np.ones((2, 4))},
                    "coarse": {"b": np.ones((4, 2)), "c": np.ones(3)},
                }
            },
            Reason.SHAPE_MISMATCH,
        ),
        (
            {
                "tensors": {
                    "fine": {"b": np.full((4, 2), 3.0)},
                    "coarse": {"b": np.ones((4, 2)), "c": np.ones(3)},
                }
            },
            Reason.NORM_BOUND_EXCEEDED,
        ),
    ],
)
def test_rejections_carry_machine_readable_reasons(kwargs, expected):
    assert reason(Validator(LAYOUT, max_norm=6.0), delta(**kwargs)) == expected


def test_non_finite_tensors_refused():
    v = Validator(LAYOUT, max_norm=10.0)
    with pytest.raises(Rejected) as info:
        v.check_tensors(
            {
                "fine": {"b": np.full((4, 2), np.inf)},
                "coarse": {"b": np.ones((4, 2)), "c": np.ones(3)},
            }
        )
    assert info.value.reason == Reason.NON_FINITE


def test_layout_flatten_round_trip_and_checks():
    layout = LAYOUT["coarse"]
    tensors = {"c": np.arange(3.0), "b": np.arange(8.0).reshape(4, 2)}
    flat = layout.flatten(tensors)
    assert flat.shape == (layout.size,) and flat[:8].tolist() == list(range(8))
    back = layout.unflatten(flat)
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="shape"):
        layout.flatten({"c": np.arange(3.0), "b": np.arange(8.0)})
    with pytest.raises(ValueError, match="invalid shape"):
        BankLayout({"b": (0, 2)})
