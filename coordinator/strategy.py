"""The coordinator's Flower strategy: receipts in, verified DAF-merged signed versions out.

A subclass of Flower's message-based `FedAvg` (flwr.serverapp.strategy, Flower 1.41
"Message API") that overrides `configure_train` and `aggregate_train` and keeps its own
state in the coordinator's `Store`, because Flower's `aggregate_train` is not handed the
global arrays and the global state here (per-bank LoRA B tensors, signed versions) lives
outside Flower. The delta bodies are not in the replies (docs/flower-messages.md): each
reply names the SHA-256 of a body the node uploaded with `Coordinator.SubmitDelta`, and the
strategy loads it from the store and runs the federation pipeline on it:

    decode_delta → enrolled key → verify_message → ReplayGuard.admit → Validator.check
    → BankLayout.flatten → DAF.aggregate (robust rule per bank, reputation)
    → [DP-FedAvg: clipped noisy mean + RDP accountant] → base + merged → pack_adapter

Every refusal is logged and recorded with its reason; the round goes on with the others.
Fewer valid updates than the quorum max(2f+1, quorum) keep the previous version (Blanchard
et al. 2017: robust rules need n ≥ 2f+1); with the automatic f (the default, `byzantine_f =
None`: DAF takes the largest f the round's updates allow) the quorum is `quorum` alone.
Flower's `sample_nodes` waits forever for `min_available_nodes`; here the wait is bounded,
and the round itself is bounded by the `timeout` given to `Strategy.start` (a SIGKILLed
SuperNode stays "online" for two heartbeats).
Flower's `Grid.send_and_receive` pulls replies every 3 s, which adds up to 3 s to every
round; `start` wraps a Flower grid in `PromptGrid`, which pulls every `REPLY_POLL_S`.
"""

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from coordinator.reasons import RoundReason
from coordinator.store import ParticipantRow, RoundOutcome, Store
from federation import (
    DAF,
    BankRule,
    DAFConfig,
    DecodedDelta,
    InvalidDelta,
    QuorumNotMet,
    RDPAccountant,
    Reason,
    Rejected,
    ReplayGuard,
    Validator,
    decode_delta,
    default_rules,
    noisy_mean,
    pack_adapter,
    public_key_from_bytes,
    unpack_adapter,
    verify_message,
)

logger = logging.getLogger(__name__)

# Seconds between two pulls of train replies from the SuperLink (Flower's own grid: 3 s).
REPLY_POLL_S = 0.25


@dataclass(frozen=True)
class StrategySettings:
    """Round, validation, aggregation and DP settings (from the run config)."""

    coordinator_address: str
    coordinator_tls: bool = False
    round_timeout: float = 120.0
    wait_nodes_s: float = 60.0
    min_nodes: int = 2
    fraction: float = 1.0
    quorum: int = 1
    byzantine_f: int | None = None
    rules: Mapping[str, BankRule] = field(default_factory=default_rules)
    max_norm: float = 10.0
    density: float = 0.05
    local_steps: int = 20
    learning_rate: float = 1e-3
    clip_norm: float = 3.0
    dp_noise: float = 0.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1 or self.min_nodes < 1 or self.quorum < 1:
            raise ValueError("need 0 < fraction <= 1, min_nodes >= 1 and quorum >= 1")
        if self.round_timeout <= 0 or self.wait_nodes_s < 0:
            raise ValueError("need round_timeout > 0 and wait_nodes_s >= 0")
        if self.byzantine_f is not None and self.byzantine_f < 0:
            raise ValueError(f"byzantine_f must be >= 0 or None (auto), got {self.byzantine_f}")
        if self.dp_noise < 0 or not 0 < self.dp_delta < 1:
            raise ValueError("need dp_noise >= 0 and 0 < dp_delta < 1")

    @property
    def required(self) -> int:
        """Valid updates a round needs to produce a version: max(2f+1, quorum) for an explicit
        f; `quorum` for the automatic f, which always fits the updates there are."""
        if self.byzantine_f is None:
            return self.quorum
        return max(2 * self.byzantine_f + 1, self.quorum)


@dataclass
class _Round:
    round: int
    base_version: int
    sampled: list[int]


@dataclass(frozen=True)
class _Accepted:
    delta: DecodedDelta
    train_s: float | None
    upload_s: float | None


class _KeepVersion(Exception):
    """The round produces no version; the previous one stays (message says why)."""


class _Refusal(Exception):
    def __init__(self, reason: str, detail: str, node_id: str, digest: bytes | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.node_id, self.digest = reason, detail, node_id, digest


class PromptGrid(Grid):
    """A Flower grid whose `send_and_receive` pulls replies every `poll_s` seconds.

    Flower 1.41's HTTP grid sleeps a fixed 3 s between pulls, so a round whose last reply
    lands just after a pull waits up to 3 s more for nothing. A pull is one small request
    to the SuperLink; every other call goes to the wrapped grid unchanged.
    """

    def __init__(self, grid: Grid, poll_s: float = REPLY_POLL_S) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        self.grid, self.poll_s = grid, poll_s

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Any:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push `messages`, then pull until every reply is in or `timeout` has passed."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_s)
        return replies


def _sha_record(sha256: bytes) -> ArrayRecord:
    return ArrayRecord({"adapter-sha256": Array(np.frombuffer(sha256, dtype=np.uint8).copy())})


class RuvStrategy(FedAvg):
    """Verify, validate, DAF-aggregate, sign and persist; state in `store`, signed by `key`."""

    def __init__(
        self, store: Store, key: Ed25519PrivateKey, settings: StrategySettings
    ) -> None:
        super().__init__(
            fraction_train=settings.fraction,
            fraction_evaluate=0.0,
            min_train_nodes=settings.min_nodes,
            min_available_nodes=settings.min_nodes,
        )
        self.store, self.key, self.settings = store, key, settings
        if abandoned := store.abandon_open_rounds():
            logger.warning("rounds %s were left open by a stopped run: marked failed", abandoned)
        self.layout = store.layout()
        self.validator = Validator(self.layout, max_norm=settings.max_norm)
        self.guard = ReplayGuard()
        for node_id, round_, nonce in store.admitted_uploads():
            self.guard.admit(node_id, round_, nonce)
        self.daf = DAF(
            DAFConfig(rules=dict(settings.rules), f=settings.byzantine_f), store.reputations()
        )
        self.accountant: RDPAccountant | None = None
        if settings.dp_noise > 0:
            self.accountant = RDPAccountant(settings.dp_noise, settings.fraction)
            self.accountant.step(sum(r.epsilon is not None for r in store.rounds()))
        self._rng = np.random.default_rng()
        self._open: _Round | None = None

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's `Strategy.start`, on a `PromptGrid` when given a Flower grid."""
        if isinstance(grid, Grid) and not isinstance(grid, PromptGrid):
            grid = PromptGrid(grid)
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                             evaluate_config, evaluate_fn)

    # ---- configure ------------------------------------------------------------------------------

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """Node ids once `min_nodes` are connected or `wait_nodes_s` has passed (bounded
        replacement for Flower's `sample_nodes`, which waits forever)."""
        end = time.monotonic() + self.settings.wait_nodes_s
        while len(nodes := list(grid.get_node_ids())) < self.settings.min_nodes:
            if time.monotonic() >= end:
                break
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        return nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Open the next ruvdllm round on the latest version and ask the sampled nodes to train.

        `arrays` (Flower's copy of the global model) is not used: the store is the truth.
        """
        s = self.settings
        nodes = self._wait_for_nodes(grid)
        if len(nodes) < s.required:
            logger.warning(
                "round skipped: %d nodes connected after %.0f s, %d needed for a version",
                len(nodes), s.wait_nodes_s, s.required,
            )
            self._open = None
            return []
        count = min(len(nodes), max(int(len(nodes) * s.fraction), s.min_nodes))
        sampled = random.sample(nodes, count)
        latest = self.store.latest_version()
        assert latest is not None  # store.layout() in __init__ proved a version exists
        round_ = self.store.last_round() + 1
        deadline = time.time() + s.round_timeout
        self.store.open_round(round_, latest.version, len(sampled), deadline)
        self._open = _Round(round_, latest.version, sampled)
        logger.info(
            "round %d: %d of %d nodes train from version %d",
            round_, len(sampled), len(nodes), latest.version,
        )
        train_config = ConfigRecord(
            {
                "server-round": server_round,
                "round": round_,
                "base-version": latest.version,
                "ffa-seed": latest.ffa_seed,
                "density": s.density,
                "local-steps": s.local_steps,
                "learning-rate": s.learning_rate,
                "clip-norm": s.clip_norm,
                "coordinator-address": s.coordinator_address,
                "coordinator-tls": s.coordinator_tls,
                "deadline-unix": deadline,
            }
        )
        record = RecordDict(
            {self.arrayrecord_key: _sha_record(latest.sha256),
             self.configrecord_key: train_config}
        )
        return self._construct_messages(record, sampled, MessageType.TRAIN)

    # ---- aggregate ------------------------------------------------------------------------------

    def _admit(self, reply: Message, current: _Round) -> _Accepted:
        """Run one reply through the checks of docs/flower-messages.md §3, or raise _Refusal."""
        flwr_id = f"flwr:{reply.metadata.src_node_id}"
        if reply.has_error():
            raise _Refusal(RoundReason.NODE_ERROR, reply.error.reason or "error reply", flwr_id)
        try:
            content = reply.content
            digest = content.array_records["arrays"]["digest"].numpy().astype(np.uint8).tobytes()
            receipt = content.config_records["receipt"]
            node_id = str(receipt["node-id"])
            receipt_round = int(receipt["round"])  # type: ignore[arg-type]
            signature = bytes.fromhex(str(receipt["signature"]))
            metrics = content.metric_records["metrics"]
            train_s = metrics.get("train-s")
            upload_s = metrics.get("upload-s")
            if len(digest) != 32 or not node_id:
                raise ValueError("digest must be 32 bytes and node-id non-empty")
        except (KeyError, ValueError, TypeError) as exc:
            raise _Refusal(RoundReason.MALFORMED_REPLY, str(exc), flwr_id) from None
        stored = self.store.delta(digest)
        if stored is None:
            raise _Refusal(
                RoundReason.MISSING_DELTA, f"no uploaded delta with digest {digest.hex()[:16]}",
                node_id,
            )
        if (stored.node_id, stored.round) != (node_id, receipt_round):
            raise _Refusal(
                RoundReason.RECEIPT_MISMATCH,
                f"receipt names ({node_id}, round {receipt_round}), the delta "
                f"({stored.node_id}, round {stored.round})",
                node_id, digest,
            )
        try:
            delta = decode_delta(stored.body)
            if bytes(delta.message.signature) != signature:
                raise _Refusal(RoundReason.RECEIPT_MISMATCH,
                               "receipt signature differs from the delta's", node_id, digest)
            raw_key = self.store.node_key(delta.node_id)
            if raw_key is None:
                raise Rejected(Reason.UNKNOWN_NODE, f"node {delta.node_id!r} is not enrolled")
            verify_message(delta.message, public_key_from_bytes(raw_key))
            self.guard.admit(delta.node_id, delta.round, delta.nonce)
            self.validator.check(delta, round=current.round, base_version=current.base_version)
        except InvalidDelta as exc:
            raise _Refusal(Reason.MALFORMED, str(exc), node_id, digest) from None
        except Rejected as exc:
            raise _Refusal(exc.reason, exc.detail, node_id, digest) from None
        self.store.set_delta_status(digest, "accepted")
        return _Accepted(
            delta,
            None if train_s is None else float(train_s),  # type: ignore[arg-type]
            None if upload_s is None else float(upload_s),  # type: ignore[arg-type]
        )

    def _refuse(self, refusal: _Refusal, round_: int) -> None:
        logger.warning(
            "round %d: refused %s: %s: %s", round_, refusal.node_id, refusal.reason, refusal.detail
        )
        self.store.record_rejection(
            round=round_, node_id=refusal.node_id, stage="round", reason=refusal.reason,
            detail=refusal.detail, digest=refusal.digest,
        )
        if refusal.digest is not None and refusal.reason != Reason.REPLAYED_NONCE:
            stored = self.store.delta(refusal.digest)
            if stored is not None and stored.status == "stored":
                self.store.set_delta_status(refusal.digest, "refused")

    def _merge(
        self, current: _Round, accepted: list[_Accepted]
    ) -> tuple[dict[str, dict[str, np.ndarray]], list[str], float | None]:
        """DAF per bank (or DP-FedAvg over DAF's kept nodes) applied to the base version.

        Returns the new tensors, the contributing nodes and ε (None without DP); raises
        _KeepVersion when too few updates survive DAF's exclusions or a bank's rule
        cannot run on this many updates.
        """
        s = self.settings
        deltas = {a.delta.node_id: a.delta for a in accepted}
        updates = {
            bank: {n: lay.flatten(d.tensors[bank]) for n, d in deltas.items()}
            for bank, lay in self.layout.items()
        }
        gains = {n: float(d.metrics.get("quality_gain", 0.0)) for n, d in deltas.items()}
        try:
            result = self.daf.aggregate(updates, gains)
        except QuorumNotMet as exc:
            raise _KeepVersion(str(exc)) from None
        except ValueError as exc:  # a rule's own n/f condition (e.g. Multi-Krum n >= 2f+3)
            raise _KeepVersion(f"aggregation needs more updates: {exc}") from None
        kept = sorted(set(deltas) - set(result.excluded) - set(result.redundant)
                      - set(result.opposed))
        for node in result.excluded:
            self._refuse(
                _Refusal(RoundReason.EXCLUDED_BY_DAF,
                         f"reputation {result.reputations[node]:.3f} after scores "
                         f"{result.scores[node]}", node, deltas[node].digest),
                current.round,
            )
        for node, why in result.redundant.items():
            self._refuse(_Refusal(RoundReason.REDUNDANT_UPDATE, why, node, deltas[node].digest),
                         current.round)
        for node, cos in result.opposed.items():
            self._refuse(_Refusal(RoundReason.OPPOSED_UPDATE,
                                  f"cosine {cos:+.3f} with the other updates' sum", node,
                                  deltas[node].digest), current.round)
        if len(kept) < s.required:
            raise _KeepVersion(str(QuorumNotMet(len(kept), s.required)))
        merged = result.merged
        epsilon = None
        if self.accountant is not None:
            banks = list(self.layout)
            stacked = np.stack([np.concatenate([updates[b][n] for b in banks]) for n in kept])
            noisy = noisy_mean(
                stacked, clip_norm=s.clip_norm, noise_multiplier=s.dp_noise, rng=self._rng
            )
            sizes = np.cumsum([self.layout[b].size for b in banks])[:-1]
            merged = dict(zip(banks, np.split(noisy, sizes), strict=True))
            self.accountant.step()
            epsilon = self.accountant.epsilon(s.dp_delta)
        base = unpack_adapter(
            self.store.load_adapter(current.base_version), self.key.public_key()
        )
        new = {
            bank: {
                name: base[bank][name] + delta
                for name, delta in lay.unflatten(merged[bank]).items()
            }
            for bank, lay in self.layout.items()
        }
        return new, kept, epsilon

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, merge the accepted deltas and persist the signed version.

        Returns (None, metrics) when the previous version is kept (Flower keeps its arrays).
        """
        current, self._open = self._open, None
        if current is None:
            return None, None
        self.store.mark_replies(current.round)
        replies = list(replies)
        answered = {m.metadata.src_node_id for m in replies}
        for missing in sorted(set(current.sampled) - answered):
            self._refuse(
                _Refusal(RoundReason.TIMEOUT,
                         f"no reply within {self.settings.round_timeout:.0f} s",
                         f"flwr:{missing}"),
                current.round,
            )
        accepted: list[_Accepted] = []
        for reply in replies:
            try:
                accepted.append(self._admit(reply, current))
            except _Refusal as refusal:
                self._refuse(refusal, current.round)
        started = time.perf_counter()
        metrics = MetricRecord(
            {"round": current.round, "accepted": len(accepted),
             "refused": len(current.sampled) - len(accepted)}
        )
        try:
            if len(accepted) < self.settings.required:
                raise _KeepVersion(str(QuorumNotMet(len(accepted), self.settings.required)))
            tensors, kept, epsilon = self._merge(current, accepted)
        except _KeepVersion as exc:
            self.daf.reputations = self.store.reputations()
            logger.warning("round %d: %s; keeping version %d", current.round, exc,
                           current.base_version)
            self.store.finish_round(RoundOutcome(
                current.round, "kept", len(accepted), aggregate_s=time.perf_counter() - started,
                note=str(exc),
            ))
            return None, metrics
        latest = self.store.latest_version()
        assert latest is not None
        adapter = pack_adapter(
            tensors, version=latest.version + 1, round=current.round,
            parent_version=current.base_version, ffa_seed=latest.ffa_seed, contributors=kept,
            key=self.key,
        )
        aggregate_s = time.perf_counter() - started
        self.store.save_version(
            adapter,
            RoundOutcome(current.round, "merged", len(accepted), adapter.version, aggregate_s,
                         epsilon),
            [ParticipantRow(current.round, a.delta.node_id, a.delta.digest, a.delta.size_bytes,
                            a.delta.example_count, a.train_s, a.upload_s,
                            a.delta.node_id in kept) for a in accepted],
            self.daf.reputations,
        )
        logger.info(
            "round %d: version %d from %d of %d nodes (sha256 %s, %.2f s to aggregate)",
            current.round, adapter.version, len(kept), len(current.sampled),
            adapter.sha256.hex()[:16], aggregate_s,
        )
        metrics["version"] = adapter.version
        return _sha_record(adapter.sha256), metrics
