"""Policy checks on a decoded (and signature-verified) delta before it may be aggregated.

Checks, in order, each refusal a `Rejected` with its `Reason`:
round is the current one; base version is the current one (a delta against an older
adapter would be applied to the wrong weights); at most one update per node per round;
example count > 0; exactly the expected banks and tensor names; expected shapes; finite
values; and the L2 norm of the whole delta, sqrt(Σ_banks Σ_tensors ‖Δ‖²), at most `max_norm`
(an unbounded norm is what scaling attacks and broken clients send).
"""

from collections.abc import Mapping

import numpy as np

from federation.codec import DecodedDelta
from federation.errors import Reason, Rejected
from federation.layout import BankLayout


class Validator:
    """Validates the deltas of one coordinator against the adapter layout and a norm bound."""

    def __init__(self, layout: Mapping[str, BankLayout], *, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        self.layout = dict(layout)
        self.max_norm = max_norm
        self._seen: set[tuple[str, int]] = set()

    def check(self, delta: DecodedDelta, *, round: int, base_version: int) -> None:
        """Accept the delta for (`round`, `base_version`) or raise `Rejected`.

        An accepted delta is remembered, so a second one from the same node and round is
        refused with DUPLICATE_UPDATE.
        """
        node = delta.node_id
        if delta.round != round:
            raise Rejected(
                Reason.WRONG_ROUND, f"node {node!r} sent round {delta.round}, current is {round}"
            )
        if delta.base_version != base_version:
            raise Rejected(
                Reason.STALE_BASE_VERSION,
                f"node {node!r} trained from version "
                f"{delta.base_version}, current is {base_version}",
            )
        if (node, round) in self._seen:
            raise Rejected(
                Reason.DUPLICATE_UPDATE, f"node {node!r} already sent an update in round {round}"
            )
        if delta.example_count == 0:
            raise Rejected(Reason.NO_EXAMPLES, f"node {node!r} reports 0 training examples")
        self.check_tensors(delta.tensors)
        self._seen.add((node, round))

    def check_tensors(self, tensors: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Names, shapes, finiteness and norm bound of per-bank tensors."""
        total = 0.0
        for bank in sorted(set(tensors) | set(self.layout)):
            expected = self.layout[bank].shapes if bank in self.layout else {}
            got = tensors.get(bank, {})
            if extra := sorted(set(got) - set(expected)):
                raise Rejected(
                    Reason.UNEXPECTED_TENSOR, f"bank {bank!r}: unexpected tensors {extra}"
                )
            if missing := sorted(set(expected) - set(got)):
                raise Rejected(Reason.MISSING_TENSOR, f"bank {bank!r}: missing tensors {missing}")
            for name, array in got.items():
                if array.shape != expected[name]:
                    raise Rejected(
                        Reason.SHAPE_MISMATCH,
                        f"{bank}/{name} has shape {array.shape}, expected {expected[name]}",
                    )
                if not np.isfinite(array).all():
                    raise Rejected(Reason.NON_FINITE, f"{bank}/{name} holds NaN or infinity")
                total += float(np.sum(np.square(array, dtype=np.float64)))
        if np.sqrt(total) > self.max_norm:
            raise Rejected(
                Reason.NORM_BOUND_EXCEEDED,
                f"delta norm {np.sqrt(total):.4g} exceeds {self.max_norm:.4g}",
            )
