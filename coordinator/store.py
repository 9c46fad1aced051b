"""The coordinator's durable state: one SQLite database plus one safetensors file per version.

Two processes share it: the coordinator daemon (gRPC service: enrollment look-ups, delta
uploads, adapter distribution) and the ServerApp that Flower's SuperExec runs (the strategy:
rounds, verdicts, reputations, new versions). SQLite in WAL mode lets readers proceed while
one writer commits (https://www.sqlite.org/wal.html); every write is one `BEGIN IMMEDIATE`
transaction, so a crash leaves either the old or the new state.

State folder layout (``state_dir``)::

    coordinator.db            SQLite: nodes, rounds, deltas, participants, rejections,
                              reputations, versions (schema below)
    adapters/v00000001-<sha256[:12]>.safetensors
                              B tensors of one version, keys "<bank>/<tensor name>", with
                              the signed header fields in the safetensors metadata

A version file is written to a temporary name, fsynced, renamed, and the directory fsynced
before its row is inserted, so a row never points at a partial file; a file without a row
(crash in between) is ignored. Loading a version rebuilds the `MergedAdapter` and checks its
sha256, so a damaged file is reported, never served.

A state folder that cannot be written (read-only, full, file size limit) raises `StoreError`
naming the folder and the system's reason; the failed write leaves no temporary file and no
partial transaction, so the state stays as it was (tests/test_faults.py).
"""

import json
import math
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from federation import BankLayout, DecodedDelta, adapter_digest, check_node_id
from proto import ruvdllm_pb2 as pb

DB_NAME = "coordinator.db"
ADAPTERS_DIR = "adapters"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL UNIQUE,
    flower_key TEXT,
    enrolled_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    base_version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'merged', 'kept', 'failed')),
    sampled INTEGER NOT NULL,
    started_unix REAL NOT NULL,
    deadline_unix REAL NOT NULL,
    replies_unix REAL,
    finished_unix REAL,
    accepted INTEGER,
    version INTEGER,
    aggregate_s REAL,
    epsilon REAL,
    note TEXT
);
CREATE TABLE IF NOT EXISTS deltas (
    digest BLOB PRIMARY KEY,
    node_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    size_bytes INTEGER NOT NULL,
    body BLOB NOT NULL,
    received_unix REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('stored', 'accepted', 'refused')),
    UNIQUE (node_id, nonce)
);
CREATE TABLE IF NOT EXISTS participants (
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    digest BLOB NOT NULL,
    size_bytes INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    train_s REAL,
    upload_s REAL,
    contributed INTEGER NOT NULL,
    PRIMARY KEY (round, node_id)
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER,
    node_id TEXT NOT NULL,
    stage TEXT NOT NULL CHECK (stage IN ('submit', 'round')),
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    digest BLOB,
    at_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reputations (
    node_id TEXT PRIMARY KEY,
    reputation REAL NOT NULL,
    round INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    parent_version INTEGER NOT NULL,
    sha256 BLOB NOT NULL UNIQUE,
    ffa_seed INTEGER NOT NULL,
    file TEXT NOT NULL,
    contributors TEXT NOT NULL,
    created_unix REAL NOT NULL,
    signature BLOB NOT NULL
);
"""


class StoreError(RuntimeError):
    """The state folder is missing, damaged, or asked for something it does not hold."""


@dataclass(frozen=True)
class NodeRow:
    """An enrolled node: id, raw Ed25519 public key, optional SuperLink (OpenSSH) key."""

    node_id: str
    public_key: bytes
    flower_key: str | None
    enrolled_unix: float


@dataclass(frozen=True)
class RoundRow:
    """One federated round as recorded (times are Unix seconds)."""

    round: int
    base_version: int
    status: str
    sampled: int
    started_unix: float
    deadline_unix: float
    replies_unix: float | None
    finished_unix: float | None
    accepted: int | None
    version: int | None
    aggregate_s: float | None
    epsilon: float | None
    note: str | None


@dataclass(frozen=True)
class VersionRow:
    """The header of one persisted adapter version."""

    version: int
    round: int
    parent_version: int
    sha256: bytes
    ffa_seed: int
    file: str
    contributors: tuple[str, ...]
    created_unix: float
    signature: bytes


@dataclass(frozen=True)
class StoredDelta:
    """An uploaded delta body with the header fields the service read from it."""

    digest: bytes
    node_id: str
    round: int
    base_version: int
    nonce: bytes
    size_bytes: int
    body: bytes
    status: str


@dataclass(frozen=True)
class RejectionRow:
    """A refused upload or reply, with its machine-readable reason."""

    round: int | None
    node_id: str
    stage: str
    reason: str
    detail: str
    digest: bytes | None
    at_unix: float


@dataclass(frozen=True)
class ParticipantRow:
    """A node whose delta passed every check in a round, and whether DAF kept it."""

    round: int
    node_id: str
    digest: bytes
    size_bytes: int
    num_examples: int
    train_s: float | None
    upload_s: float | None
    contributed: bool


@dataclass(frozen=True)
class RoundOutcome:
    """How a round ended: 'merged' (with its version), 'kept' or 'failed', and its figures."""

    round: int
    status: str
    accepted: int
    version: int | None = None
    aggregate_s: float | None = None
    epsilon: float | None = None
    note: str | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _adapter_tensors(adapter: pb.MergedAdapter) -> dict[str, np.ndarray]:
    out = {}
    for bank in adapter.banks:
        for t in bank.tensors:
            shape = tuple(int(s) for s in t.shape)
            out[f"{bank.bank}/{t.name}"] = np.frombuffer(t.data, dtype="<f4").reshape(shape)
    return out


class Store:
    """Open (creating if needed) the state in `state_dir`; safe to share between threads."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ADAPTERS_DIR).mkdir(exist_ok=True)
            self._db = sqlite3.connect(
                self.root / DB_NAME, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the state folder {self.root}: {exc}") from exc
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.root / DB_NAME}: SQLite cannot use WAL here "
                                 f"(journal mode {mode}); use a local file system")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._lock:
                self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot use the state folder {self.root} "
                             f"(is it writable?): {exc}") from exc
        except StoreError:
            self._db.close()
            raise

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One `BEGIN IMMEDIATE` transaction, rolled back on any error (COMMIT included).

        SQLite's operational errors (disk full, read-only, locked) become StoreError;
        IntegrityError passes through for callers that test uniqueness.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise StoreError(f"cannot write {self.root / DB_NAME}: {exc}") from exc

    def _read(self, sql: str, args: Iterable[object] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # ---- nodes -------------------------------------------------------------------------------

    def enroll(self, node_id: str, public_key: bytes, flower_key: str | None = None) -> bool:
        """Register a node's Ed25519 key; True if new, False if already enrolled identically.

        Raises StoreError when the id or the key is enrolled with a different counterpart
        (re-keying a node is an explicit operator decision, not a side effect).
        """
        try:
            check_node_id(node_id)
        except ValueError as err:
            raise StoreError(str(err)) from None
        if len(public_key) != 32:
            raise StoreError("a node needs a 32-byte Ed25519 public key")
        with self._write() as db:
            rows = db.execute(
                "SELECT node_id, public_key, flower_key FROM nodes"
                " WHERE node_id = ? OR public_key = ?",
                (node_id, public_key),
            ).fetchall()
            if not rows:
                db.execute(
                    "INSERT INTO nodes VALUES (?, ?, ?, ?)",
                    (node_id, public_key, flower_key, time.time()),
                )
                return True
            if rows != [(node_id, public_key, rows[0][2])]:
                raise StoreError(
                    f"node {node_id!r} or its key is already enrolled with another key or id"
                )
            if flower_key is not None and flower_key != rows[0][2]:
                db.execute(
                    "UPDATE nodes SET flower_key = ? WHERE node_id = ?", (flower_key, node_id)
                )
            return False

    def node_key(self, node_id: str) -> bytes | None:
        """Raw public key of an enrolled node, None if unknown."""
        rows = self._read("SELECT public_key FROM nodes WHERE node_id = ?", (node_id,))
        return bytes(rows[0][0]) if rows else None

    def nodes(self) -> list[NodeRow]:
        """Every enrolled node, by id."""
        rows = self._read("SELECT * FROM nodes ORDER BY node_id")
        return [NodeRow(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

    # ---- versions ----------------------------------------------------------------------------

    def save_version(
        self,
        adapter: pb.MergedAdapter,
        outcome: RoundOutcome | None = None,
        participants: Iterable[ParticipantRow] = (),
        reputations: Mapping[str, float] | None = None,
    ) -> None:
        """Persist a signed adapter version (file, then row) and, in the row's transaction,
        close its round as merged with its participants and the reputations after it.

        Refuses a version that is not exactly latest + 1 or whose sha256 is wrong.
        """
        if adapter.sha256 != adapter_digest(adapter):
            raise StoreError(f"adapter version {adapter.version} does not match its sha256")
        latest = self.latest_version()
        expected = 1 if latest is None else latest.version + 1
        if adapter.version != expected:
            raise StoreError(f"next version must be {expected}, got {adapter.version}")
        name = f"v{adapter.version:08d}-{adapter.sha256.hex()[:12]}.safetensors"
        folder = self.root / ADAPTERS_DIR
        metadata = {"version": str(adapter.version), "sha256": adapter.sha256.hex()}
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
        except OSError as exc:
            raise StoreError(f"cannot write adapter version {adapter.version} in {folder}: "
                             f"{exc}") from exc
        os.close(fd)
        try:
            save_file(_adapter_tensors(adapter), tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
            _fsync_dir(folder)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError | SafetensorError):
                raise StoreError(f"cannot write adapter version {adapter.version} in "
                                 f"{folder}: {exc}") from exc
            raise
        with self._write() as db:
            db.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    adapter.version,
                    adapter.round,
                    adapter.parent_version,
                    bytes(adapter.sha256),
                    adapter.ffa_seed,
                    name,
                    json.dumps(list(adapter.contributors)),
                    adapter.created_unix,
                    bytes(adapter.signature),
                ),
            )
            if outcome is not None:
                self._finish_round(db, outcome)
                self._add_participants(db, participants)
                self._save_reputations(db, reputations or {}, outcome.round)

    def _version_rows(self, where: str, args: Iterable[object]) -> list[VersionRow]:
        rows = self._read(f"SELECT * FROM versions {where}", args)
        return [
            VersionRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], tuple(json.loads(r[6])), r[7],
                       bytes(r[8]))
            for r in rows
        ]

    def latest_version(self) -> VersionRow | None:
        """Header of the newest version, None before initialisation."""
        rows = self._version_rows("ORDER BY version DESC LIMIT 1", ())
        return rows[0] if rows else None

    def versions(self) -> list[VersionRow]:
        """Every version header, oldest first."""
        return self._version_rows("ORDER BY version", ())

    def version(self, version: int) -> VersionRow | None:
        """Header of one version, None if absent."""
        rows = self._version_rows("WHERE version = ?", (version,))
        return rows[0] if rows else None

    def load_adapter(self, version: int) -> pb.MergedAdapter:
        """The signed MergedAdapter of a version, rebuilt from its file and checked."""
        row = self.version(version)
        if row is None:
            raise StoreError(f"no adapter version {version}")
        path = self.root / ADAPTERS_DIR / row.file
        try:
            tensors = load_file(str(path))
        except (OSError, ValueError, SafetensorError) as exc:
            raise StoreError(f"adapter file {path} cannot be read: {exc}") from None
        adapter = pb.MergedAdapter(
            version=row.version,
            round=row.round,
            parent_version=row.parent_version,
            ffa_seed=row.ffa_seed,
            contributors=list(row.contributors),
            created_unix=row.created_unix,
            sha256=row.sha256,
            signature=row.signature,
        )
        banks: dict[str, pb.BankAdapter] = {}
        for key in sorted(tensors):
            bank, _, name = key.partition("/")
            if bank not in banks:
                banks[bank] = adapter.banks.add(bank=bank)
            array = np.asarray(tensors[key], dtype="<f4")
            banks[bank].tensors.add(name=name, shape=list(array.shape), data=array.tobytes())
        if adapter_digest(adapter) != row.sha256:
            raise StoreError(f"adapter file {path} does not match the sha256 of version {version}")
        return adapter

    def layout(self) -> dict[str, BankLayout]:
        """Bank layouts (tensor names and shapes) of the newest version."""
        latest = self.latest_version()
        if latest is None:
            raise StoreError(f"{self.root} holds no adapter version; run `ruvdllm-coordinator "
                             "start` once to initialise it")
        adapter = self.load_adapter(latest.version)
        return {
            b.bank: BankLayout({t.name: tuple(int(s) for s in t.shape) for t in b.tensors})
            for b in adapter.banks
        }

    # ---- rounds ------------------------------------------------------------------------------

    def open_round(self, round: int, base_version: int, sampled: int, deadline_unix: float) -> None:
        """Record the start of a round; rounds only go forward."""
        with self._write() as db:
            last = db.execute("SELECT MAX(round) FROM rounds").fetchone()[0]
            if last is not None and round <= last:
                raise StoreError(f"round {round} is not after the last recorded round {last}")
            db.execute(
                "INSERT INTO rounds (round, base_version, status, sampled, started_unix,"
                " deadline_unix) VALUES (?, ?, 'open', ?, ?, ?)",
                (round, base_version, sampled, time.time(), deadline_unix),
            )

    def mark_replies(self, round: int) -> None:
        """Note when the round's replies were in (splits transport from aggregation)."""
        with self._write() as db:
            db.execute("UPDATE rounds SET replies_unix = ? WHERE round = ?", (time.time(), round))

    def finish_round(self, outcome: RoundOutcome) -> None:
        """Close a round that produced no version (kept or failed)."""
        with self._write() as db:
            self._finish_round(db, outcome)

    @staticmethod
    def _finish_round(db: sqlite3.Connection, o: RoundOutcome) -> None:
        cur = db.execute(
            "UPDATE rounds SET status = ?, finished_unix = ?, accepted = ?, version = ?,"
            " aggregate_s = ?, epsilon = ?, note = ? WHERE round = ? AND status = 'open'",
            (o.status, time.time(), o.accepted, o.version, o.aggregate_s, o.epsilon, o.note,
             o.round),
        )
        if cur.rowcount != 1:
            raise StoreError(f"round {o.round} is not open")

    def abandon_open_rounds(self) -> list[int]:
        """Mark rounds left open by a stopped ServerApp as failed; returns their numbers."""
        with self._write() as db:
            rows = [r[0] for r in db.execute("SELECT round FROM rounds WHERE status = 'open'")]
            db.execute(
                "UPDATE rounds SET status = 'failed', finished_unix = ?,"
                " note = 'abandoned: the ServerApp stopped before the round finished'"
                " WHERE status = 'open'",
                (time.time(),),
            )
        return rows

    def _round_rows(self, where: str, args: Iterable[object]) -> list[RoundRow]:
        return [RoundRow(*r) for r in self._read(f"SELECT * FROM rounds {where}", args)]

    def open_round_row(self) -> RoundRow | None:
        """The round now accepting uploads, if any."""
        rows = self._round_rows("WHERE status = 'open' ORDER BY round DESC LIMIT 1", ())
        return rows[0] if rows else None

    def rounds(self) -> list[RoundRow]:
        """Every round, oldest first."""
        return self._round_rows("ORDER BY round", ())

    def last_round(self) -> int:
        """Number of the newest recorded round (0 before the first)."""
        return int(self._read("SELECT COALESCE(MAX(round), 0) FROM rounds")[0][0])

    # ---- deltas, participants, rejections, reputations -----------------------------------------

    def put_delta(self, delta: DecodedDelta, body: bytes) -> bool:
        """Store a verified upload; False (nothing stored) if its digest or (node, nonce) exists."""
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO deltas VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'stored')",
                    (delta.digest, delta.node_id, delta.round, delta.base_version, delta.nonce,
                     delta.size_bytes, body, time.time()),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def delta(self, digest: bytes) -> StoredDelta | None:
        """An uploaded delta by its SHA-256, None if never stored."""
        rows = self._read(
            "SELECT digest, node_id, round, base_version, nonce, size_bytes, body, status"
            " FROM deltas WHERE digest = ?",
            (digest,),
        )
        if not rows:
            return None
        r = rows[0]
        return StoredDelta(bytes(r[0]), r[1], r[2], r[3], bytes(r[4]), r[5], bytes(r[6]), r[7])

    def set_delta_status(self, digest: bytes, status: str) -> None:
        """Mark a stored delta accepted or refused by the strategy."""
        with self._write() as db:
            db.execute("UPDATE deltas SET status = ? WHERE digest = ?", (status, digest))

    def admitted_uploads(self) -> list[tuple[str, int, bytes]]:
        """(node, round, nonce) of every delta the strategy accepted, to rebuild ReplayGuard."""
        rows = self._read(
            "SELECT node_id, round, nonce FROM deltas WHERE status = 'accepted' ORDER BY round"
        )
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    @staticmethod
    def _add_participants(db: sqlite3.Connection, rows: Iterable[ParticipantRow]) -> None:
        db.executemany(
            "INSERT INTO participants VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(p.round, p.node_id, p.digest, p.size_bytes, p.num_examples, p.train_s,
              p.upload_s, int(p.contributed)) for p in rows],
        )

    def participants(self, round: int | None = None) -> list[ParticipantRow]:
        """Participants of one round, or of all rounds."""
        where, args = ("WHERE round = ?", (round,)) if round is not None else ("", ())
        rows = self._read(f"SELECT * FROM participants {where} ORDER BY round, node_id", args)
        return [ParticipantRow(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6], bool(r[7]))
                for r in rows]

    def record_rejection(
        self,
        *,
        round: int | None,
        node_id: str,
        stage: str,
        reason: str,
        detail: str,
        digest: bytes | None = None,
    ) -> None:
        """Append a refusal (stage 'submit' for uploads, 'round' for the strategy's verdicts)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO rejections (round, node_id, stage, reason, detail, digest, at_unix)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (round, node_id, stage, str(reason), detail, digest, time.time()),
            )

    def rejections(self, round: int | None = None) -> list[RejectionRow]:
        """Refusals of one round, or all of them, oldest first."""
        where, args = ("WHERE round = ?", (round,)) if round is not None else ("", ())
        rows = self._read(
            "SELECT round, node_id, stage, reason, detail, digest, at_unix FROM rejections"
            f" {where} ORDER BY id",
            args,
        )
        return [RejectionRow(r[0], r[1], r[2], r[3], r[4], None if r[5] is None else bytes(r[5]),
                             r[6]) for r in rows]

    def reputations(self) -> dict[str, float]:
        """DAF reputation of every node scored so far."""
        return {r[0]: r[1] for r in self._read("SELECT node_id, reputation FROM reputations")}

    @staticmethod
    def _save_reputations(
        db: sqlite3.Connection, reputations: Mapping[str, float], round: int
    ) -> None:
        db.executemany(
            "INSERT INTO reputations VALUES (?, ?, ?) ON CONFLICT(node_id) DO UPDATE"
            " SET reputation = excluded.reputation, round = excluded.round",
            [(n, float(r), round) for n, r in reputations.items() if math.isfinite(r)],
        )
