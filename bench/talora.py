"""TALoRA retrieval: latency, build time and recall against bare hnswlib in the same run.

For each (patterns, key dimension) the same random keys build a bare
``hnswlib`` cosine index (M=16, ef_construction=200, ef=50) and a TALoRA bank
(``store_many`` into one bank: index insertion plus int8 adapters and
metadata). Single-query latency is measured alternately on the two (bare
``knn_query`` then ``TALoRA.retrieve``) so load drift on a shared machine
hits both alike; recall@k is against exact cosine search with numpy.

Keys are i.i.d. Gaussian; a query is a stored key plus Gaussian noise of
standard deviation ``noise`` per coordinate (0.3: cosine about 0.95 to its
key), i.e. a prompt close to a learned pattern. With i.i.d. random queries
HNSW at ef=50 has low recall on isotropic 256-d data (bare and TALoRA alike).

Params: ``sizes`` (patterns), ``dims`` (ints, or "model" for the default
model's d_model), ``queries``, ``top_k``, ``seed``, ``noise``. Row names end in
``_{size}_{dim}``, e.g. ``retrieve_p50_ms_100000_256``.
"""

from __future__ import annotations

import time
from typing import Any

import hnswlib
import numpy as np
import torch

from bench.common import BenchContext, Row, percentile
from ruvdllm.config import ModelConfig
from ruvdllm.lora import LoRAConfig
from ruvdllm.talora import HNSW_EF, HNSW_EF_CONSTRUCTION, HNSW_M, TALoRA

DEFAULTS: dict[str, Any] = {"sizes": [10_000, 100_000], "dims": ["model", 256],
                            "queries": 1000, "top_k": 5, "seed": 0, "noise": 0.3}
_TINY = LoRAConfig(rank=1, targets=("q_proj",))  # the index is measured, not adapter bytes


def _exact_top(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` indices of the k most cosine-similar keys per query."""
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = qn @ kn.T  # (Q, N)
    return np.argpartition(-sims, k, axis=1)[:, :k]


def _recall(found: list[list[int]], exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e.tolist())) / len(e) for f, e in zip(found, exact,
                                                                                  strict=True)]))


def measure(size: int, dim: int, queries: int, top_k: int, seed: int,
            p_noise: float) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((size, dim)).astype(np.float32)
    # a query is a stored key plus noise (cosine ~0.95 to it): retrieval near a known pattern
    near = keys[rng.integers(0, size, queries)]
    qs = (near + p_noise * rng.standard_normal((queries, dim))).astype(np.float32)
    exact = _exact_top(keys, qs, top_k)

    t0 = time.perf_counter()
    bare = hnswlib.Index(space="cosine", dim=dim)
    bare.init_index(max_elements=size, ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M)
    bare.set_ef(HNSW_EF)
    bare.add_items(keys, np.arange(size))
    bare_build = time.perf_counter() - t0

    adapter = {"model.transformer.blocks.0.q_proj.lora_A": torch.zeros(1, 8),
               "model.transformer.blocks.0.q_proj.lora_B": torch.zeros(8, 1)}
    t0 = time.perf_counter()
    bank = TALoRA(None, dim, _TINY, capacity=size)
    ids = bank.store_many([adapter] * size, keys, [{"bank": "domain"}] * size)
    build = time.perf_counter() - t0
    to_row = {pid: i for i, pid in enumerate(ids)}

    bare_t, talora_t, bare_found, found = [], [], [], []
    for q in qs:
        t0 = time.perf_counter()
        labels, _ = bare.knn_query(q, k=top_k, num_threads=1)
        t1 = time.perf_counter()
        hits = bank.retrieve(q, 0.5, top_k)
        t2 = time.perf_counter()
        bare_t.append(t1 - t0)
        talora_t.append(t2 - t1)
        bare_found.append(labels[0].tolist())
        found.append([to_row[pid] for pid, _ in hits])
    p50, bare_p50 = percentile(talora_t, 50) * 1e3, percentile(bare_t, 50) * 1e3
    return {"retrieve_p50_ms": p50, "retrieve_p99_ms": percentile(talora_t, 99) * 1e3,
            "bare_p50_ms": bare_p50, "bare_p99_ms": percentile(bare_t, 99) * 1e3,
            "ratio_p50": p50 / bare_p50, "build_s": build, "bare_build_s": bare_build,
            "recall_at_k": _recall(found, exact), "bare_recall_at_k": _recall(bare_found, exact)}


UNITS = {"retrieve_p50_ms": "ms", "retrieve_p99_ms": "ms", "bare_p50_ms": "ms",
         "bare_p99_ms": "ms", "ratio_p50": "x", "build_s": "s", "bare_build_s": "s",
         "recall_at_k": "fraction", "bare_recall_at_k": "fraction"}


def run(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    p = {**DEFAULTS, **params}
    d_model = ModelConfig().d_model
    rows = []
    for size in p["sizes"]:
        for dim in p["dims"]:
            d = d_model if dim == "model" else int(dim)
            figures = measure(int(size), d, int(p["queries"]), int(p["top_k"]), int(p["seed"]),
                              float(p["noise"]))
            note = f"{size} patterns x {d}-d, top_k {p['top_k']}, {p['queries']} queries"
            rows += [ctx.row("talora", f"{name}_{size}_{d}", value, UNITS[name], note)
                     for name, value in figures.items()]
    return rows
