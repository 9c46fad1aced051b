"""Federation: round latency and its parts, bytes per node, held-out quality, Byzantine nodes.

Runs a real loopback federation (:mod:`node_agent.loopback`: SuperLink, Coordinator gRPC
service, one ``ruvdllm-node`` process with its SuperNode per node; node ``i`` trains on the
train split of ``domains[i % len(domains)]``, its own share of it) for ``rounds`` rounds, with
``ceil(byzantine_fraction · nodes)`` of the nodes sending deltas scaled by 100, and reads
the coordinator's store (with fewer than 3 honest nodes the coarse bank is aggregated with
a trimmed mean: the default Multi-Krum needs n >= 2f + 3). Rows (means over rounds unless
said otherwise):

* ``round_latency_s``: wall time of a round, from the ServerApp opening it to the version
  persisted; split into ``local_train_s`` (slowest node's training of its 3 banks),
  ``upload_s`` (slowest ``SubmitDelta``), ``flower_s`` (the rest of the wait for replies:
  Flower's message round trip, ClientApp process start, polling) and ``aggregate_s``
  (verification, DAF, signing, persisting);
  ``round_latency_s{round=N}``: the wall time of round N alone;
* ``bytes_per_node_mb``: the largest signed delta any node uploaded in any round;
  ``bytes{round=N}``: the mean per node in round N;
* ``heldout_ppl``: held-out perplexity (test splits of the nodes' domains, mean, ELBO bound
  with the TALoRA mix per t) under the last version; ``heldout_ppl{round=N}`` per version;
* ``convergence_pct``: the federated improvement in held-out perplexity over the base model
  as a percentage of a centralized run's (``learn.train_bank`` on the union of the honest
  nodes' text, one bank at a time, with the same total number of steps per bank);
* ``byzantine_tolerance_pct``: the Byzantine share of nodes, when every round still merged
  and no Byzantine update was aggregated; 0 otherwise.

``keep = "DIR"`` runs the federation in DIR and leaves it there (an empty or new folder):
the coordinator's store and every process's log, e.g. the agents' ``TrainRound arrived …
after the ServerApp created the message`` lines that time Flower's delivery.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import BenchContext, Row
from federation import load_public_key
from node_agent.heldout import HeldoutScorer
from node_agent.loopback import LoopbackFederation, NodeSpec, Settings
from proto import ruvdllm_pb2 as pb
from ruvdllm.corpus import documents
from ruvdllm.learn import train_bank
from ruvdllm.lora import LoRAConfig, frozen_a, zero_b
from ruvdllm.runtime import load
from ruvdllm.talora import BANKS

SECTION = "federation"
DEFAULTS: dict[str, Any] = {
    "nodes": 3,
    "rounds": 2,
    "byzantine_fraction": 0.0,
    "local_steps": 4,
    "learning_rate": 5e-3,
    "seq_len": 64,
    "batch_size": 4,
    "chars": 20_000,
    "doc_chars": 4_000,
    "domains": ["pydocs", "kerneldocs", "shakespeare"],
    "round_timeout": 600.0,
    "eval_tokens": 1024,
    "density": 0.05,  # the coordinator's default (DESIGN: top-k 5 %)
    "keep": "",
}
PARTS = ("local_train_s", "upload_s", "flower_s", "aggregate_s")


def _texts(domain: str, chars: int, doc_chars: int, part: int) -> list[str]:
    """About ``chars`` characters of the domain's train split, in pieces of ≤ ``doc_chars``:
    the ``part``-th such share, so nodes on one domain hold different text (identical text
    would give identical updates, which DAF counts once)."""
    out: list[str] = []
    shares = size = 0
    for doc in documents(domain, "train"):
        out.append(doc[:doc_chars])
        size += len(out[-1])
        if size >= chars:
            if shares == part:
                return out
            shares, out, size = shares + 1, [], 0
    raise ValueError(f"{domain}'s train split has fewer than {part + 1} shares of {chars} "
                     "characters; lower [federation] chars or nodes")


def _federate(p: dict[str, Any], specs: list[NodeSpec], byzantine: set[str], tmp: Path
              ) -> tuple[dict[str, list[float]], dict[int, list[int]], list[pb.MergedAdapter],
                         bool]:
    """Run the rounds under ``tmp``: per-round timings, bytes, the versions, tolerance."""
    settings = Settings(rounds=int(p["rounds"]), local_steps=int(p["local_steps"]),
                        learning_rate=float(p["learning_rate"]), seq_len=int(p["seq_len"]),
                        batch_size=int(p["batch_size"]), density=float(p["density"]),
                        round_timeout=float(p["round_timeout"]), quorum=2,
                        rules={} if len(specs) - len(byzantine) >= 3 else
                        {"coarse": "trimmed_mean"})
    timings: dict[str, list[float]] = {k: [] for k in ("round_latency_s", *PARTS)}
    sizes: dict[int, list[int]] = {}
    with LoopbackFederation(tmp, specs, settings) as fed:
        assert fed.deployment is not None
        fed.run_rounds(timeout=settings.rounds * (settings.round_timeout + 60))
        tolerated = True
        for r in fed.rounds():
            parts = fed.participants(r.round)
            tolerated &= r.status == "merged" and not byzantine & {x.node_id for x in parts
                                                                    if x.contributed}
            if r.finished_unix is None or r.replies_unix is None or not parts:
                continue
            slowest = max((x.train_s or 0.0) + (x.upload_s or 0.0) for x in parts)
            timings["round_latency_s"].append(r.finished_unix - r.started_unix)
            timings["local_train_s"].append(max(x.train_s or 0.0 for x in parts))
            timings["upload_s"].append(max(x.upload_s or 0.0 for x in parts))
            timings["flower_s"].append(max(0.0, r.replies_unix - r.started_unix - slowest))
            timings["aggregate_s"].append(r.aggregate_s or 0.0)
            sizes[r.round] = [x.size_bytes for x in parts]
        versions = [fed.deployment.store.load_adapter(v)
                    for v in range(1, fed.latest_version() + 1)]
    return timings, sizes, versions, tolerated


def _centralized_ppl(p: dict[str, Any], scorer: HeldoutScorer, seed: int,
                     texts: list[str], tests: list[list[str]]) -> float:
    """Held-out perplexity after training every bank on all honest text in one place."""
    model, lora = scorer.model, scorer.lora
    steps = int(p["rounds"]) * int(p["local_steps"])
    start = {**frozen_a(model, lora, seed), **zero_b(model, lora)}
    for bank in BANKS:
        trained, _ = train_bank(model, scorer.tokenizer, texts, bank, lora=lora,
                                init={k: v.clone() for k, v in start.items()}, ffa_seed=seed,
                                steps=steps, lr=float(p["learning_rate"]),
                                seq_len=int(p["seq_len"]), batch_size=int(p["batch_size"]))
        scorer.talora.set_global(bank, trained, 1)
    return statistics.fmean(scorer.perplexity(t, max_tokens=int(p["eval_tokens"]))
                            for t in tests)


def run(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    """Run the loopback federation and the centralized reference; return the rows."""
    p = {**DEFAULTS, **params}
    n, domains = int(p["nodes"]), list(p["domains"])
    n_byz = math.ceil(float(p["byzantine_fraction"]) * n)
    if n - n_byz < 2:
        raise ValueError(f"{n} nodes with {n_byz} Byzantine leave fewer than 2 honest nodes")
    keep = str(p["keep"])
    if keep and Path(keep).exists() and any(Path(keep).iterdir()):
        raise ValueError(f"[federation] keep = {keep!r} is not empty; name a new folder")
    specs = [NodeSpec(f"node{i}", _texts(domains[i % len(domains)], int(p["chars"]),
                                         int(p["doc_chars"]), i // len(domains)),
                      byzantine="scale:100" if i >= n - n_byz else "") for i in range(n)]
    byzantine = {s.name for s in specs if s.byzantine}
    with (contextlib.nullcontext(keep) if keep
          else tempfile.TemporaryDirectory(prefix="bench-federation-")) as tmp:
        timings, sizes, versions, tolerated = _federate(p, specs, byzantine, Path(tmp))
        key = load_public_key(Path(tmp) / "coordinator" / "coordinator.pub")
    rt = load("default", quant="int8", device="cpu")
    scorer = HeldoutScorer(rt.model, rt.tokenizer, LoRAConfig(), key)
    used = sorted({domains[i % len(domains)] for i in range(n)})
    tests = [documents(d, "test") for d in used]
    ppl: list[float] = []
    for message in versions:
        scorer.use(message)
        ppl.append(statistics.fmean(scorer.perplexity(t, max_tokens=int(p["eval_tokens"]))
                                    for t in tests))
    honest = [t for s in specs if not s.byzantine for t in s.texts]
    central = _centralized_ppl(p, scorer, versions[0].ffa_seed, honest, tests)
    gain_fed, gain_central = ppl[0] - ppl[-1], ppl[0] - central
    convergence = 100.0 * gain_fed / gain_central if gain_central > 0 else 0.0

    note = (f"{n} nodes ({n_byz} Byzantine), {len(timings['round_latency_s'])} rounds, "
            f"{p['local_steps']} steps/bank, domains {'/'.join(used)}")
    rows = [ctx.row(SECTION, name, statistics.fmean(values), "s", note)
            for name, values in timings.items() if values]
    all_sizes = [b for per in sizes.values() for b in per]
    rows.append(ctx.row(SECTION, "bytes_per_node_mb", max(all_sizes) / 1e6, "MB", note))
    rows += [ctx.row(SECTION, f"bytes{{round={r}}}", statistics.fmean(b), "B")
             for r, b in sorted(sizes.items())]
    rows += [ctx.row(SECTION, f"round_latency_s{{round={r}}}", t, "s")
             for r, t in zip(sorted(sizes), timings["round_latency_s"], strict=True)]
    rows.append(ctx.row(SECTION, "heldout_ppl", ppl[-1], "ppl", note))
    rows += [ctx.row(SECTION, f"heldout_ppl{{round={m.round}}}", v, "ppl")
             for m, v in zip(versions, ppl, strict=True)]
    rows.append(ctx.row(SECTION, "convergence_pct", convergence, "%",
                        f"base {ppl[0]:.2f}, federated {ppl[-1]:.2f}, centralized {central:.2f}"))
    rows.append(ctx.row(SECTION, "byzantine_tolerance_pct",
                        100.0 * n_byz / n if tolerated and n_byz else 0.0, "%", note))
    return rows
