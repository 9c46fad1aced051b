"""Refusal reasons the coordinator adds to `federation.Reason` for round-level failures.

`federation.Reason` covers what is wrong with a delta; these cover what goes wrong with a
node's part in a Flower round (docs/flower-messages.md §3). Both are stored as plain strings
in the `rejections` table, so `status` and tests read one vocabulary.
"""

from enum import StrEnum


class RoundReason(StrEnum):
    """Why a sampled node's reply did not count in a round."""

    TIMEOUT = "timeout"
    NODE_ERROR = "node_error"
    MALFORMED_REPLY = "malformed_reply"
    MISSING_DELTA = "missing_delta"
    RECEIPT_MISMATCH = "receipt_mismatch"
    EXCLUDED_BY_DAF = "excluded_by_daf"
    REDUNDANT_UPDATE = "redundant_update"  # empty, or a copy of another node's update
    OPPOSED_UPDATE = "opposed_update"  # points against the other updates' sum (DAF)
