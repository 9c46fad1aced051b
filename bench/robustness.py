"""Attack matrix: held-out perplexity of the merged adapter with Byzantine nodes, per aggregator.

One federated round of ``nodes`` nodes from the zero-B global adapter (FFA-LoRA seed fixed):
node ``i`` trains each TALoRA bank with ``learn.train_bank`` on its own slice of the train
split of ``domains[i % len(domains)]`` (real text, the embedded default model), takes
``delta = trained B − global B`` and clips it to ``clip_norm`` as ``node_agent.trainer`` does.
The last ``k`` nodes attack, for each ``k`` in ``attackers``: their update is replaced by one
of ``federation.attacks.DELTA_ATTACKS`` (given their own honest update and the honest nodes'),
or, for ``poisoning``, is the delta of the same training on their text with the words of each
document shuffled. Attackers claim a quality gain of 1.0 (the largest possible; DAF caps it).
Every update, honest or not, goes through the real wire path: ``encode_delta`` (top-k at
``density``, int8, signed) then ``decode_delta``. The decoded updates are merged per bank by
each aggregator of ``federation.aggregators`` (configured with ``f``; Bulyan with the largest
f that n allows) and by DAF as configured by default (``DAFConfig()``: automatic f, the
largest the n updates allow, default rules and reputation, fresh: one round, no history),
with no norm bound (the coordinator's ``Validator`` would also refuse deltas above
``max_norm``; here the aggregator stands alone). A rule that cannot produce a
version (quorum not met) keeps the base model. The merged adapter is packed and signed as the
coordinator does, and scored with ``node_agent.heldout.HeldoutScorer`` (ELBO bound with the
TALoRA mix per t, fixed seed, so every cell sees the same masks) on the test splits of the
nodes' domains (mean over domains). Text comes from the installed corpus sources, or from a
``python -m ruvdllm.corpus export`` folder named by ``corpus``.

Honest deltas are trained once and reused by every cell; identical merged adapters are scored
once. Rows: ``base_ppl``, ``clean_ppl{agg}`` (no attackers), ``ppl{agg,attack,attackers}``,
``change_pct{agg,attack,attackers}`` = 100·(ppl / clean_ppl{agg} − 1) (every aggregator at
``goal_attackers``, only ``sweep_aggregators`` at the other counts, if given), and
``daf_worst_change_pct``: the largest change for DAF over the attacks with
``goal_attackers`` attackers (the issue's goal: ≤ 2% with 3 of 10).

    python -m bench.robustness [--config bench.toml] [--quick] [--threads N]

prints the matrix as markdown tables (docs/robustness.md).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import BenchContext, Row
from bench.report import labelled, parse_name
from federation import (
    DAF,
    RULES,
    BankLayout,
    DAFConfig,
    DecodedDelta,
    QuorumNotMet,
    aggregate,
    decode_delta,
    encode_delta,
    generate_key,
    pack_adapter,
)
from federation.aggregators import max_f
from federation.attacks import DELTA_ATTACKS, Update
from node_agent.heldout import HeldoutScorer
from node_agent.trainer import clip
from ruvdllm.corpus import documents, read_export
from ruvdllm.learn import train_bank
from ruvdllm.lora import LoRAConfig, frozen_a, zero_b
from ruvdllm.runtime import Runtime, load
from ruvdllm.talora import BANKS
from ruvdllm.train import token_stream

SECTION = "robustness"
POISONING = "poisoning"
DAF_NAME = "daf"
DEFAULTS: dict[str, Any] = {  # bench.toml's [robustness] sets the same
    "nodes": 10,
    "attackers": [1, 2, 3, 4],
    "goal_attackers": 3,
    "attacks": [*DELTA_ATTACKS, POISONING],
    "aggregators": [*RULES, DAF_NAME],
    "sweep_aggregators": [],
    "f": 3,
    "domains": ["pydocs", "kerneldocs"],
    "corpus": "",
    "chars": 4_000,
    "doc_chars": 1_000,
    "local_steps": 4,
    "learning_rate": 5e-3,
    "seq_len": 32,
    "batch_size": 4,
    "clip_norm": 3.0,
    "density": 0.05,
    "eval_tokens": 256,
    "eval_samples": 3,
    "eval_seq_len": 128,
    "quant": "none",
    "ffa_seed": 1234,
    "seed": 0,
}
ATTACKER_GAIN = 1.0


def corpus_split(corpus: str, domain: str, split: str) -> list[str]:
    """Documents of a split: from the installed sources, or from an export folder if named."""
    return read_export(corpus, domain, split) if corpus else documents(domain, split)


def node_texts(train: Sequence[str], index: int, chars: int, doc_chars: int) -> list[str]:
    """The ``index``-th disjoint run of documents of ``train``, ``chars`` in all."""
    runs, current = 0, []
    for doc in train:
        current.append(doc[:doc_chars])
        if sum(map(len, current)) >= chars:
            if runs == index:
                return current
            runs, current = runs + 1, []
    raise ValueError(f"too little train text for node {index}")


def shuffled(texts: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Each text with its words in random order: the vocabulary stays, the language goes."""
    return [" ".join(rng.permutation(text.split())) for text in texts]


@dataclass(frozen=True)
class Trained:
    """A node's clipped per-bank B delta and its reported quality gain."""

    delta: Update
    gain: float


class Matrix:
    """Trains the nodes once, then merges and scores any set of updates with any aggregator."""

    def __init__(self, rt: Runtime, p: dict[str, Any]) -> None:
        self.rt, self.p = rt, p
        self.lora = LoRAConfig()
        self.n = int(p["nodes"])
        self.f = int(p["f"])
        self.seed = int(p["seed"])
        self.ffa_seed = int(p["ffa_seed"])
        self.key = generate_key()
        self.node_keys = [generate_key() for _ in range(self.n)]
        self.scorer = HeldoutScorer(rt.model, rt.tokenizer, self.lora, self.key.public_key())
        domains = list(p["domains"])
        self.domains = [domains[i % len(domains)] for i in range(self.n)]
        corpus = str(p["corpus"])
        self.tests = [self._leading(corpus_split(corpus, d, "test"), int(p["eval_tokens"]))
                      for d in sorted(set(self.domains))]
        train = {d: corpus_split(corpus, d, "train") for d in set(self.domains)}
        per_domain = [self.domains[:i].count(self.domains[i]) for i in range(self.n)]
        self.texts = [node_texts(train[d], j, int(p["chars"]), int(p["doc_chars"]))
                      for d, j in zip(self.domains, per_domain, strict=True)]
        self._scores: dict[bytes, float] = {}
        self._version = 0
        self.layout: dict[str, BankLayout] = {}

    def _leading(self, docs: list[str], tokens: int) -> list[str]:
        """The first documents that hold ``tokens`` tokens: all the scorer reads of ``docs``
        (its stream is the documents' encodings in order), so no cell re-tokenizes the rest."""
        out, count = [], 0
        for doc in docs:
            out.append(doc)
            count += len(token_stream([doc], self.rt.tokenizer))
            if count >= tokens:
                break
        return out

    def train(self, texts: list[str], node: int) -> Trained:
        """Train every bank of one node from the zero-B global adapter; clip as the node does."""
        p, model = self.p, self.rt.model
        start = {**frozen_a(model, self.lora, self.ffa_seed), **zero_b(model, self.lora)}
        delta: Update = {}
        gains = []
        for b, bank in enumerate(BANKS):
            trained, stats = train_bank(
                model, self.rt.tokenizer, texts, bank, lora=self.lora,
                init={k: v.clone() for k, v in start.items()}, ffa_seed=self.ffa_seed,
                steps=int(p["local_steps"]), lr=float(p["learning_rate"]),
                seq_len=int(p["seq_len"]), batch_size=int(p["batch_size"]),
                seed=self.seed + 1000 * node + b)
            delta[bank] = {k: (trained[k] - start[k]).numpy()
                           for k in trained if k.endswith(".lora_B")}
            gains.append(float(stats["quality_gain"]))
        clipped, _ = clip(delta, float(p["clip_norm"]))
        if not self.layout:
            self.layout = {b: BankLayout({k: v.shape for k, v in t.items()})
                           for b, t in clipped.items()}
        return Trained(clipped, statistics.fmean(gains))

    def wire(self, node: int, delta: Update, gain: float) -> DecodedDelta:
        """The update as the coordinator receives it: encoded, signed, decoded."""
        body = encode_delta(delta, round=1, node_id=f"node{node}", base_version=0,
                            example_count=1, key=self.node_keys[node],
                            metrics={"quality_gain": gain}, density=float(self.p["density"]))
        return decode_delta(body)

    def merge(self, updates: Sequence[DecodedDelta], aggregator: str
              ) -> dict[str, np.ndarray] | None:
        """Flat merged update per bank, or None when the rule produces no version."""
        flat = {b: {u.node_id: lay.flatten(u.tensors[b]) for u in updates}
                for b, lay in self.layout.items()}
        try:
            if aggregator == DAF_NAME:
                gains = {u.node_id: u.metrics["quality_gain"] for u in updates}
                return DAF(DAFConfig()).aggregate(flat, gains).merged
            f = min(self.f, max_f("bulyan", len(updates))) if aggregator == "bulyan" else self.f
            return {b: aggregate(np.stack(list(x.values())), aggregator, f=f)
                    for b, x in flat.items()}
        except QuorumNotMet:
            return None

    def perplexity(self, merged: dict[str, np.ndarray] | None) -> float:
        """Held-out perplexity with ``merged`` as the new global B (None: the base model)."""
        banks = {b: lay.unflatten(merged[b] if merged is not None else np.zeros(lay.size))
                 for b, lay in self.layout.items()}
        digest = hashlib.sha256(b"".join(t.tobytes() for b in sorted(banks)
                                         for _, t in sorted(banks[b].items()))).digest()
        if digest not in self._scores:
            self._version += 1
            self.scorer.use(pack_adapter(banks, version=self._version, round=1,
                                         parent_version=0, ffa_seed=self.ffa_seed,
                                         contributors=[], key=self.key))
            p = self.p
            self._scores[digest] = statistics.fmean(
                self.scorer.perplexity(t, seq_len=int(p["eval_seq_len"]),
                                       max_tokens=int(p["eval_tokens"]),
                                       samples=int(p["eval_samples"]), seed=self.seed)
                for t in self.tests)
        return self._scores[digest]


def _check(p: dict[str, Any]) -> None:
    """ValueError for unknown attacks or aggregators and attacker counts n cannot hold."""
    unknown = sorted(set(p["attacks"]) - {*DELTA_ATTACKS, POISONING})
    unknown += sorted(set(p["aggregators"]) - {*RULES, DAF_NAME})
    unknown += sorted(set(p["sweep_aggregators"]) - set(p["aggregators"]))
    if unknown:
        raise ValueError(f"unknown attacks or aggregators {unknown}")
    n, counts = int(p["nodes"]), [int(k) for k in p["attackers"]]
    if not counts or min(counts) < 1 or max(counts) > n - 2:
        raise ValueError(f"attackers must be in [1, {n - 2}] for {n} nodes, got {counts}")


def run(params: dict[str, Any], ctx: BenchContext,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
        ) -> list[Row]:
    """Train the nodes, run every (aggregator, attack, attackers) cell; return the rows."""
    p = {**DEFAULTS, **params}
    _check(p)
    t0 = time.perf_counter()
    m = Matrix(load("default", device=ctx.device, quant=p["quant"]), p)
    n, counts = m.n, sorted(int(k) for k in p["attackers"])
    honest = [m.train(m.texts[i], i) for i in range(n)]
    poisoned: dict[int, Trained] = {}
    if POISONING in p["attacks"]:
        rng = np.random.default_rng(m.seed)
        poisoned = {i: m.train(shuffled(m.texts[i], rng), i) for i in range(n - max(counts), n)}
    log(f"robustness: trained {n + len(poisoned)} nodes in {time.perf_counter() - t0:.0f} s")
    wired = [m.wire(i, t.delta, t.gain) for i, t in enumerate(honest)]
    base = m.perplexity(None)
    rows = [ctx.row(SECTION, "base_ppl", base, "ppl", "no adapter")]
    clean = {}
    for agg in p["aggregators"]:
        clean[agg] = m.perplexity(m.merge(wired, agg))
        rows.append(ctx.row(SECTION, labelled("clean_ppl", agg=agg), clean[agg], "ppl"))
    log(f"robustness: base {base:.2f}, clean {clean}")
    worst: list[float] = []
    sweep = list(p["sweep_aggregators"]) or list(p["aggregators"])
    for k in counts:
        attackers = range(n - k, n)
        aggregators = p["aggregators"] if k == int(p["goal_attackers"]) else sweep
        for a, attack in enumerate(p["attacks"]):
            if attack == POISONING:
                bad = [poisoned[i].delta for i in attackers]
            else:
                bad = DELTA_ATTACKS[attack]([honest[i].delta for i in attackers],
                                            [t.delta for t in honest[: n - k]],
                                            np.random.default_rng([m.seed, k, a]))
            updates = wired[: n - k] + [m.wire(i, d, ATTACKER_GAIN)
                                        for i, d in zip(attackers, bad, strict=True)]
            for agg in aggregators:
                ppl = m.perplexity(m.merge(updates, agg))
                change = 100.0 * (ppl / clean[agg] - 1.0)
                labels = {"agg": agg, "attack": attack, "attackers": k}
                rows.append(ctx.row(SECTION, labelled("ppl", **labels), ppl, "ppl"))
                rows.append(ctx.row(SECTION, labelled("change_pct", **labels), change, "%"))
                if agg == DAF_NAME and k == int(p["goal_attackers"]):
                    worst.append(change)
            log(f"robustness: {k} x {attack} done at {time.perf_counter() - t0:.0f} s")
    note = (f"{n} nodes, f={m.f} (DAF: auto), {p['local_steps']} steps/bank, "
            f"density {p['density']}, domains {'/'.join(sorted(set(m.domains)))}")
    if worst:
        rows.append(ctx.row(SECTION, "daf_worst_change_pct", max(worst), "%",
                            f"{p['goal_attackers']} of {n} attacking; {note}"))
    rows.append(ctx.row(SECTION, "matrix_s", time.perf_counter() - t0, "s", note))
    return rows


def markdown(rows: Sequence[Row]) -> str:
    """One table per attacker count: % change of held-out perplexity against the clean run."""
    cells: dict[tuple[str, str, str], float] = {}
    lines = []
    for r in rows:
        base, labels = parse_name(r.name)
        if base == "change_pct":
            cells[(labels["attackers"], labels["attack"], labels["agg"])] = r.value
        elif base == "base_ppl":
            lines.append(f"Base model (no adapter): held-out perplexity {r.value:.2f}.")
    clean = {parse_name(r.name)[1]["agg"]: r.value for r in rows
             if parse_name(r.name)[0] == "clean_ppl"}
    aggs = list(clean)
    lines += ["", "| clean run | " + " | ".join(aggs) + " |", "|---|" + "---|" * len(aggs),
              "| held-out ppl | " + " | ".join(f"{clean[a]:.2f}" for a in aggs) + " |"]
    for k in sorted({key[0] for key in cells}, key=int):
        attacks = list(dict.fromkeys(key[1] for key in cells if key[0] == k))
        here = [a for a in aggs if (k, attacks[0], a) in cells]
        lines += ["", f"**{k} of the nodes attacking**: % change of held-out perplexity "
                  "against the same aggregator's clean run", "",
                  "| attack | " + " | ".join(here) + " |", "|---|" + "---|" * len(here)]
        lines += [f"| {attack} | " + " | ".join(f"{cells[(k, attack, a)]:+.1f}" for a in here)
                  + " |" for attack in attacks]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from bench.cli import BenchError, default_config, load_config, section_params

    parser = argparse.ArgumentParser(prog="python -m bench.robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=default_config())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        params = section_params(load_config(args.config), SECTION, args.quick)
    except BenchError as err:
        parser.error(str(err))
    rows = run(params, BenchContext())
    print(markdown(rows))
    for r in rows:
        if not parse_name(r.name)[1]:
            print(f"\n{r.name} = {r.value:.3f} {r.unit} ({r.note})", end="")
    print()


if __name__ == "__main__":
    main()
