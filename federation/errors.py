"""Exceptions and the machine-readable reasons with which the federation refuses input.

Three kinds of refusal, each with its own class:
- `InvalidDelta`: bytes that are not a well-formed encoded `LoRADelta` (the codec's answer).
- `Rejected`: well-formed input refused by policy (bad signature, replay, stale base,
  shape, norm, ...); its `reason` is a stable `Reason` code that receipts and logs carry.
- `QuorumNotMet`: too few valid updates for the tolerated number of Byzantine nodes; the
  coordinator keeps the previous adapter version and announces nothing new.
"""

from enum import StrEnum


class InvalidDelta(ValueError):
    """The bytes are not a well-formed encoded LoRADelta."""


class Reason(StrEnum):
    """Machine-readable refusal codes (the `reason` of a `SubmitDeltaReceipt`)."""

    MALFORMED = "malformed"
    UNKNOWN_NODE = "unknown_node"
    BAD_SIGNATURE = "bad_signature"
    BAD_DIGEST = "bad_digest"
    REPLAYED_NONCE = "replayed_nonce"
    STALE_ROUND = "stale_round"
    WRONG_ROUND = "wrong_round"
    STALE_BASE_VERSION = "stale_base_version"
    DUPLICATE_UPDATE = "duplicate_update"
    NO_EXAMPLES = "no_examples"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    MISSING_TENSOR = "missing_tensor"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    NORM_BOUND_EXCEEDED = "norm_bound_exceeded"


class Rejected(ValueError):
    """A well-formed update or adapter refused by policy, with a `Reason` code."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class QuorumNotMet(Exception):
    """Fewer valid updates than the 2f+1 needed; no new adapter version is produced."""

    def __init__(self, valid: int, required: int) -> None:
        super().__init__(f"quorum not met: {valid} valid updates, {required} required")
        self.valid = valid
        self.required = required
