"""Merged adapter versions: fetch, verify, keep, watch, and hot-swap into TALoRA's global slots.

The coordinator publishes signed ``MergedAdapter`` versions (per bank, the LoRA B matrices
under FFA-LoRA, plus the seed of the frozen A matrices). A node accepts a version only after
``federation.unpack_adapter`` has checked its sha256 and the coordinator's Ed25519
signature; anything else is refused with a log line and changes nothing.

A verified version newer than the one applied is swapped in between two requests: the
adapters are built (A from the seed, B from the message) outside the model lock, then
``TALoRA.set_global`` for every bank runs under :meth:`Engine.exclusive`, so a request in
flight finishes on the mix it started with and the next one starts on the new version.
The banks are saved afterwards, so a restarted node serves the last version it verified.

Training needs the exact version a round announces (its B matrices are the base of the
delta), which may not be the newest: :meth:`AdapterSync.base` serves it from a small cache
of recent versions or fetches it with ``GetAdapter``. A background thread follows
``WatchAdapters`` and reconnects with backoff when the stream breaks.

Local patterns (DESIGN §4 "local learning"): after each round the node keeps what its own
text taught every bank as a TALoRA pattern, :meth:`AdapterSync.store_local`: the frozen A of
the round's seed and ``trained B − global B`` clipped as the upload is (the node applies to
itself no more than it sends; unclipped patterns garbled generation: docs/decisions.md),
keyed by the embedding of the text it trained on and marked ``kind = "delta"``. Being a
difference, such a pattern is applied *with* its bank's global adapter by
:class:`GlobalPlusLocalHook` — ``global + Σ wᵢ·deltaᵢ`` within the bank's blend weight — so
it stays meaningful after the next merged version is swapped in. A later round on the same
text replaces the patterns of the earlier one; other texts' patterns stay (up to the store's
capacity, least used evicted).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation import Rejected, unpack_adapter
from node_agent.engine import Engine
from node_agent.metrics import Registry
from proto import ruvdllm_pb2 as pb
from proto import ruvdllm_pb2_grpc as pb_grpc
from ruvdllm.lora import Adapter, LoRAConfig, frozen_a
from ruvdllm.model import DiffusionLM
from ruvdllm.talora import BANKS, DELTA_KIND, TALoRA, TALoRAHook

log = logging.getLogger(__name__)

# Versions kept in memory for training bases (the applied one and a few before it).
CACHED_VERSIONS = 4
WATCH_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)


class AdapterError(RuntimeError):
    """A merged adapter that cannot be obtained or does not fit this node."""


@dataclass(frozen=True)
class Version:
    """A verified merged version: per bank, tensor name → float32 B matrix."""

    version: int
    sha256: bytes
    ffa_seed: int
    banks: dict[str, dict[str, np.ndarray]]


def bank_adapter(frozen: Adapter, version: Version, bank: str) -> Adapter:
    """A bank's LoRA adapter: the frozen A matrices of the version's seed plus its merged B."""
    tensors = dict(frozen)
    for name, b in version.banks.get(bank, {}).items():
        if not name.endswith(".lora_B") or name[:-1] + "A" not in tensors:
            raise AdapterError(f"merged adapter v{version.version} tensor {bank}/{name} is not "
                               "a LoRA B of this model")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(b))
    return tensors


class GlobalPlusLocalHook(TALoRAHook):
    """TALoRA's sampler hook with the node's per-request query (delta patterns add to globals).

    The node stores what each round's local training added as ``kind = "delta"``
    patterns, which :class:`~ruvdllm.talora.TALoRAHook` applies on top of the bank's
    global adapter; ``used`` (what the engine reports per request) restarts with
    every :meth:`set_query`.
    """

    def has_patterns(self) -> bool:
        """Whether the store holds any local pattern."""
        return bool(self.talora.patterns())

    def set_query(self, query: np.ndarray | None) -> None:
        """The retrieval key for the coming forwards (None: global slots only)."""
        self.query = query
        self.used = {}


class AdapterSync:
    """Keeps a node's TALoRA global slots on the coordinator's latest verified version."""

    def __init__(self, engine: Engine, talora: TALoRA, model: DiffusionLM, lora: LoRAConfig,
                 public_key: Ed25519PublicKey, channel: Callable[[], grpc.Channel],
                 metrics: Registry, timeout_s: float = 30.0) -> None:
        self.engine, self.talora, self.model, self.lora = engine, talora, model, lora
        self.public_key, self.channel, self.metrics = public_key, channel, metrics
        self.timeout_s = timeout_s
        self._versions: OrderedDict[int, Version] = OrderedDict()
        self._a_cache: dict[int, Adapter] = {}
        self._lock = threading.Lock()  # serialises verification and swaps
        self._stream: grpc.Future | None = None  # the WatchAdapters call in progress
        self.applied = talora.global_version
        engine.adapter_version = self.applied
        metrics.set("adapter_version", self.applied)
        metrics.describe("local_patterns", "gauge", "Local TALoRA patterns in the node's store")
        metrics.set("local_patterns", len(talora.patterns()))

    # --- verification ---------------------------------------------------------------------

    def verify(self, message: pb.MergedAdapter) -> Version:
        """Check digest, signature and bank layout; raise AdapterError (logged) otherwise."""
        try:
            banks = unpack_adapter(message, self.public_key)
        except Rejected as err:
            self.metrics.inc("refusals_total", reason=f"adapter_{err.reason}")
            log.warning("refused merged adapter v%d: %s", message.version, err)
            raise AdapterError(f"merged adapter v{message.version} refused: {err}") from None
        if message.version > 0 and set(banks) != set(BANKS):
            self.metrics.inc("refusals_total", reason="adapter_banks")
            log.warning("refused merged adapter v%d: banks %s", message.version, sorted(banks))
            raise AdapterError(f"merged adapter v{message.version} has banks {sorted(banks)}, "
                               f"expected {list(BANKS)}")
        return Version(message.version, bytes(message.sha256), message.ffa_seed, banks)

    def _frozen_a(self, seed: int) -> Adapter:
        if seed not in self._a_cache:
            self._a_cache.clear()  # a new seed comes with a new version; keep one
            self._a_cache[seed] = frozen_a(self.model, self.lora, seed)
        return self._a_cache[seed]

    def adapter(self, version: Version, bank: str) -> Adapter:
        """The full LoRA adapter of a bank: frozen A from the seed plus the merged B."""
        return bank_adapter(self._frozen_a(version.ffa_seed), version, bank)

    # --- applying -------------------------------------------------------------------------

    def _remember(self, version: Version) -> None:
        self._versions[version.version] = version
        self._versions.move_to_end(version.version)
        while len(self._versions) > CACHED_VERSIONS:
            self._versions.popitem(last=False)

    def offer(self, message: pb.MergedAdapter) -> bool:
        """Verify a version and hot-swap it in if it is newer; True when swapped."""
        version = self.verify(message)
        with self._lock:
            self._remember(version)
            if version.version <= self.applied:
                return False
            try:
                adapters = {bank: self.adapter(version, bank) for bank in BANKS}
            except ValueError as err:
                raise AdapterError(f"merged adapter v{version.version} does not fit this "
                                   f"model: {err}") from None
            with self.engine.exclusive():
                for bank, adapter in adapters.items():
                    self.talora.set_global(bank, adapter, version.version)
                self.engine.adapter_version = version.version
            self.applied = version.version
            if self.talora.root is not None:
                self.talora.save()
        self.metrics.set("adapter_version", version.version)
        self.metrics.inc("adapter_swaps_total")
        log.info("hot-swapped merged adapter v%d (round %d, contributors %s)", version.version,
                 message.round, ", ".join(message.contributors) or "none")
        return True

    def store_local(self, version: Version, deltas: dict[str, dict[str, np.ndarray]],
                    key: np.ndarray, source: str, round_number: int) -> list[int]:
        """Keep a round's local training as delta patterns, one per bank; returns their ids.

        ``deltas``: per bank, LoRA B name → ``trained − global`` of ``version``; ``key``:
        the embedding of the text trained on; ``source``: a fingerprint of that text, whose
        earlier patterns are replaced. The store changes between two requests (under
        :meth:`Engine.exclusive`) and is saved afterwards.
        """
        frozen = self._frozen_a(version.ffa_seed)
        local = replace(version, banks=deltas)
        adapters = [bank_adapter(frozen, local, b) for b in BANKS]
        metas = [{"bank": b, "kind": DELTA_KIND, "source": source, "round": round_number,
                  "base_version": version.version} for b in BANKS]
        with self._lock:
            stale = [pid for pid in self.talora.patterns()
                     if self.talora.meta(pid).get("source") == source]
            with self.engine.exclusive():
                for pid in stale:
                    self.talora.remove(pid)
                ids = self.talora.store_many(adapters, np.stack([key] * len(BANKS)), metas)
            if self.talora.root is not None:
                self.talora.save()
        self.metrics.set("local_patterns", len(self.talora.patterns()))
        log.info("round %d: stored local patterns %s (replacing %s) for text %s", round_number,
                 ids, stale, source[:12])
        return ids

    def fetch(self, version: int = 0) -> pb.MergedAdapter:
        """``GetAdapter`` from the coordinator (0: the latest)."""
        with self.channel() as channel:
            try:
                return pb_grpc.CoordinatorStub(channel).GetAdapter(
                    pb.GetAdapterRequest(version=version), timeout=self.timeout_s)
            except grpc.RpcError as err:
                raise AdapterError(f"GetAdapter(version={version}) failed: "
                                   f"{err.code().name}: {err.details()}") from None

    def refresh(self) -> int:
        """Fetch the latest version, apply it if newer; returns the applied version."""
        self.offer(self.fetch(0))
        return self.applied

    def base(self, version: int, sha256: bytes) -> Version:
        """The verified version a round trains from, fetched if not held; sha256 must match."""
        with self._lock:
            held = self._versions.get(version)
        if held is None:
            message = self.fetch(version)
            if message.version != version:
                raise AdapterError(f"asked for adapter v{version}, got v{message.version}")
            self.offer(message)
            held = self._versions[version]
        if sha256 and held.sha256 != sha256:
            raise AdapterError(f"adapter v{version} has sha256 {held.sha256.hex()[:16]}, the "
                               f"round announced {sha256.hex()[:16]}")
        return held

    # --- watching -------------------------------------------------------------------------

    def watch(self, stop: threading.Event) -> None:
        """Follow WatchAdapters until ``stop`` is set and :meth:`close` is called.

        Reconnects with backoff when the stream breaks. Run it in a thread.
        """
        failures = 0
        while not stop.is_set():
            try:
                with self.channel() as channel:
                    self._stream = pb_grpc.CoordinatorStub(channel).WatchAdapters(
                        pb.WatchAdaptersRequest(after_version=self.applied))
                    for message in self._stream:
                        failures = 0
                        try:
                            self.offer(message)
                        except AdapterError as err:
                            log.warning("watch: %s", err)
            except grpc.RpcError as err:
                if stop.is_set():
                    return
                log.info("adapter watch interrupted (%s); reconnecting", err.code().name)
            delay = WATCH_BACKOFF_S[min(failures, len(WATCH_BACKOFF_S) - 1)]
            failures += 1
            stop.wait(delay)

    def close(self) -> None:
        """Cancel the watch stream in progress (the watcher then sees its stop event)."""
        stream = self._stream
        if stream is not None:
            stream.cancel()
