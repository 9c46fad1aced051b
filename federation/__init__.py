"""Federation algorithms of ruvdllm: pure code, no sockets, no processes.

Node side: `encode_delta` (top-k + int8 + error feedback, signed) and `unpack_adapter`.
Coordinator side: `decode_delta` → `verify_message` → `ReplayGuard.admit` → `Validator.check`
→ `DAF.aggregate` (robust rule per bank, reputation) → optional `noisy_mean` /
`RDPAccountant` → `pack_adapter`.
"""

from federation.adapter import adapter_digest, pack_adapter, unpack_adapter
from federation.aggregators import RULES, WEIGHTED_RULES, aggregate
from federation.codec import (
    DEFAULT_DENSITY,
    DecodedDelta,
    ErrorFeedback,
    compress_tensor,
    decode_delta,
    decompress_tensor,
    encode_delta,
)
from federation.daf import BANKS, DAF, BankRule, DAFConfig, DAFResult, NodeScore, default_rules
from federation.dp import RDPAccountant, clip_update, noisy_mean, subsampled_gaussian_rdp
from federation.errors import InvalidDelta, QuorumNotMet, Reason, Rejected
from federation.layout import BankLayout
from federation.signing import (
    ReplayGuard,
    canonical_bytes,
    check_node_id,
    generate_key,
    load_private_key,
    load_public_key,
    new_nonce,
    public_key_bytes,
    public_key_from_bytes,
    save_private_key,
    save_public_key,
    sign_message,
    verify_message,
)
from federation.validate import Validator

__all__ = [
    "BANKS",
    "DAF",
    "DEFAULT_DENSITY",
    "RULES",
    "WEIGHTED_RULES",
    "BankLayout",
    "BankRule",
    "DAFConfig",
    "DAFResult",
    "DecodedDelta",
    "ErrorFeedback",
    "InvalidDelta",
    "NodeScore",
    "QuorumNotMet",
    "RDPAccountant",
    "Reason",
    "Rejected",
    "ReplayGuard",
    "Validator",
    "adapter_digest",
    "aggregate",
    "canonical_bytes",
    "check_node_id",
    "clip_update",
    "compress_tensor",
    "decode_delta",
    "decompress_tensor",
    "default_rules",
    "encode_delta",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "new_nonce",
    "noisy_mean",
    "pack_adapter",
    "public_key_bytes",
    "public_key_from_bytes",
    "save_private_key",
    "save_public_key",
    "sign_message",
    "subsampled_gaussian_rdp",
    "unpack_adapter",
    "verify_message",
]
