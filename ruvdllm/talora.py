"""TALoRA: timestep-aware LoRA banks with an HNSW index of local patterns.

Masked diffusion decodes from all-mask (``t = 1``) to clean text (``t = 0``),
and what the network has to do changes along the way: early steps choose
topic and layout, middle steps the domain's vocabulary, late steps local
detail. So adapters are kept in three banks by ``t`` (DESIGN §4): coarse
``(0.7, 1]``, domain ``(0.3, 0.7]``, fine ``[0, 0.3]``, blended linearly over
a window of width 0.05 around each boundary so the mix is continuous in ``t``.

Each bank holds

* a **global** slot: the federated adapter of that bank, hot-swapped by the node
  agent with :meth:`TALoRA.set_global` (kept in float32, since federated deltas
  are computed against it exactly);
* **local patterns**: adapters learned on the node, each keyed by an embedding
  (the mean-pooled final hidden state of the text it was trained on) in an
  hnswlib cosine index (HNSW, Malkov & Yashunin 2018; M=16,
  ef_construction=200, ef=50), stored int8-compressed (one scale per row).

:meth:`TALoRA.retrieve` finds the ``top_k`` nearest patterns in every bank that
``t`` touches and weighs them by a softmax over cosine similarity (temperature
``temperature``) times the bank's blend weight. A local pattern is trained
starting from its bank's global adapter, so it replaces that global adapter
rather than adding to it: :class:`TALoRAHook` gives a bank's weight to its
retrieved patterns when there are any and to its global slot otherwise.

On disk a bank folder holds ``CURRENT`` (the name of the live version) and
one folder per version with ``{coarse,domain,fine}.hnsw``,
``adapters.safetensors`` and ``bank.sqlite`` (configuration, pattern metadata
and the sha256 of every file). :meth:`TALoRA.save` writes a new version folder
and then switches ``CURRENT`` with an atomic rename, so a crash leaves the
previous version live; :meth:`TALoRA.load` verifies checksums and shapes before
it trusts anything, and never writes. One process writes a given folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ruvdllm.lora import Adapter, LoRAConfig, LoRAModel, parse_key
from ruvdllm.quant import dequantize_int8, quantize_int8

if TYPE_CHECKING:  # hnswlib is imported where an index is built: the GPU image lacks it
    import hnswlib
from ruvdllm.sampler import StepState

BANKS = ("coarse", "domain", "fine")
BANK_RANGES = {"coarse": (0.7, 1.0), "domain": (0.3, 0.7), "fine": (0.0, 0.3)}
BLEND_WIDTH = 0.05
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF = 50
DELTA_KIND = "delta"  # meta "kind" of a pattern that adds to its bank's global adapter
FORMAT = "ruvdllm-talora-1"
_VERSION = re.compile(r"^v\d{8}$")
_INITIAL_ELEMENTS = 1024  # an index grows by doubling up to the capacity
DEFAULT_LORA = LoRAConfig()


class BankError(ValueError):
    """A TALoRA bank folder that cannot be loaded or written; the message says why."""


def _ramp(x: float) -> float:
    """0 below -BLEND_WIDTH/2, 1 above +BLEND_WIDTH/2, linear in between."""
    return min(1.0, max(0.0, x / BLEND_WIDTH + 0.5))


def bank_weights(t: float) -> dict[str, float]:
    """Blend weight of each bank at timestep ``t`` in [0, 1]; they sum to 1.

    Linear cross-fades of width BLEND_WIDTH centred on 0.3 and 0.7 make the
    weights continuous in ``t`` (the adapter mix never jumps mid-sequence).
    """
    if not 0.0 <= t <= 1.0:  # also refuses NaN
        raise ValueError(f"timestep t must be in [0, 1], got {t}")
    above_low = _ramp(t - BANK_RANGES["fine"][1])  # share above the 0.3 boundary
    above_high = _ramp(t - BANK_RANGES["coarse"][0])  # share above the 0.7 boundary
    return {"coarse": above_high, "domain": above_low - above_high, "fine": 1.0 - above_low}


def _check_bank(bank: str) -> str:
    if bank not in BANKS:
        raise ValueError(f"unknown bank {bank!r}; choose from {', '.join(BANKS)}")
    return bank


@dataclass(slots=True)
class _Pattern:
    bank: str
    meta: dict[str, Any]
    packed: dict[str, tuple[Tensor, Tensor]]  # key -> (int8 (rows, cols), float32 scales (rows,))
    uses: int = 0
    last_used: int = 0  # value of the bank's use clock at the last retrieval or store


@dataclass
class _Bank:
    index: hnswlib.Index
    live: set[int] = field(default_factory=set)
    deleted: int = 0  # marked-deleted slots that a later add may reuse


def _new_index(dim: int, max_elements: int) -> hnswlib.Index:
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=max_elements, ef_construction=HNSW_EF_CONSTRUCTION,
                     M=HNSW_M, allow_replace_deleted=True)
    index.set_ef(HNSW_EF)
    return index


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TALoRA:
    """Three timestep banks, each a global adapter slot plus an HNSW index of patterns.

    ``capacity`` bounds the local patterns per bank; storing into a full bank
    evicts its least-used pattern (fewest retrievals, then least recently
    used) with hnswlib's ``mark_deleted``, and the slot is reused.
    """

    global_version: int

    def __init__(self, root: str | Path | None, dim: int, lora: LoRAConfig = DEFAULT_LORA,
                 capacity: int = 10_000, temperature: float = 0.1) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"key dimension must be a positive integer, got {dim!r}")
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if not temperature > 0:
            raise ValueError(f"softmax temperature must be positive, got {temperature!r}")
        self.root = Path(root) if root is not None else None
        if self.root is not None and (self.root / "CURRENT").exists():
            raise BankError(f"{self.root} already holds a TALoRA bank; open it with TALoRA.load")
        self.dim = dim
        self.lora = lora
        self.capacity = capacity
        self.temperature = temperature
        self.global_version = 0
        self._globals: dict[str, tuple[Adapter, int]] = {}
        self.global_serial = dict.fromkeys(BANKS, 0)  # bumps on every set_global of a bank
        self._patterns: dict[int, _Pattern] = {}
        self._banks = {b: _Bank(_new_index(dim, min(capacity, _INITIAL_ELEMENTS)))
                       for b in BANKS}
        self._signature: dict[str, tuple[int, ...]] | None = None
        self._next_id = 0
        self._clock = 0
        self._retrievals = 0
        self._evictions = 0

    # --- adapters ---------------------------------------------------------------------

    def _check_adapter(self, adapter: Adapter) -> None:
        """Keys, ranks and A/B pairs fit ``self.lora``; shapes equal earlier adapters'."""
        if not adapter:
            raise ValueError("adapter is empty")
        signature = {}
        for name, tensor in adapter.items():
            _, target, part = parse_key(name)
            shape = tuple(tensor.shape)
            rank = shape[0] if part == "A" else shape[-1]
            if target not in self.lora.targets or len(shape) != 2 or rank != self.lora.rank:
                raise ValueError(f"adapter tensor {name!r} {shape} does not fit LoRA rank "
                                 f"{self.lora.rank} on {self.lora.targets}")
            signature[name] = shape
        for name in signature:
            twin = name[:-1] + ("B" if name.endswith("A") else "A")
            if twin not in signature:
                raise ValueError(f"adapter has {name!r} without {twin!r}")
        if self._signature is not None and signature != self._signature:
            raise ValueError("adapter keys or shapes differ from the adapters already in this "
                             "bank (another model or LoRA configuration?)")
        for name, tensor in adapter.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"adapter tensor {name!r} has non-finite values")

    def _claim_signature(self, adapter: Adapter) -> None:
        if self._signature is None:
            self._signature = {k: tuple(v.shape) for k, v in adapter.items()}

    def set_global(self, bank: str, adapter: Adapter, version: int) -> None:
        """Install the federated adapter of ``bank`` (copied, float32)."""
        _check_bank(bank)
        if int(version) < 0:
            raise BankError(f"a merged adapter version is >= 0, got {version}")
        self._check_adapter(adapter)
        self._claim_signature(adapter)
        copy = {k: v.detach().float().cpu().clone() for k, v in adapter.items()}
        self._globals[bank] = (copy, int(version))
        self.global_version = int(version)
        self.global_serial[bank] += 1

    def global_adapter(self, bank: str) -> Adapter | None:
        entry = self._globals.get(_check_bank(bank))
        return dict(entry[0]) if entry is not None else None

    def adapter(self, pattern_id: int) -> Adapter:
        """The float32 adapter of a local pattern (dequantized from int8)."""
        pattern = self._pattern(pattern_id)
        return {k: dequantize_int8(q, s) for k, (q, s) in pattern.packed.items()}

    def bank_of(self, pattern_id: int) -> str:
        return self._pattern(pattern_id).bank

    def meta(self, pattern_id: int) -> dict[str, Any]:
        return dict(self._pattern(pattern_id).meta)

    def patterns(self) -> list[int]:
        return sorted(self._patterns)

    def _pattern(self, pattern_id: int) -> _Pattern:
        pattern = self._patterns.get(pattern_id)
        if pattern is None:
            raise KeyError(f"no local pattern with id {pattern_id}")
        return pattern

    # --- keys -------------------------------------------------------------------------

    def _check_keys(self, keys: np.ndarray) -> np.ndarray:
        """``(n, dim)`` float32 keys, finite and non-zero (cosine needs a direction)."""
        arr = np.asarray(keys, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"keys must have dimension {self.dim}, got shape {arr.shape}")
        if not np.isfinite(arr).all() or not (np.abs(arr).sum(axis=1) > 0).all():
            raise ValueError("keys must be finite and non-zero")
        return arr

    # --- local patterns ---------------------------------------------------------------

    def store(self, adapter: Adapter, key: np.ndarray, meta: dict[str, Any]) -> int:
        """Add a local pattern to bank ``meta["bank"]``; returns its id.

        ``key`` is ``(dim,)``; ``meta`` must be JSON-serialisable.
        """
        return self.store_many([adapter], np.asarray(key)[None], [meta])[0]

    def store_many(self, adapters: list[Adapter], keys: np.ndarray,
                   metas: list[dict[str, Any]]) -> list[int]:
        """Store several patterns with one index insertion per bank (parallel build).

        Everything is validated before anything changes.
        """
        arr = self._check_keys(keys)
        if not len(adapters) == len(metas) == len(arr):
            raise ValueError(f"{len(adapters)} adapters, {len(metas)} metas and {len(arr)} keys")
        checked: set[int] = set()  # adapter objects validated already (one adapter, many keys)
        for adapter, meta in zip(adapters, metas, strict=True):
            if not isinstance(meta, dict) or meta.get("bank") not in BANKS:
                raise ValueError(f"meta must be a dict whose 'bank' is one of {BANKS}")
            try:
                json.dumps(meta)
            except (TypeError, ValueError) as err:
                raise ValueError(f"meta must be JSON-serialisable ({err})") from None
            if id(adapter) not in checked:
                self._check_adapter(adapter)
                self._claim_signature(adapter)
                checked.add(id(adapter))
        ids = list(range(self._next_id, self._next_id + len(arr)))
        self._next_id += len(arr)
        by_object: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
        for adapter in adapters:
            if id(adapter) not in by_object:
                by_object[id(adapter)] = {k: quantize_int8(v) for k, v in adapter.items()}
        for bank in BANKS:
            rows = [i for i, m in enumerate(metas) if m["bank"] == bank]
            if rows:
                self._insert(bank, arr[rows], [ids[i] for i in rows])
        for pid, adapter, meta in zip(ids, adapters, metas, strict=True):
            self._clock += 1
            self._patterns[pid] = _Pattern(meta["bank"], dict(meta), by_object[id(adapter)],
                                           last_used=self._clock)
        return ids

    def _insert(self, bank: str, keys: np.ndarray, ids: list[int]) -> None:
        """Add keys to a bank's index, evicting least-used patterns beyond capacity."""
        b = self._banks[bank]
        if len(ids) > self.capacity:
            raise ValueError(f"{len(ids)} patterns exceed the bank capacity {self.capacity}")
        for _ in range(len(b.live) + len(ids) - self.capacity):
            self._evict(bank)
        needed = len(b.live) + b.deleted + len(ids) - min(b.deleted, len(ids))
        if needed > b.index.get_max_elements():
            b.index.resize_index(min(self.capacity, max(needed, 2 * b.index.get_max_elements())))
        b.index.add_items(keys, np.asarray(ids, dtype=np.int64), replace_deleted=True)
        b.deleted -= min(b.deleted, len(ids))
        b.live.update(ids)

    def _evict(self, bank: str) -> None:
        victim = min(self._banks[bank].live, key=lambda i: (self._patterns[i].uses,
                                                            self._patterns[i].last_used))
        self.remove(victim)
        self._evictions += 1

    def remove(self, pattern_id: int) -> None:
        """Delete a local pattern (hnswlib ``mark_deleted``; its slot is reused later)."""
        pattern = self._pattern(pattern_id)
        b = self._banks[pattern.bank]
        b.index.mark_deleted(pattern_id)
        b.live.discard(pattern_id)
        b.deleted += 1
        del self._patterns[pattern_id]

    def retrieve(self, query: np.ndarray, t: float, top_k: int = 4) -> list[tuple[int, float]]:
        """Nearest patterns of the banks ``t`` touches, weighted; best first.

        A bank's patterns share its blend weight by softmax(cosine / temperature),
        so in the interior of a bank the weights sum to 1. Banks without
        patterns contribute nothing (their global slot takes over in the hook).
        """
        q = np.asarray(query, dtype=np.float32)
        if q.shape != (self.dim,):
            raise ValueError(f"query must have shape ({self.dim},), got {q.shape}")
        norm2 = float(q.dot(q))  # one pass refuses NaN, inf and zero alike
        if not 0.0 < norm2 < math.inf:
            raise ValueError("query must be finite and non-zero")
        if top_k < 1:
            raise ValueError(f"top_k must be positive, got {top_k}")
        self._retrievals += 1
        out: list[tuple[int, float]] = []
        inv_temp = 1.0 / self.temperature
        banks_hit = 0
        for bank, weight in bank_weights(t).items():
            live = self._banks[bank].live
            if weight == 0.0 or not live:
                continue
            labels, dists = self._knn(self._banks[bank].index, q, min(top_k, len(live)))
            if not labels:
                continue
            # softmax over cosine / temperature; cosine distance = 1 - cos, and hnswlib
            # returns distances ascending, so the first is the max-subtraction anchor
            exps = [math.exp((dists[0] - d) * inv_temp) for d in dists]
            scale = weight / sum(exps)
            banks_hit += 1
            self._clock += 1
            for label, e in zip(labels, exps, strict=True):
                pattern = self._patterns[label]
                pattern.uses += 1
                pattern.last_used = self._clock
                out.append((label, e * scale))
        if banks_hit > 1:  # near a boundary two banks answer: merge their lists by weight
            out.sort(key=lambda item: -item[1])
        return out

    @staticmethod
    def _knn(index: hnswlib.Index, q: np.ndarray, k: int) -> tuple[list[int], list[float]]:
        """hnswlib's k nearest; fewer when deletions leave the graph short of k results."""
        while True:
            try:
                labels, dists = index.knn_query(q, k=k, num_threads=1)
                return labels[0].tolist(), dists[0].tolist()
            except RuntimeError:
                if k == 1:
                    return [], []
                k //= 2

    def stats(self) -> dict[str, Any]:
        stored = sum(q.numel() + 4 * s.numel() for p in self._patterns.values()
                     for q, s in p.packed.values())
        as_float = sum(4 * q.numel() for p in self._patterns.values() for q, _ in p.packed.values())
        return {
            "dim": self.dim, "capacity_per_bank": self.capacity,
            "patterns": {b: len(self._banks[b].live) for b in BANKS},
            "globals": {b: self._globals[b][1] if b in self._globals else None for b in BANKS},
            "global_version": self.global_version,
            "retrievals": self._retrievals, "evictions": self._evictions,
            "stored_bytes": stored, "float32_bytes": as_float,
            "compression": as_float / stored if stored else None,
        }

    # --- persistence ------------------------------------------------------------------

    def save(self) -> None:
        """Write a new version folder, then switch ``CURRENT`` to it atomically."""
        if self.root is None:
            raise BankError("this TALoRA has no folder (root=None); nothing to save to")
        self.root.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name[1:]) for p in self.root.iterdir() if _VERSION.match(p.name)]
        final = self.root / f"v{max(numbers, default=0) + 1:08d}"
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            self._write(tmp)
            os.rename(tmp, final)
            pointer = self.root / ".CURRENT.tmp"
            pointer.write_text(f"{final.name} {_sha256(final / 'bank.sqlite')}\n")
            _fsync(pointer)
            os.replace(pointer, self.root / "CURRENT")
            _fsync(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in self.root.iterdir():  # older versions, and any a crash left behind
            if _VERSION.match(stale.name) and stale.name != final.name:
                shutil.rmtree(stale, ignore_errors=True)

    def _write(self, folder: Path) -> None:
        tensors: dict[str, Tensor] = {}
        for pid, p in self._patterns.items():
            for k, (q, s) in p.packed.items():
                tensors[f"p{pid}.{k}.q"], tensors[f"p{pid}.{k}.s"] = q, s
        for bank, (adapter, _) in self._globals.items():
            for k, v in adapter.items():
                tensors[f"g.{bank}.{k}"] = v
        save_file(tensors, str(folder / "adapters.safetensors"))
        for bank in BANKS:
            self._banks[bank].index.save_index(str(folder / f"{bank}.hnsw"))
        config = {"format": FORMAT, "dim": self.dim, "capacity": self.capacity,
                  "temperature": self.temperature, "rank": self.lora.rank,
                  "alpha": self.lora.alpha, "targets": list(self.lora.targets),
                  "next_id": self._next_id, "clock": self._clock,
                  "retrievals": self._retrievals, "evictions": self._evictions,
                  "global_version": self.global_version,
                  "deleted": {b: self._banks[b].deleted for b in BANKS},
                  "signature": self._signature}
        files = {f.name: _sha256(f) for f in folder.iterdir()}
        with closing(sqlite3.connect(folder / "bank.sqlite")) as db:
            db.executescript("""
                CREATE TABLE config (json TEXT NOT NULL);
                CREATE TABLE files (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL);
                CREATE TABLE globals (bank TEXT PRIMARY KEY, version INTEGER NOT NULL);
                CREATE TABLE patterns (id INTEGER PRIMARY KEY, bank TEXT NOT NULL,
                    uses INTEGER NOT NULL, last_used INTEGER NOT NULL, meta TEXT NOT NULL);
            """)
            db.execute("INSERT INTO config VALUES (?)", (json.dumps(config),))
            db.executemany("INSERT INTO files VALUES (?, ?)", files.items())
            db.executemany("INSERT INTO globals VALUES (?, ?)",
                           [(b, v) for b, (_, v) in self._globals.items()])
            db.executemany("INSERT INTO patterns VALUES (?, ?, ?, ?, ?)",
                           [(pid, p.bank, p.uses, p.last_used, json.dumps(p.meta))
                            for pid, p in self._patterns.items()])
            db.commit()
        for f in folder.iterdir():
            _fsync(f)

    @classmethod
    def load(cls, root: str | Path) -> TALoRA:
        """Open a saved bank; a missing or corrupt folder raises BankError, changing nothing."""
        root = Path(root)
        current = _current(root)
        if current is None:
            raise BankError(f"{root}: no TALoRA bank here (CURRENT is missing)")
        version, digest = current
        try:
            return cls._read(root, root / version, digest)
        except (sqlite3.Error, json.JSONDecodeError, SafetensorError, RuntimeError, KeyError,
                TypeError, ValueError, OSError) as err:
            if isinstance(err, BankError):
                raise
            raise BankError(f"{root}: corrupt TALoRA bank ({type(err).__name__}: {err})") from None

    @classmethod
    def _read(cls, root: Path, folder: Path, digest: str) -> TALoRA:
        db_file = folder / "bank.sqlite"
        if _sha256(db_file) != digest:
            raise BankError(f"{db_file}: checksum mismatch")
        with closing(sqlite3.connect(db_file.absolute().as_uri() + "?mode=ro", uri=True)) as db:
            config = json.loads(db.execute("SELECT json FROM config").fetchone()[0])
            files = dict(db.execute("SELECT name, sha256 FROM files").fetchall())
            globals_ = dict(db.execute("SELECT bank, version FROM globals").fetchall())
            rows = db.execute("SELECT id, bank, uses, last_used, meta FROM patterns").fetchall()
        if config.get("format") != FORMAT:
            raise BankError(f"{folder}: unknown bank format {config.get('format')!r}")
        expected = {"adapters.safetensors", *(f"{b}.hnsw" for b in BANKS)}
        if set(files) != expected:
            raise BankError(f"{folder}: checksum table lists {sorted(files)}")
        for name, digest in files.items():
            if not (folder / name).is_file() or _sha256(folder / name) != digest:
                raise BankError(f"{folder / name}: missing or checksum mismatch")
        lora = LoRAConfig(rank=config["rank"], alpha=config["alpha"],
                          targets=tuple(config["targets"]))
        bank = cls(None, config["dim"], lora, config["capacity"], config["temperature"])
        bank.root = root
        tensors = load_file(str(folder / "adapters.safetensors"))
        for b, version in globals_.items():
            prefix = f"g.{_check_bank(b)}."
            adapter = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            bank.set_global(b, adapter, version)
        bank.global_version = config["global_version"]
        bank.global_serial = dict.fromkeys(BANKS, 0)
        signature = config["signature"]
        bank._signature = ({k: tuple(v) for k, v in signature.items()}
                           if signature is not None else None)
        if rows and bank._signature is None:
            raise BankError(f"{folder}: patterns without an adapter signature")
        for pid, b, uses, last_used, meta in rows:
            _check_bank(b)
            packed = {k: (tensors[f"p{pid}.{k}.q"], tensors[f"p{pid}.{k}.s"])
                      for k in bank._signature or {}}
            bank._patterns[pid] = _Pattern(b, json.loads(meta), packed, uses, last_used)
            bank._banks[b].live.add(pid)
        import hnswlib

        for b in BANKS:
            n_live = len(bank._banks[b].live)
            index = hnswlib.Index(space="cosine", dim=bank.dim)
            index.load_index(str(folder / f"{b}.hnsw"),
                             max_elements=max(n_live + config["deleted"][b], 1),
                             allow_replace_deleted=True)
            index.set_ef(HNSW_EF)
            if index.dim != bank.dim or not bank._banks[b].live <= set(index.get_ids_list()):
                raise BankError(f"{folder / (b + '.hnsw')}: index does not match the patterns")
            bank._banks[b] = _Bank(index, bank._banks[b].live, config["deleted"][b])
        bank._next_id, bank._clock = config["next_id"], config["clock"]
        bank._retrievals, bank._evictions = config["retrievals"], config["evictions"]
        return bank


def _current(root: Path) -> tuple[str, str] | None:
    """The live version folder's name and its bank.sqlite's sha256; None without a bank.

    The digest in ``CURRENT`` chains to the per-file digests in bank.sqlite,
    so any damaged byte of the live version is detected before use.
    """
    pointer = root / "CURRENT"
    if not pointer.is_file():
        return None
    parts = pointer.read_text(errors="replace").split()
    if len(parts) != 2 or not _VERSION.match(parts[0]) or not (root / parts[0]).is_dir():
        raise BankError(f"{pointer}: does not name a version folder and its digest")
    return parts[0], parts[1]


class TALoRAHook:
    """A SamplerHook that sets the LoRA mix from ``t`` before every forward.

    Bank weights come from :func:`bank_weights` at the batch's mean ``t`` (one
    mix serves the whole batch). With a ``query`` (the prompt embedding, or
    the uncertain positions' hidden state that DGR sets), each bank's weight
    goes to its retrieved local patterns; otherwise to its global slot.
    A pattern whose meta ``kind`` is ``"delta"`` (:data:`DELTA_KIND`: only what local
    training added to the global it started from) comes *on top of* its bank's
    global slot instead of replacing it; ``used`` records the largest weight each
    retrieved pattern got. Adapters are loaded into the LoRAModel on first use
    (ids ``global:<bank>`` and ``local:<id>``) and the least recently used locals
    are unloaded beyond ``cache_size``; a new global version is picked up at the
    next step.
    """

    def __init__(self, talora: TALoRA, lora_model: LoRAModel, query: np.ndarray | None = None,
                 top_k: int = 4, cache_size: int = 16) -> None:
        self.talora = talora
        self.lora_model = lora_model
        self.query = query
        self.top_k = top_k
        self.cache_size = cache_size
        self.last_mix: list[tuple[str, float]] = []
        self.used: dict[int, float] = {}  # largest weight per retrieved pattern id
        self._serial: dict[str, int] = {}
        self._locals: dict[str, None] = {}  # loaded local ids, least recently used first

    def before_forward(self, state: StepState) -> None:
        self.apply(float(state.t.float().mean()))

    def after_forward(self, state: StepState) -> Tensor | None:
        return None

    def apply(self, t: float) -> list[tuple[str, float]]:
        """Set (and return) the mix for timestep ``t``."""
        mix = self.mix_for(t)
        self.lora_model.set_mix(mix)
        self.last_mix = mix
        return mix

    def mix_for(self, t: float) -> list[tuple[str, float]]:
        covered: set[str] = set()
        mix: list[tuple[str, float]] = []
        if self.query is not None:
            for pid, weight in self.talora.retrieve(self.query, t, self.top_k):
                mix.append((self._load_local(pid), weight))
                self.used[pid] = max(weight, self.used.get(pid, 0.0))
                if self.talora.meta(pid).get("kind") != DELTA_KIND:
                    covered.add(self.talora.bank_of(pid))
        for bank, weight in bank_weights(t).items():
            if weight > 0.0 and bank not in covered and self._load_global(bank):
                mix.append((f"global:{bank}", weight))
        self._trim_cache({name for name, _ in mix})
        return mix

    def _load_global(self, bank: str) -> bool:
        name, serial = f"global:{bank}", self.talora.global_serial[bank]
        if self._serial.get(bank) == serial:
            return name in self.lora_model.adapters
        if name in self.lora_model.adapters:
            self.lora_model.remove(name)
        adapter = self.talora.global_adapter(bank)
        if adapter is not None:
            self.lora_model.add(name, adapter)
        self._serial[bank] = serial
        return adapter is not None

    def _load_local(self, pattern_id: int) -> str:
        name = f"local:{pattern_id}"
        if name not in self.lora_model.adapters:
            self.lora_model.add(name, self.talora.adapter(pattern_id))
        self._locals.pop(name, None)
        self._locals[name] = None
        return name

    def _trim_cache(self, in_use: set[str]) -> None:
        for name in list(self._locals):
            if len(self._locals) <= self.cache_size:
                break
            if name not in in_use:
                self.lora_model.remove(name)
                del self._locals[name]
